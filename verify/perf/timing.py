"""How a callable is timed (ms per call): the two timers of the bench and the gate, each for what it can time.

- `back_to_back`: a call as made, host included (an eager call, which may wait for the GPU inside: the default call
  reads the counts back, the decode call its flags after queueing its last kernel). On a GPU, back-to-back calls
  between two CUDA events, in LOOPS loops of about rep_ms / LOOPS each, the median loop: the time per call of a loop
  of such calls, the host's launches and waits included wherever they keep the GPU waiting. Not triton's do_bench:
  its L2 flush before each call is GPU work the host runs ahead of, and it races the host of a call that waits for
  the GPU inside. Whether the host is ahead of the flush or behind it decides whether its launch time is counted:
  whole do_bench runs of one unchanged Qwen3-like point on an H200 landed in two clusters, ~0.30-0.41 and
  ~0.46-0.78 ms, the share of each differing from process to process (docs/design.md, "The regression gate"),
  and a host-bound call that does not wait is undercounted by up to the flush's length (the host queues the call
  while the GPU flushes).
- `flushed`: GPU work alone (a CUDA graph's replay, a copy, a matmul), which waits for nothing on the host: the better
  of two triton.testing.do_bench medians, L2 flushed before every call, so that a call reads its operands from memory
  as it would between two layers of a model.
On a CPU both are perf_counter medians (the whole pipeline is host work; plumbing only).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

LOOPS = 5

Timer = Callable[[Callable], float]


def _on_cpu(fn: Callable, runs: int, untimed_first: bool) -> float:
    """The median of `runs` calls, perf_counter, ms (after one untimed call, with `untimed_first`)."""
    if untimed_first:
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def back_to_back(device: str, rep_ms: int) -> Timer:
    """fn -> ms per call of back-to-back calls (the module's docstring); on a GPU fn is called once untimed first (a
    first call compiles)."""
    if torch.device(device).type != "cuda":
        return lambda fn: _on_cpu(fn, 3, untimed_first=False)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def loop(fn, n: int) -> float:
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n

    def gpu(fn):
        fn()
        one = loop(fn, 1)
        n = max(1, round(rep_ms / LOOPS / max(one, 1e-3)))
        return statistics.median(loop(fn, n) for _ in range(LOOPS))

    return gpu


def flushed(device: str, rep_ms: int) -> Timer:
    """fn -> ms per call of GPU work alone, L2 flushed before every call (the module's docstring)."""
    if torch.device(device).type != "cuda":
        return lambda fn: _on_cpu(fn, 5, untimed_first=True)
    import triton  # here, not at the top: on a CPU kernels._device.configure_triton must run before triton's import

    # the better of two medians: a burst of host noise spoils one at most
    return lambda fn: min(triton.testing.do_bench(fn, warmup=max(rep_ms // 8, 1), rep=rep_ms // 2,
                                                  return_mode="median") for _ in range(2))


@dataclasses.dataclass(frozen=True)
class Timers:
    """The bench's two timers: `eager` for a call as made (host included), `gpu` for GPU work alone."""

    eager: Timer
    gpu: Timer

    @classmethod
    def on(cls, device: str, rep_ms: int) -> Timers:
        return cls(eager=back_to_back(device, rep_ms), gpu=flushed(device, rep_ms))
