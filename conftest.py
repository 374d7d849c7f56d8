"""Root pytest configuration: Triton interpreter on CPU, hardware markers, GPU per xdist worker, per-test seeds."""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch
from hypothesis import settings

from kernels._device import configure_triton, gpu_present

configure_triton()  # before anything imports triton

# Property tests: few derandomised examples in CI (the same cases every run), many on request
# (`pytest --hypothesis-profile deep`). No example database: a run depends on the code alone.
settings.register_profile("ci", max_examples=30, derandomize=True, deadline=None, database=None)
settings.register_profile("deep", max_examples=1000, deadline=None)
settings.load_profile("ci")

MARKERS = {
    "gpu": "needs a CUDA GPU",
    "deep_gemm": "needs deep_gemm with its bf16 grouped GEMMs on an SM90/SM100 GPU",
    "long": "takes tens of seconds on the 2-core CPU: scheduled first, so that it does not make the tail of `-n 8`",
}


def pytest_configure(config):
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")
    # pytest-xdist: worker gwN uses GPU N mod count, so `-n 8` spreads over every visible GPU; on the CPU each worker
    # keeps to one torch thread (8 workers x every core's worth of threads would mostly fight over the cores).
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw"):
        if gpu_present():
            torch.cuda.set_device(int(worker[2:]) % torch.cuda.device_count())
        else:
            torch.set_num_threads(1)


def _skip_reasons() -> dict[str, str | None]:
    from kernels.gemm import availability

    ok, why = availability("deep_gemm", "cuda" if gpu_present() else "cpu")
    return {"gpu": None if gpu_present() else "no CUDA GPU on this machine", "deep_gemm": None if ok else why}


def pytest_collection_modifyitems(config, items):
    # Longest first (a stable sort): xdist hands tests out in this order, and the short catalogue rows then fill the
    # workers around the long ones instead of one long test running alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
    reasons = _skip_reasons()
    for item in items:
        for name, reason in reasons.items():
            if reason and item.get_closest_marker(name):
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """A fixed seed per test, derived from its id: reruns and `-n 8` runs draw the same inputs. MOE_VERIFY_SEED=N
    shifts every test's seed, for a fresh draw of the whole suite."""
    value = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("MOE_VERIFY_SEED", "0"))) % 2**32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value
