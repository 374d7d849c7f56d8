"""kernels/_details/launch.py: a Launcher runs the compiled kernel Triton's own launch would run, or takes that launch.

On a CPU the Launcher's bookkeeping is held to a stand-in kernel that records how it was launched (the interpreter
never takes the fast path); on a GPU the stages' outputs through the fast path are held bit for bit to Triton's own
launch, and the fast path is shown taken."""

from __future__ import annotations

import types

import pytest
import torch

from kernels._details import launch

STREAM = 1234


class Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class Kernel:
    """A stand-in @triton.jit kernel: `fn` gives the signature; each launch through it is recorded."""

    @staticmethod
    def fn(x_ptr, n, scale, BLOCK, FLAG=True):
        pass

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.launches.append((grid, args, meta))
            return Compiled()

        return run


@pytest.fixture
def fake_gpu(monkeypatch):
    """No interpreter; Triton's pieces replaced: no launch hook, device 0, stream STREAM."""
    runtime = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=types.SimpleNamespace(calls=[]))
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "_triton_pieces", lambda: (runtime, lambda: 0, lambda device: STREAM))
    monkeypatch.setattr(launch, "JIT_ONLY", False)
    return runtime


def aligned(offset_bytes=0):
    return torch.zeros(64, dtype=torch.uint8)[offset_bytes:]


def test_second_launch_runs_the_compiled_kernel_with_every_parameter_in_order(fake_gpu):
    kernel = Kernel()
    launcher = launch.Launcher(kernel)
    x = aligned()
    launcher[(3, 2)](x, 100, 0.5, BLOCK=64, num_warps=4)
    assert len(kernel.launches) == 1  # Triton's own launch compiled (here: recorded) it
    compiled, _ = next(iter(launcher._compiled.values()))
    launcher[(5, 2)](x, 101, 0.25, BLOCK=64, num_warps=4)  # same specialisation: 100 and 101 are neither 1 nor 16k
    assert len(kernel.launches) == 1
    assert compiled.runs == [(5, 2, 1, STREAM, "function", "metadata", None, None, None, x, 101, 0.25, 64, True)]


@pytest.mark.parametrize("first, second", [
    ((aligned(), 100), (aligned(1), 100)),  # address no longer a multiple of 16
    ((aligned(), 100), (aligned(), 1)),  # an int that is 1
    ((aligned(), 100), (aligned(), 96)),  # an int that is a multiple of 16
    ((aligned(), 100), (aligned(), 1 << 40)),  # an int past i32
    ((aligned(), 1), (aligned(), True)),  # a bool where the int 1 was (equal in Python, not to Triton)
    ((aligned(), 100), (torch.zeros(4, dtype=torch.int32), 100)),  # another dtype
])
def test_another_specialisation_takes_tritons_launch(fake_gpu, first, second):
    kernel = Kernel()
    launcher = launch.Launcher(kernel)
    launcher[(1,)](*first, 0.5, BLOCK=64)
    launcher[(1,)](*second, 0.5, BLOCK=64)
    assert len(kernel.launches) == 2


def test_other_keywords_take_tritons_launch(fake_gpu):
    kernel = Kernel()
    launcher = launch.Launcher(kernel)
    for meta in (dict(BLOCK=64), dict(BLOCK=128), dict(BLOCK=64, FLAG=False), dict(BLOCK=64, num_warps=8)):
        launcher[(1,)](aligned(), 100, 0.5, **meta)
    assert len(kernel.launches) == 4


@pytest.mark.parametrize("why", ["hook", "switch", "interpreter", "unknown type"])
def test_tritons_own_launch_every_time(fake_gpu, monkeypatch, why):
    kernel = Kernel()
    launcher = launch.Launcher(kernel)
    args = (aligned(), 100, 0.5)
    if why == "hook":
        fake_gpu.launch_exit_hook.calls.append(print)  # a profiler asks for launch metadata
    elif why == "switch":
        monkeypatch.setattr(launch, "JIT_ONLY", True)
    elif why == "interpreter":
        monkeypatch.setattr(launch, "interpreting", lambda: True)
    else:
        args = (aligned(), "100", 0.5)
    for _ in range(3):
        launcher[(1,)](*args, BLOCK=64)
    assert len(kernel.launches) == 3 and not any(c.runs for c, _ in launcher._compiled.values())


@pytest.mark.gpu
def test_fast_path_taken_and_bitwise_equal_to_tritons_launch(monkeypatch, seed):
    from kernels import activation, gather, scatter
    from kernels.dispatch import unsynced_block_rows

    x = torch.randn(96, 256, device="cuda").bfloat16()
    ids = torch.stack([torch.randperm(16, device="cuda")[:4] for _ in range(96)]).int()
    weights = torch.rand(96, 4, device="cuda")

    def stage_outputs() -> dict:
        """Each stage once, fed the scattered rows (as h: I = H / 2; as y); what the scatter's atomics placed is read
        per slot, through output_index."""
        d, stats = scatter.route_scatter_masked(x, ids, ep_rank=1, num_local_experts=8, num_experts=16,
                                                block_rows=unsynced_block_rows(96, 128))
        a = activation.silu_and_mul(d.rows, d)
        out = gather.gather(d.rows, d, weights)
        index = d.output_index[d.output_index >= 0].long()
        return dict(stats=stats, masked_m=d.counts, rows=d.flat_rows()[index], a=a.reshape(-1, 128)[index], out=out)

    monkeypatch.setattr(launch, "JIT_ONLY", True)
    expected = stage_outputs()
    monkeypatch.setattr(launch, "JIT_ONLY", False)
    got = [stage_outputs() for _ in range(3)]  # the first may compile; the next two launch what it kept
    for launcher in (scatter._ROUTE_SCATTER_MASKED, activation._SILU_AND_MUL, gather._GATHER):
        assert launcher._compiled, f"{launcher.kernel.fn.__name__}: the fast path was never taken"
    for outputs in got:
        for name, want in expected.items():
            assert torch.equal(want, outputs[name]), name
