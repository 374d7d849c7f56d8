"""Where timing processes run: several `python -m ...` commands at once (each its own process: own CUDA context, own
JIT compiles), and the CPUs a process times on."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


def run_modules(argvs: list[list[str]], jobs: int) -> list[subprocess.CompletedProcess]:
    """`python <argv>` for each argv, `jobs` at a time, outputs captured; results in argv order."""
    def one(argv):
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(one, argvs))


@functools.cache
def shared_cpus(device_type: str) -> list[int]:
    """The CPUs a process times on (the gate's workers, the bench): the same two for all, near the GPU where the
    system says which are. Left to the scheduler, a process runs on whichever core it woke on, and host-bound
    timings follow the core: in an A/A self-test on an H200 machine (5 gate workers of one tree, unpinned) the
    workers timed up to 11% apart at host-bound points, steadily (9 false alarms in 160), and the launch-latency
    probe read 17-26 us in successive runs on one machine. The gate's workers time one at a time, so the two cores
    are never contended by them; compiling and the accuracy rows run on every CPU."""
    if not hasattr(os, "sched_getaffinity"):  # not Linux: no pinning
        return []
    allowed = sorted(os.sched_getaffinity(0))
    near = set(allowed)
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        try:
            bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            listed = pathlib.Path(f"/sys/bus/pci/devices/{bus}/local_cpulist").read_text().strip()
            near = set()
            for part in listed.split(","):
                first, _, last = part.partition("-")
                near.update(range(int(first), int(last or first) + 1))
        except (AttributeError, OSError, ValueError):
            pass
    return ([c for c in allowed if c in near] or allowed)[:2]


def run_on(cpus: Iterable[int] | None) -> None:
    """This process (and those it starts) on these CPUs from now on; nothing where the OS cannot pin."""
    if cpus and hasattr(os, "sched_setaffinity") and set(cpus) != os.sched_getaffinity(0):
        os.sched_setaffinity(0, set(cpus))


@contextlib.contextmanager
def pinned(cpus: Iterable[int] | None) -> Iterator[None]:
    """`run_on(cpus)` for the block, then back on the CPUs the process had (an in-process caller, a test worker,
    keeps its own)."""
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    run_on(cpus)
    try:
        yield
    finally:
        run_on(before)
