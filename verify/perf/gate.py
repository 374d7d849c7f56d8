"""python -m verify.gate --baseline baselines/<gpu>.json [--update]: accuracy and speed against a stored baseline.

Accuracy: the catalogue (verify.cases, this device's sizes) through verify.diff, one process per case; a row
regresses when it FAILs its band, or drops from PASS to WARN. Speed: the whole stage (production pipeline, hybrid
layout and backend) at the catalogue's GATE_POINTS (verify/cases.py), measured in REPEATS interleaved passes. The noise
of each entry is measured, not guessed: a pass's robust relative spread (1.4826 x the median absolute deviation over
the median) gives the standard error of the median of the passes (x 1.253 / sqrt(passes)); an entry regresses when
its median is slower than the baseline's by more than NOISE_FACTOR standard errors of the difference (the baseline's
and this run's combined, each at least the median standard error of all entries). `--update` writes the baseline
instead. `--inject-slowdown F` stalls every timed call by F x the baseline's time for that entry (a GPU sleep that
the count's host read-back waits for, so it lengthens the call whether it is GPU- or host-bound): the gate must then
fail.
Exit codes: 0 no regression, 1 regression, 2 usage error (no baseline, other card).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

from kernels._device import configure_triton, default_device

configure_triton()

import triton  # noqa: E402

from kernels import PRODUCTION, moe_expert_forward  # noqa: E402
from verify import bands  # noqa: E402
from verify.cases import CASES, GATE_POINTS  # noqa: E402
from verify.findings import Verdict  # noqa: E402
from verify.perf import bench, procs  # noqa: E402

REPEATS = 5
NOISE_FACTOR = 3.0
REP_MS = {"cuda": 50, "cpu": 0}


def _device_type() -> str:
    return torch.device(default_device()).type


def accuracy(case_names, jobs: int) -> dict:
    """test_id -> the row's verdict, failed checks and errors (u), for every catalogue row of these cases: one
    `python -m verify.diff --case NAME --json` process per case, `jobs` at a time."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        argvs = [["-m", "verify.diff", "--case", name, "--json", f"{tmp}/{name}.json"] for name in case_names]
        for name, argv, proc in zip(case_names, argvs, procs.run_modules(argvs, jobs), strict=True):
            if proc.returncode not in (0, 1):
                raise RuntimeError(f"verify.diff --case {name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
            with open(argv[-1]) as f:
                for r in json.load(f)["rows"]:
                    m = r["metrics"]
                    rows[r["id"]] = dict(verdict=r["verdict"], checks=r["checks"],
                                         l2_u=m["rel_l2"] / bands.U_BF16 if m else None,
                                         row_u=m["row_err"] / bands.U_BF16 if m else None)
    return rows


def _sleeper(device_type: str):
    """delay_ms -> a function that delays the stream (GPU) or the host (CPU) by about that long."""
    if device_type != "cuda":
        return lambda delay_ms: (lambda: time.sleep(delay_ms / 1e3))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles_per_ms = 10_000_000 / start.elapsed_time(end)
    return lambda delay_ms: (lambda: torch.cuda._sleep(int(delay_ms * cycles_per_ms)))


def speed(points, repeats: int, slowdown: float = 0.0, baseline: dict | None = None) -> dict:
    """entry -> `summary` of its `repeats` interleaved passes (median ms, its standard error, every pass's ms)."""
    device_type = _device_type()
    timer = bench.timer(device_type, REP_MS[device_type])
    sleeper = _sleeper(device_type) if slowdown else None
    calls, weights = {}, {}
    for case, tokens in points:
        weights.setdefault(case.name, bench.draw_weights(case))
        inp = bench.received(case, tokens, weights[case.name])
        stages = PRODUCTION
        entry = f"{case.name}/M={tokens}"
        if slowdown:
            delay = sleeper(slowdown * baseline["speed"][entry]["ms"])

            def count(topk_ids, delay=delay, **kwargs):
                delay()
                return PRODUCTION.count(topk_ids, **kwargs)
            stages = dataclasses.replace(PRODUCTION, count=count)
        calls[entry] = (lambda inp=inp, case=case, stages=stages: moe_expert_forward(
            inp.x, inp.topk_ids, inp.topk_weights, inp.w13, inp.w2, ep_size=case.ep_size,
            num_experts=case.shape.num_experts, stages=stages))
    runs = {entry: [] for entry in calls}
    for _ in range(repeats):
        for entry, fn in calls.items():
            runs[entry].append(timer(fn))
    return {entry: summary(ms) for entry, ms in runs.items()}


def summary(ms: list[float]) -> dict:
    """Median of the passes and its relative standard error, from the median absolute deviation."""
    med = statistics.median(ms)
    sigma = 1.4826 * statistics.median(abs(x - med) for x in ms) / med
    return dict(ms=med, se=1.253 * sigma / math.sqrt(len(ms)), runs=ms)


def compare(baseline: dict, current: dict) -> list[str]:
    """Human-readable regressions (empty: none); prints the full comparison."""
    regressions = []
    print("accuracy:")
    for test_id, now in current["accuracy"].items():
        base = baseline["accuracy"].get(test_id)
        if base is None:
            print(f"  {test_id}: new row ({now['verdict']})")
            continue
        was, verdict = Verdict[base["verdict"]], Verdict[now["verdict"]]
        worse = verdict is Verdict.FAIL or verdict > was  # a FAIL, or a PASS that became a WARN
        if worse:
            failed = ", ".join(now["checks"])
            regressions.append(f"accuracy {test_id}: {base['verdict']} -> {now['verdict']} ({failed})")
    drift = [(now["l2_u"] - baseline["accuracy"][t]["l2_u"], t) for t, now in current["accuracy"].items()
             if t in baseline["accuracy"] and now["l2_u"] is not None and baseline["accuracy"][t]["l2_u"] is not None]
    print(f"  {len(current['accuracy'])} rows, {sum(r['verdict'] != 'FAIL' for r in current['accuracy'].values())} "
          f"pass; largest l2/u increase: " + (", ".join(f"{t} {d:+.3f}" for d, t in sorted(drift)[-3:][::-1])
                                             if drift else "-"))
    errors = [e["se"] for e in baseline["speed"].values()] + [e["se"] for e in current["speed"].values()]
    pooled = statistics.median(errors) if errors else 0.0
    print(f"speed (margin = {NOISE_FACTOR:g} standard errors of the difference of the medians; pooled floor "
          f"{pooled:.2%} per median):")
    print(f"  {'entry':28s} {'baseline ms':>11s} {'now ms':>9s} {'ratio':>7s} {'margin':>7s}")
    for entry, now in current["speed"].items():
        base = baseline["speed"].get(entry)
        if base is None:
            print(f"  {entry:28s} {'-':>11s} {now['ms']:9.3f}  (new entry)")
            continue
        margin = NOISE_FACTOR * math.hypot(max(base["se"], pooled), max(now["se"], pooled))
        ratio = now["ms"] / base["ms"]
        slow = ratio > 1 + margin
        print(f"  {entry:28s} {base['ms']:11.3f} {now['ms']:9.3f} {ratio:7.3f} {margin:7.1%}"
              + ("  REGRESSED" if slow else ""))
        if slow:
            regressions.append(f"speed {entry}: {base['ms']:.3f} -> {now['ms']:.3f} ms ({ratio - 1:+.1%}, margin "
                               f"{margin:.1%})")
    return regressions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m verify.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="baseline JSON (baselines/<gpu>.json)")
    p.add_argument("--update", action="store_true", help="measure and write the baseline instead of comparing")
    p.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="catalogue cases (default: all)")
    p.add_argument("--no-accuracy", action="store_true", help="speed only")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="catalogue cases run at once")
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--inject-slowdown", type=float, default=0.0, metavar="F",
                   help="delay every timed call by F x its baseline time (shows that the gate catches it)")
    p.add_argument("--report", help="write this run's measurements and regressions here (JSON)")
    args = p.parse_args(argv)
    device_type = _device_type()
    card = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    baseline = None
    if not args.update:
        try:
            with open(args.baseline) as f:
                baseline = json.load(f)
        except FileNotFoundError:
            print(f"verify.gate: --baseline {args.baseline} does not exist (create it with --update)", file=sys.stderr)
            return 2
        if baseline["card"] != card:
            print(f"verify.gate: --baseline {args.baseline} was measured on {baseline['card']}, this is {card}",
                  file=sys.stderr)
            return 2
    elif args.inject_slowdown:
        print("verify.gate: --inject-slowdown needs a baseline to compare with, not --update", file=sys.stderr)
        return 2
    cases = args.cases or [c.name for c in CASES]
    current = dict(card=card, torch=torch.__version__, triton=triton.__version__, repeats=args.repeats,
                   noise_factor=NOISE_FACTOR, inject_slowdown=args.inject_slowdown)
    current["accuracy"] = {} if args.no_accuracy else accuracy(cases, args.jobs)
    current["speed"] = speed(GATE_POINTS[device_type], args.repeats, args.inject_slowdown, baseline)
    if args.update:
        with open(args.baseline, "w") as f:
            json.dump(current, f, indent=1)
        print(f"verify.gate: baseline written to {args.baseline} ({len(current['accuracy'])} rows, "
              f"{len(current['speed'])} speed entries, {card})")
        return 0
    regressions = compare(baseline, current)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(dict(current, regressions=regressions), f, indent=1)
    print("\n".join(["REGRESSED:"] + regressions) if regressions else "no regression")
    return 1 if regressions else 0


if __name__ == "__main__":
    raise SystemExit(main())
