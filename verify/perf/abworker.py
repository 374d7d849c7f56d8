"""One side of verify.gate's A/B comparison: a process that runs one tree's pipeline and answers the gate.

The gate starts two of these, `python -m verify.perf.abworker`, one per tree, each with that tree's `kernels` first on
its import path (and the gate's own `verify` and `reference`, which never import `kernels` in the modules used here:
verify.cases and reference are plain torch). Each process owns its CUDA context and module state; the two never
share anything but the GPU. It reads one JSON request per line on stdin and writes one JSON answer per line:

- {"op": "setup", "points": [[bench case, M], ...], "rep_ms": R, "cpus": [...], "graphed": bool (true)}: build each
  point's inputs (verify.cases.BenchCase.received), and on a GPU, unless "graphed" is false, its graphed stage
  (`_graphed`: the stage's GPU work without the host); answers, per point, why it has none (null where it has one)
  and the GEMM backend it runs with (`_auto_gemm`).
- {"op": "slow", "slowdown": F}: from now on every timed call takes about (1 + F) x its time, with a GPU sleep (a
  host sleep on a CPU) whose length is fitted here (`_fitted`): the eager call's queued between the kernel its read
  waits for (the count's, or the early route + scatter's) and that read, where the default call's host waits for the
  GPU (`_read_delayed`); the graphed call's before the replay; answers the slowdown each adds, measured. (A sleep
  queued before the eager stage ran while the host was still launching the count, and hid in the idle GPU: an H200
  self-test rarely flagged 10% at host-bound points. And a sleep's length is not what it adds: sized once at setup,
  sleeps of 10% added 3.1% to DeepSeek-like M = 1024's replay, and one of 5% added 43% to M = 4096's eager call, in
  an H200 self-test.)
- {"op": "time", "point": i, "graphed": bool}: point i's ms per call (verify/perf/timing.py, `back_to_back`), timed
  on the setup's `cpus` (the gate gives every worker the same ones; none: wherever the scheduler puts it).
- {"op": "busy", "point": i}: the share of point i's wall time that the GPU spends in kernels (torch.profiler).
- {"op": "grades", "case": name, "seed": S, "rows": [[ep, rank, view, layout], ...]}: the pipeline's output on each
  catalogue rank view, judged by the gate's bands (verify.bands, verify.metrics and reference: no `kernels` in them)
  against the gate's references: each row's verdict.
- {"op": "quit"}.
A request that raises is answered {"failed": {"type": exception class, "message": its first line}}, and the worker
exits with its traceback on stderr (a CUDA error leaves the process unusable).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import statistics
import sys
import time

import torch


def _delay(device: str, ms: float):
    """A callable that delays the stream (GPU sleep kernel) or the host by about `ms`."""
    if ms <= 0:
        return lambda: None
    if device != "cuda":
        return lambda: time.sleep(ms / 1e3)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles = int(ms * 10_000_000 / start.elapsed_time(end))
    return lambda: torch.cuda._sleep(cycles)


def _read_delayed(call, kernels):
    """delay -> `call` with `delay` queued between the kernel(s) that the default call's read waits for and that
    read: the count's kernel, or, in a tree whose sync="before" scatters before its read (`scatter_before_read`),
    the route + scatter's as well (whichever the call runs)."""

    def slow(delay):
        def count(topk_ids, **where):
            routing = kernels.scatter.route_local_experts(topk_ids, **where)
            delay()
            return kernels.scatter.read_counts(routing, where["num_experts"])

        change = dict(count=count)
        if hasattr(kernels.PRODUCTION, "scatter_before_read"):
            def route_scatter_masked(*args, **kwargs):
                scattered = kernels.scatter.route_scatter_masked(*args, **kwargs)
                delay()
                return scattered

            change.update(route_scatter_masked=route_scatter_masked)
        return functools.partial(call, stages=dataclasses.replace(kernels.PRODUCTION, **change))

    return slow


def _graphed(kernels, inp, kw, pool=None):
    """(the replay of the stage captured for these inputs, None) or (None, why not). The decode capture
    (kernels.GraphedExpertStage: the masked block sized from M); where that block is over the budget (large M), the
    capture given the point's counts as host_counts (the layout those counts choose, as DeepEP's dispatch allows).
    A tree that cannot capture a point has it timed eager only, and the gate says why. `pool`: the memory pool the
    worker's stages share (they replay one at a time), where the tree's stage takes one."""
    stage_type = getattr(kernels, "GraphedExpertStage", None)
    if stage_type is None:
        return None, "this tree has no kernels.GraphedExpertStage"
    from reference.layouts import expert_counts

    shared = dict(pool=pool) if pool is not None and "pool" in inspect.signature(stage_type).parameters else {}
    why = None
    for options in (shared, dict(shared, host_counts=expert_counts(inp.local_ids, inp.w13.shape[0]).tolist())):
        try:
            stage = stage_type(*inp.args, **kw, **options)
            return (lambda stage=stage: stage.graph.replay()), None  # the stage kept: it owns the buffers read
        except Exception as exc:
            why = exc
            if not isinstance(exc, ValueError):  # a ValueError: the decode block over the budget, so try the counts
                break
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # what a failed capture left queued, done before anything is timed
    return None, f"{type(why).__name__}: {why}".splitlines()[0][:200]


def _fitted(delay_of, timer, fn, slow, fraction: float, rounds: int = 3, reps: int = 3):
    """(slow(delay), the slowdown it adds) where the delay (`delay_of(ms)`) makes fn take about (1 + fraction) x its
    time here: `rounds` corrections of the delay's length by what it missed (each from the median of `reps`
    interleaved ratios), kept between fraction x fn's time (a sleep adds at most its length) and four times that."""
    base = timer(fn)
    ms = fraction * base

    def added(delayed) -> float:
        return statistics.median(timer(delayed) / timer(fn) for _ in range(reps)) - 1

    for _ in range(rounds):
        got = added(slow(delay_of(ms)))
        ms = min(max(ms + (fraction - got) * base, fraction * base), 4 * fraction * base)
    delayed = slow(delay_of(ms))
    return delayed, added(delayed)


def _after(delay, fn):
    def delayed():
        delay()
        fn()

    return delayed


def _busy(fn, device: str) -> float:
    """GPU kernel time / wall time over five calls (1.0 on a CPU)."""
    if device != "cuda":
        return 1.0
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())  # each kernel's time, once
    return min(kernel_us / wall_us, 1.0)


def _grades(forward, case, seed: int, rows, device: str) -> dict[str, str]:
    """Each rank row's verdict by the bands: the pipeline's output against the faithful and exact references."""
    from reference import moe_reference
    from verify import bands
    from verify.cases import make_problem
    from verify.findings import Verdict, worst
    from verify.metrics import compare

    problem = make_problem(case, seed, device, "gpu" if device == "cuda" else "cpu")
    table = bands.bands_for(problem.sizes.hidden, problem.sizes.inter)
    grades = {}
    for ep, rank, view_kind, layout in rows:
        view = problem.view(case, ep, rank, view_kind)
        w13, w2 = problem.rank_weights(ep, rank)
        args = (view.x, view.topk_ids, view.topk_weights, w13, w2)
        kw = dict(ep_size=ep, ep_rank=rank, num_experts=problem.sizes.num_experts)
        try:
            out = forward(*args, **kw, layout=layout)
        except Exception:  # a crash is a failing row
            grades[f"{ep}/{rank}/{view_kind}/{layout}"] = Verdict.FAIL.name
            continue
        references = [moe_reference(*args, **kw, mode=mode) for mode in ("faithful", "exact")]
        metrics = compare(out.float(), *references, view.local_ids())
        grades[f"{ep}/{rank}/{view_kind}/{layout}"] = worst(bands.judge(metrics, table)).name
    return grades


def _auto_gemm(device: str, case) -> list[str] | None:
    """[name, why] of the GEMM backend gemm="auto" runs `case` with, in this tree and this environment (a machine
    without deep_gemm runs other GEMMs: its times say nothing about a baseline's); None from a tree that cannot say."""
    try:  # an older tree (a REF) may have no select, or another one: nothing it cannot say may fail its setup
        from kernels.gemm import select

        backend, why = select("auto", device, case.shape.hidden, case.shape.inter)
        return [backend.name, why]
    except Exception:
        return None


def main() -> int:
    import kernels  # the tree under test's pipeline: first on sys.path
    from kernels._device import default_device
    from verify.cases import BENCH_CASES, CASES_BY_NAME
    from verify.perf import procs, timing

    device = default_device()
    calls, graphs = [], []
    timer = None
    every_cpu = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    timing_cpus = None
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request["op"]
            if op == "quit":
                break
            if op == "setup":
                procs.run_on(every_cpu)
                timer = timing.back_to_back(device, request["rep_ms"])
                timing_cpus = request.get("cpus")
                calls, graphs, not_graphed, gemm = [], [], [], []
                pool = torch.cuda.graph_pool_handle() if device == "cuda" else None  # one for all its graphs
                weights = {}
                for name, tokens in request["points"]:
                    case = BENCH_CASES[name]
                    key = (case.shape, case.num_local_experts)  # the same draw: held once (DeepSeek's are 2.8 GB)
                    weights.setdefault(key, case.draw_weights())
                    inp = case.received(tokens, weights[key])
                    kw = dict(ep_size=case.ep_size, num_experts=case.shape.num_experts)
                    calls.append(functools.partial(kernels.moe_expert_forward, *inp.args, **kw))
                    calls[-1]()  # compiled before anything is timed
                    if device != "cuda":
                        graph, why_not = None, "no CUDA graphs on a CPU"
                    elif not request.get("graphed", True):
                        graph, why_not = None, "not asked for"
                    else:
                        graph, why_not = _graphed(kernels, inp, kw, pool)
                    graphs.append(graph)
                    not_graphed.append(why_not)
                    gemm.append(_auto_gemm(device, case))
                answer = dict(points=len(calls), device=device, not_graphed=not_graphed, gemm=gemm,
                              card=torch.cuda.get_device_name() if device == "cuda" else "cpu")
            elif op == "slow":
                procs.run_on(timing_cpus)
                fraction = request["slowdown"]
                delay_of = functools.partial(_delay, device)
                rounds = 3 if device == "cuda" else 1  # a host sleep adds its length: one check is enough
                added = {"eager": [], "graphed": []}
                for i, call in enumerate(calls):
                    calls[i], got = _fitted(delay_of, timer, call, _read_delayed(call, kernels), fraction, rounds)
                    added["eager"].append(got)
                    got = None
                    if graphs[i] is not None:
                        graphs[i], got = _fitted(delay_of, timer, graphs[i], functools.partial(_after, fn=graphs[i]),
                                                 fraction, rounds)
                    added["graphed"].append(got)
                answer = dict(added=added)
            elif op == "time":
                procs.run_on(timing_cpus)
                answer = dict(ms=timer((graphs if request.get("graphed") else calls)[request["point"]]))
            elif op == "busy":
                answer = dict(busy=_busy(calls[request["point"]], device))
            elif op == "grades":
                procs.run_on(every_cpu)
                answer = dict(grades=_grades(kernels.moe_expert_forward, CASES_BY_NAME[request["case"]],
                                             request["seed"], request["rows"], device))
            else:
                raise ValueError(f"unknown op {op!r}")
            print(json.dumps(answer), flush=True)
    except Exception as exc:  # answered as data (the gate decides what it means), then the traceback
        print(json.dumps(dict(failed=dict(type=type(exc).__name__, message=str(exc).split("\n")[0][:300]))),
              flush=True)
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
