"""Reliability on a GPU (`-m gpu`): compute-sanitizer memcheck and racecheck over every Triton kernel, the whole
stage bitwise identical over 20 reruns, and no growth of allocated memory over a 100-iteration sweep. The sanitizer's
workload must also pass its bands on its own (on a CPU too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from kernels import moe_expert_forward
from kernels._device import default_device
from kernels.executor import LAYOUT_CHOICES
from kernels.gemm import availability
from verify import checks
from verify.cases import Sizes
from verify.perf.reliability import memory_sweep, rank_inputs, sanitizer_workload

REALISTIC = Sizes(num_tokens=4096, hidden=2048, inter=768, num_experts=128, topk=8)


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_triton_kernels_under_compute_sanitizer(tool):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "86", sys.executable, "-m", "verify.perf.reliability"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    log = done.stdout + done.stderr
    if "Device not supported" in log:
        pytest.skip(f"compute-sanitizer cannot attach to this GPU: {log.strip().splitlines()[-1]}")
    # memcheck ends with "ERROR SUMMARY: 0 errors", racecheck with "RACECHECK SUMMARY: 0 hazards displayed (0 errors,"
    assert done.returncode == 0 and ("SUMMARY: 0 errors" in log or "(0 errors, 0 warnings)" in log), log[-4000:]
    assert "sanitizer workload: done" in log


# the Triton GEMM's tiles also cover padding rows of the block (unspecified contents: whatever the allocator held,
# inf, NaN and huge finite patterns included) and the interpreter warns there, in the tile's matmul or in adding it up
# ("invalid value" for NaN, "overflow" for sums past the float range)
@pytest.mark.extended  # every kernel of it is judged by the catalogue's rows; this judges the workload as such
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered in (matmul|add):RuntimeWarning")
def test_sanitizer_workload_passes_its_bands():
    sanitizer_workload(default_device())  # outside the sanitizer (and on a CPU too): it must be right to mean anything


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUT_CHOICES)
@pytest.mark.parametrize("gemm", ["auto", "triton", "grouped_mm"])
def test_whole_stage_is_bitwise_identical_over_20_reruns(layout, gemm, seed):
    if not availability(gemm, "cuda", REALISTIC.hidden, REALISTIC.inter)[0] and gemm != "auto":
        pytest.skip(availability(gemm, "cuda", REALISTIC.hidden, REALISTIC.inter)[1])
    args, kw, _ = rank_inputs(REALISTIC, "skewed", seed, "cuda", ep_size=8, rank=3)
    outs = [moe_expert_forward(*args, **kw, layout=layout, gemm=gemm) for _ in range(20)]
    differing = [i for i, out in enumerate(outs[1:], 1) if not checks.bitwise_equal(out, outs[0])]
    assert not differing, f"reruns {differing} differ from run 0"


@pytest.mark.gpu
def test_no_memory_growth_over_100_iterations(seed):
    torch.cuda.synchronize()
    allocated = memory_sweep("cuda", 100, REALISTIC, seed)
    # the first pass over the four routings sets the steady state; every later iteration must return to it
    assert max(allocated[8:]) <= max(allocated[:8]), allocated
    assert allocated[-1] == allocated[7], (allocated[7], allocated[-1])
