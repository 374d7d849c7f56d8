"""Root pytest configuration: Triton interpreter on CPU, hardware markers, GPU per xdist worker, workers sharing a
device, per-test seeds."""

from __future__ import annotations

import fcntl
import gc
import os
import random
import traceback
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
    "extended": "a wider sweep of a check the default run already makes (more cases of an outside implementation, "
                "the gate's self-test table beside its A/B run, a second world size, the sanitizer workload's bands "
                "beside the catalogue's): run with --extended (`tox -e extended`), not by default",
}


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true", help="also run the tests marked extended")


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
        if config.cache is not None:
            device = f"cuda{torch.cuda.current_device()}" if gpu_present() else "cpu"
            config.stash[SHARE] = DeviceShare(config.cache.mkdir("moe-verify-devices") / f"{device}.lock")


def _skip_reasons() -> dict[str, str | None]:
    from kernels.gemm import availability

    ok, why = availability("deep_gemm", "cuda" if gpu_present() else "cpu")
    return {"gpu": None if gpu_present() else "no CUDA GPU on this machine", "deep_gemm": None if ok else why}


def pytest_collection_modifyitems(config, items):
    # Longest first (a stable sort): xdist hands tests out in this order, and the short catalogue rows then fill the
    # workers around the long ones instead of one long test running alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
    reasons = _skip_reasons()
    if not config.getoption("--extended"):
        reasons["extended"] = "an extended sweep: run with --extended"
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


# ---- several workers, one device ----------------------------------------------------------------------------------
# `pytest -n 8` puts several workers on each GPU, and the GPU-sized catalogue needs much memory: on an 80 GB H100, 21 of
# 550 GPU tests once failed with torch.OutOfMemoryError while drawing their inputs, eight workers holding gpt-oss-sized
# weights together (the same run passed on a 141 GB H200). Two measures. Each test gives its
# cached device memory back when it ends, so that what a worker's finished tests freed is free for the others: with
# it the whole selection passed twice on that H100 and no test ran out. And,
# as the net for whatever still does not fit: running out of memory beside other workers says nothing of the code, so
# such a test runs again alone: every test holds its device's lock shared from setup to teardown; one whose call
# raised torch.OutOfMemoryError takes it exclusively (waiting for the tests running beside it, keeping new ones out)
# and runs again; out of memory alone is its result.

class DeviceShare:
    """A readers-writer lock between processes, on a file (flock): shared by every test on the device, exclusive for
    one running alone. A turnstile file keeps new readers out while a writer waits, so that it is not starved."""

    def __init__(self, path):
        self._turnstile = open(f"{path}.turnstile", "a")  # both held open for the worker's life
        self._lock = open(path, "a")

    def _take(self, mode: int) -> None:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._lock, mode)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def shared(self) -> None:
        self._take(fcntl.LOCK_SH)

    def alone(self) -> None:
        """From shared to exclusive (not atomic: the caller has nothing left on the device in between)."""
        self.release()
        self._take(fcntl.LOCK_EX)

    def beside(self) -> None:
        """From exclusive back to shared, without the turnstile: a writer waiting there holds it while it waits for
        this lock, so going through it would deadlock."""
        fcntl.flock(self._lock, fcntl.LOCK_SH)

    def release(self) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)


SHARE = pytest.StashKey[DeviceShare]()


def _give_back_cached_memory() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    share = item.config.stash.get(SHARE, None)
    if share is None:
        return (yield)
    share.shared()
    try:
        return (yield)
    finally:
        _give_back_cached_memory()
        share.release()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    share = item.config.stash.get(SHARE, None)
    try:
        return (yield)
    except torch.OutOfMemoryError as exc:
        if share is None:
            raise
        traceback.clear_frames(exc.__traceback__)  # the failed attempt's tensors, freed
    gc.collect()
    _give_back_cached_memory()
    share.alone()
    try:
        item.runtest()
    finally:
        share.beside()
    item.add_report_section("call", "device", "ran out of device memory beside the other workers: ran again alone")
