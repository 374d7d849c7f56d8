"""python -m verify.gate: a regression gate that does not cry wolf.

    python -m verify.gate --against origin/main     # A/B on this machine: REF's pipeline against the working tree's
    python -m verify.gate --self-test 20            # false alarms (A/A) and detection (3%, 5%, 10% slowed) per point
    python -m verify.gate --baseline baselines/<card>.json [--update]   # against a stored baseline (another machine)

A/B, `--against REF` (the CI gate; REF is any git ref, in CI the merge-base with the target branch:
`--against $(git merge-base origin/main HEAD)`): REF is exported with `git archive` into a temporary folder, and
worker processes (verify/perf/abworker.py), A running REF's `kernels` and B the working tree's, PROCESS_PAIRS (A, B)
pairs of them, time the stage at the catalogue's GATE_POINTS on the same GPU, each pair interleaved (A then B, then
B then A, ...), each timing the ms per call of back-to-back calls. Every point is timed eager (the default call, host
included) and graphed (kernels.GraphedExpertStage, its masked block sized from M, or at large M captured with the
point's counts as host_counts): the replay, the stage's GPU work without the host's noise. Each (point, timing) has
its own verdict from the paired ratios r = B / A of every process pair; either one regressing fails the gate. A
regression needs
- evidence: a one-sided Wilcoxon signed-rank test on log r, p < ALPHA (scipy.stats.wilcoxon: a paired test that
  assumes no normal distribution, so the heavy tails of host noise do not fake significance), and
- an effect: the Hodges-Lehmann estimate of r (the median of the Walsh averages of log r) above --min-effect (3%),
  over every pair's ratios and over each pair's alone. A process has a speed of its own for its whole life (in an H200
  A/A self-test a worker timed up to 6% faster than its twin at the host-bound points, steadily), which one pair's
  ratios, however many, cannot tell from a regression; it fakes one here only if it does so in every pair.
Every effect must also exceed the spread of its log r in this run (the median absolute deviation): noise measured,
not assumed. It matters where the host's noise enters the timing: at an eager point whose GPU is busy less than
HOST_BOUND of its wall time (measured in a third process: `busy_shares`), which is host-bound and reported apart (its
GPU work judged by its graphed timing, whose spread on an H200 was 0.1-1.9%), and on a CPU, where the whole pipeline
is host work: an A/A run on two cores shared with seven other test processes once timed one tiny point's B 1.33x its A
(per pair 1.50 / 1.20, p 0.002) with a spread of 24%, and at min effect alone would have flagged it.
Accuracy: both trees' outputs on every rank row of the catalogue, judged by this tree's bands against this tree's
references; a row that drops a grade (PASS -> WARN -> FAIL) is a regression.

`--baseline PATH` compares with a stored baseline instead (the card-to-card report): its speed entries are normalised
by what this run measures of the machine at the start of every pass (copy bandwidth and dense matmul for the GPU's
share of an entry, a kernel launch's latency for the host's share), so a baseline written on one machine can be
checked on another of the same card. Every entry is stored eager and graphed, with the GEMM backend it ran (another
backend here: no verdict); a graphed timing (GPU work alone) and a GPU-bound eager one regress when the normalised
time exceeds the baseline by more than --min-effect (5% here: what two machines of one card differ by, measured) and
3 standard errors of the two medians and the normalisation.
Host-bound eager timings are reported, not judged, against a stored baseline: on an H200 the same unchanged entry
measured 0.28 ms in one run and 0.59 ms seconds later on the same machine (host stalls that come and go between runs,
which neither the passes' spread nor a launch-latency probe sees); only the paired A/B comparison of --against can
judge them, and their GPU work is judged here by their graphed timing. `--update` writes the baseline.

`--inject-slowdown F` slows the working tree's side by F x each point's time, with a GPU sleep (eager: queued between
the kernel the default call's read waits for and that read, where the host waits for the GPU; graphed: before the
replay; a host sleep on a CPU): the gate must then fail.
`--self-test N` measures the gate itself: N A/A runs (the tree against itself: every flagged point is a false alarm)
and N runs with 3%, 5% and 10% injected.
An entry whose B/A exceeds twice its threshold, and its threshold in every process pair, without the evidence (p >=
ALPHA: too few pairs for the noise measured; with 7 pairs, one the other way leaves p at 2^-6 or more) is UNDECIDED:
"no regression" would claim what was not shown (a 3x injected slowdown once passed so, under heavy CPU contention).
Exit codes: 0 no regression, 1 regression (the working tree's pipeline failing included), 2 usage error (unknown
REF, no baseline, another card) or no verdict (REF's pipeline failing, the GPU out of memory, an UNDECIDED entry and
no regression).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from scipy import stats

from kernels._device import default_device
from verify.cases import CASES, CASES_BY_NAME, GATE_POINTS
from verify.findings import Verdict
from verify.perf import procs
from verify.sweep import Row, Sweep

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALPHA = 0.01
MIN_EFFECT = 0.03
# --baseline: an effect must also exceed what tells two machines of one card apart once normalised: two H200s timed
# unchanged graphed entries up to 2.8% apart, which a 3% floor would leave a fraction of a percent from a false alarm
# on the next machine (docs/design.md, "The regression gate")
BASELINE_MIN_EFFECT = 0.05
HOST_BOUND = 0.6  # GPU busy below this share of the wall time: host-bound
PAIRS = 20
PROCESS_PAIRS = 2  # a process's own speed can fake a regression only if it does so in each pair
MIN_PAIRS = math.ceil(-math.log2(ALPHA))  # all n pairs one way: the smallest one-sided p is 2^-n
REP_MS = {"cuda": 10, "cpu": 1}
REPEATS = 5  # --baseline: interleaved passes per entry
BASELINE_FORMAT = 4  # 4: the probes measured in every pass, their medians and standard errors; 3: probed once
# before the passes; 3 and 4: eager and graphed per entry; 2: eager only; 2-4: ms per call of back-to-back calls
# (verify/perf/timing.py, back_to_back); before: do_bench medians, no field


class UsageError(Exception):
    pass


# ---- workers -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class WorkerFailed(Exception):
    """A worker's request raised (`error`: the exception's class, null if the process died without answering)."""

    label: str
    tree: pathlib.Path
    error: str | None
    message: str
    log: list[str]  # the last lines the worker printed on stderr

    def __str__(self) -> str:
        what = f"{self.error}: {self.message}" if self.error else "died without answering"
        return "\n".join([f"the {self.label} worker ({self.tree}) failed: {what}", *self.log])

    def exit_code(self) -> int:
        """What the failure means for the gate: out of GPU memory says nothing of either tree (2); the working
        tree's pipeline failing is a regression (1); REF's failing leaves nothing to compare with (2)."""
        if self.error == "OutOfMemoryError":
            return 2
        return 1 if self.tree == ROOT else 2


class Worker:
    """One tree's pipeline in its own process (verify/perf/abworker.py), answering JSON requests."""

    def __init__(self, tree: pathlib.Path, label: str):
        self.label, self.tree = label, tree
        # the tree's `kernels` first; the gate's own `verify` and `reference` (plain torch there) from a shim.
        # One hash seed for both: with random ones, two processes of the SAME tree timed a steady 3-5% apart on the
        # CPU in one of three process pairs (the host's Python, dict and set layouts), which every pair of the run
        # then shows alike and the signed-rank test takes for a regression; with one seed, 0 of 15 A/A runs flagged.
        self.shim = shim = pathlib.Path(tempfile.mkdtemp(prefix="gate-shim-"))
        for package in ("verify", "reference"):
            (shim / package).symlink_to(ROOT / package)
        paths = [str(shim), str(tree), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONHASHSEED="0")
        self.log = shim / "stderr.txt"  # what the worker printed: quoted if it dies
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "verify.perf.abworker"], cwd=shim, env=env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    def ask(self, **request) -> dict:
        self.send(**request)
        return self.receive()

    def send(self, **request) -> None:
        """A request whose answer `receive` reads later: several workers work on theirs at once."""
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        answer = json.loads(line) if line else dict(failed=dict(type=None, message=f"exit {self.process.wait()}"))
        if "failed" in answer:
            self.process.wait(timeout=60)  # its traceback written
            raise WorkerFailed(self.label, self.tree, answer["failed"]["type"], answer["failed"]["message"],
                               self.log.read_text().splitlines()[-12:])
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.ask_quietly()
            self.process.wait(timeout=60)
        shutil.rmtree(self.shim, ignore_errors=True)

    def ask_quietly(self) -> None:
        try:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.flush()
        except OSError:
            pass


def export(ref: str) -> pathlib.Path:
    """REF's tree (git archive) in a temporary folder; UsageError naming REF when git cannot resolve it. A folder
    holding a checkout (its `kernels/`) is used as it is, copied."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="gate-ref-"))
    if (pathlib.Path(ref) / "kernels").is_dir():
        shutil.copytree(pathlib.Path(ref) / "kernels", folder / "kernels")
        return folder
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], capture_output=True)
    if archive.returncode:
        raise UsageError(f"--against {ref}: {archive.stderr.decode().strip() or 'git archive failed'}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


# ---- speed ---------------------------------------------------------------------------------------------------------

class Timing(enum.Enum):
    EAGER = "eager"  # the default call, host included (verify/perf/abworker.py: back-to-back calls)
    GRAPHED = "graphed"  # the replay of the stage captured in a CUDA graph: its GPU work alone


def is_host_bound(timing: Timing, busy: float) -> bool:
    """An eager timing whose GPU is busy less than HOST_BOUND of the wall time; a graphed one never is (GPU work
    alone)."""
    return timing is Timing.EAGER and busy < HOST_BOUND


def entry(points, point: int) -> str:
    name, tokens = points[point]
    return f"{name}/M={tokens}"


@dataclasses.dataclass
class SpeedVerdict:
    entry: str
    timing: Timing
    a_ms: float  # median of A's times
    b_ms: float
    ratio: float  # Hodges-Lehmann estimate of B / A over every process pair's ratios
    pair_ratios: list[float]  # the same estimate per process pair
    p_value: float  # one-sided Wilcoxon signed-rank, B slower, every process pair's ratios
    spread: float  # median absolute deviation of log(B / A)
    busy: float  # the share of wall time the GPU spends in kernels (the working tree's, in a process of its own)
    threshold: float  # the effect the ratio, and each pair's, had to exceed
    regressed: bool
    # no verdict: B/A above twice the threshold, and above it in every process pair, without the signed-rank test's
    # evidence (too few pairs for the noise measured: with 7, one the other way leaves p at 2^-6 or more); "no
    # regression" would claim what was not shown. Never set together with `regressed`.
    undecided: bool = False

    @property
    def host_bound(self) -> bool:
        return is_host_bound(self.timing, self.busy)


def _hodges_lehmann(logs: list[float]) -> float:
    """The median of the Walsh averages of log ratios, as a ratio."""
    return math.exp(statistics.median((logs[i] + logs[j]) / 2 for i in range(len(logs)) for j in range(i, len(logs))))


def judge_pairs(entry: str, a: list[list[float]], b: list[list[float]], busy: float, min_effect: float,
                timing: Timing = Timing.EAGER) -> SpeedVerdict:
    """The verdict on paired times, a[k] and b[k] timed by process pair k (see the module docstring)."""
    per_pair = [[math.log(y / x) for x, y in zip(ak, bk, strict=True)] for ak, bk in zip(a, b, strict=True)]
    logs = [v for pair in per_pair for v in pair]
    estimate = _hodges_lehmann(logs)
    pair_ratios = [_hodges_lehmann(pair) for pair in per_pair]
    center = statistics.median(logs)
    spread = statistics.median(abs(v - center) for v in logs)
    p_value = float(stats.wilcoxon(logs, alternative="greater").pvalue) if any(logs) else 1.0
    threshold = max(min_effect, math.expm1(spread))
    in_every_pair = min(pair_ratios) > 1 + threshold
    regressed = p_value < ALPHA and estimate > 1 + threshold and in_every_pair
    undecided = p_value >= ALPHA and estimate > 1 + 2 * threshold and in_every_pair
    return SpeedVerdict(entry, timing, statistics.median(x for ak in a for x in ak),
                        statistics.median(y for bk in b for y in bk), estimate, pair_ratios, p_value, spread, busy,
                        threshold, regressed, undecided)


def points_for(device_type: str) -> list[tuple[str, int]]:
    return [(case.name, tokens) for case, tokens in GATE_POINTS[device_type]]


def busy_shares(tree: pathlib.Path, points, rep_ms: int, device_type: str) -> list[float]:
    """Each point's GPU busy share, measured in a process of its own (1.0 everywhere on a CPU). Never in a timing
    worker: torch.profiler leaves CUPTI attached to the process it ran in, whose launches then stay slower. On an
    H200 the profiled worker of an A/A run timed the three host-bound points (Qwen3-like, gpt-oss-like) 21-24% slower
    than its twin, and the A/B gate flagged one of them."""
    if device_type != "cuda":
        return [1.0] * len(points)
    worker = Worker(tree, "busy")
    try:
        worker.ask(op="setup", points=points, rep_ms=rep_ms, cpus=[], graphed=False)  # profiles the eager call only
        return [worker.ask(op="busy", point=i)["busy"] for i in range(len(points))]
    finally:
        worker.close()


@dataclasses.dataclass(frozen=True)
class Series:
    """One timed series: a point (index into the points) and how it is timed."""

    point: int
    timing: Timing


@dataclasses.dataclass
class Setup:
    """What the workers can time: every point eager, and graphed where every worker has a graphed stage for it."""

    series: list[Series]
    not_graphed: dict[str, str]  # entry -> why it is timed eager only (the first worker's reason)
    added: list[dict]  # per worker, the slowdown its fitted sleeps add ({} unslowed): timing -> per point
    gemm: list  # per point, the first worker's GEMM backend and why it was picked (abworker._auto_gemm)


def setup(workers: list[Worker], points, rep_ms: int, slowdowns, cpus, graphed: bool = True) -> Setup:
    """Every worker set up at once (each its own process), then the slowed ones fitting their sleeps one at a time (on
    a quiet machine)."""
    for worker in workers:
        worker.send(op="setup", points=points, rep_ms=rep_ms, cpus=cpus, graphed=graphed)
    answers = [worker.receive() for worker in workers]
    added = [worker.ask(op="slow", slowdown=slowdown)["added"] if slowdown else {}
             for worker, slowdown in zip(workers, slowdowns, strict=True)]
    why = [next((a["not_graphed"][i] for a in answers if a["not_graphed"][i]), None) for i in range(len(points))]
    series = ([Series(i, Timing.EAGER) for i in range(len(points))]
              + [Series(i, Timing.GRAPHED) for i in range(len(points)) if why[i] is None])
    return Setup(series, {entry(points, i): w for i, w in enumerate(why) if w}, added, answers[0]["gemm"])


def interleaved_times(groups: list[list[Worker]], series: list[Series], rounds: int) -> list[list[list[list[float]]]]:
    """times[series][group][member]: `rounds` rounds, each timing every series once on every worker, group after group,
    a group's members back to back in an order that rotates round by round (two members: A B, then B A, ...)."""
    times = [[[[] for _ in group] for group in groups] for _ in series]
    for r in range(rounds):
        for i, s in enumerate(series):
            for g, group in enumerate(groups):
                shift = r % len(group)
                for w in (*range(shift, len(group)), *range(shift)):
                    ms = group[w].ask(op="time", point=s.point, graphed=s.timing is Timing.GRAPHED)["ms"]
                    times[i][g][w].append(ms)
    return times


def ab_speed(pairs: list[tuple[Worker, Worker]], points, series: list[Series], rounds: int, min_effect: float,
             busy: list[float]) -> list[SpeedVerdict]:
    """`rounds` interleaved rounds per series on every (A, B) process pair, then each series' verdict."""
    times = interleaved_times([list(pair) for pair in pairs], series, rounds)
    return [judge_pairs(entry(points, s.point), [t[0] for t in times[i]], [t[1] for t in times[i]], busy[s.point],
                        min_effect, s.timing) for i, s in enumerate(series)]


def format_speed(verdicts: list[SpeedVerdict], min_effect: float) -> str:
    lines = [f"speed: Wilcoxon signed-rank p < {ALPHA} and Hodges-Lehmann B/A > 1 + threshold (min effect "
             f"{min_effect:.0%}, or the spread measured at the point where larger)",
             f"  {'entry':28s} {'timing':8s} {'A ms':>8s} {'B ms':>8s} {'B/A':>6s} {'per pair':>12s} {'p':>8s} "
             f"{'spread':>7s} {'busy':>5s} {'thresh':>6s}"]
    for host_bound in (False, True):
        rows = [v for v in verdicts if v.host_bound == host_bound]
        if rows and host_bound:
            lines.append(f"  host-bound (eager, GPU busy < {HOST_BOUND:.0%} of the wall time):")
        for v in rows:
            per_pair = "/".join(f"{r:.3f}" for r in v.pair_ratios)
            lines.append(f"  {v.entry:28s} {v.timing.value:8s} {v.a_ms:8.3f} {v.b_ms:8.3f} {v.ratio:6.3f} "
                         f"{per_pair:>12s} {v.p_value:8.1e} {v.spread:7.1%} {v.busy:5.0%} {v.threshold:6.1%}"
                         + ("  REGRESSED" if v.regressed else "  UNDECIDED" if v.undecided else ""))
    return "\n".join(lines)


# ---- accuracy ------------------------------------------------------------------------------------------------------

def accuracy_grades(workers: list[Worker], case_names, seed: int = 0) -> dict[str, list[str]]:
    """row id -> each worker's verdict, over every rank row of the cases (each judged by this tree's bands)."""
    grades = {}
    for name in case_names:
        sweep = Sweep(CASES_BY_NAME[name], lambda *args, **kw: None, seed=seed, device=default_device())
        targets = [t for t in sweep.targets() if t.rank is not None]
        rows = [[t.ep_size, t.rank, str(t.view), str(t.layout)] for t in targets]
        for w in workers:  # the workers judge their rows at once
            w.send(op="grades", case=name, seed=seed, rows=rows)
        answers = [w.receive()["grades"] for w in workers]
        for target, spec in zip(targets, rows, strict=True):
            row_id = Row(name, target.ep_size, target.rank, target.layout, 0, target.view).test_id
            grades[row_id] = [answer["/".join(map(str, spec))] for answer in answers]
    return grades


def accuracy_regressions(grades: dict[str, list[str]]) -> list[str]:
    """A's grade -> B's: a row that drops a grade regresses."""
    return [f"accuracy {row_id}: {a} -> {b}" for row_id, (a, b) in grades.items() if Verdict[b] > Verdict[a]]


# ---- stored baselines ----------------------------------------------------------------------------------------------

def machine_probes(device_type: str) -> dict:
    """What this run measures of the machine: copy GB/s, dense bf16 TFLOP/s, one kernel launch's latency (us)."""
    if device_type != "cuda":
        start = time.perf_counter()
        torch.ones(1) + 1
        return dict(copy_gbps=1.0, matmul_tflops=1.0, launch_us=(time.perf_counter() - start) * 1e6)
    import triton

    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(50):
        a @ a
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    mm_ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    tiny = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(1000):
        tiny.add_(1)
    torch.cuda.synchronize()
    return dict(copy_gbps=2 * src.numel() / copy_ms / 1e6, matmul_tflops=2 * 4096**3 / mm_ms / 1e9,
                launch_us=(time.perf_counter() - start) * 1e3)


def median_se(runs: list[float]) -> tuple[float, float]:
    """The median of `runs` and its relative standard error (from the median absolute deviation: heavy tails)."""
    med = statistics.median(runs)
    sigma = 1.4826 * statistics.median(abs(x - med) for x in runs) / med
    return med, 1.253 * sigma / math.sqrt(len(runs))


def probe_medians(runs: list[dict]) -> dict:
    """Each probe's median over the passes, and (under "se") its relative standard error."""
    fit = {name: median_se([r[name] for r in runs]) for name in runs[0]}
    return dict({name: med for name, (med, _) in fit.items()}, se={name: se for name, (_, se) in fit.items()})


def normalising_factor(busy: float, probes: dict, reference: dict) -> tuple[float, float]:
    """What an entry's ms is multiplied by to be as it would on the `reference` probes' machine (the GPU's share scaled
    by the geometric mean of copy and matmul speed, the host's share by launch latency), and that factor's relative
    standard error from both machines' probe errors: normalising adds the probes' noise to the comparison."""
    se = lambda name: math.hypot(probes["se"][name], reference["se"][name])  # noqa: E731
    gpu = math.sqrt(probes["copy_gbps"] / reference["copy_gbps"] * probes["matmul_tflops"] / reference["matmul_tflops"])
    host = reference["launch_us"] / probes["launch_us"]
    factor = busy * gpu + (1 - busy) * host
    gpu_se = 0.5 * math.hypot(se("copy_gbps"), se("matmul_tflops"))
    return factor, math.hypot(busy * gpu * gpu_se, (1 - busy) * host * se("launch_us")) / factor


def baseline_speed(worker: Worker, points, series: list[Series], repeats: int,
                   probe: Callable[[], dict]) -> tuple[dict, dict]:
    """entry -> the GPU's busy share of its eager call and, per timing the worker has for it, the median ms of
    `repeats` interleaved passes with its standard error; and the machine's probes (`probe_medians`), measured at the
    start of every pass, so that the probes and the entries see the GPU in the same state: a probe taken once, in a
    fresh H200's first run (after a setup that compiled for a minute, the GPU idle), read its matmul 5% faster than
    the four later runs' probes did, scaled every entry by 2.5% and flagged two unchanged ones."""
    runs = {(s.point, s.timing): [] for s in series}
    probes = []
    for _ in range(repeats):
        probes.append(probe())
        for s in series:
            graphed = s.timing is Timing.GRAPHED
            runs[s.point, s.timing].append(worker.ask(op="time", point=s.point, graphed=graphed)["ms"])
    out = {entry(points, i): dict(busy=worker.ask(op="busy", point=i)["busy"])
           for i in range(len(points))}
    for (i, timing), times in runs.items():
        med, se = median_se(times)
        out[entry(points, i)][timing.value] = dict(ms=med, se=se, runs=times)
    return out, dict(probe_medians(probes), runs=probes)


def gemm_differences(base: dict, gemm: dict[str, list[str]]) -> list[str]:
    """Entries whose GEMM backend here (`gemm`: entry -> [name, why auto picked it]) differs from the baseline's
    (DeepGEMM there, not installed here, say): their times would compare different code, and the gate gives no
    verdict. An H200 run whose workers lost deep_gemm wrote a baseline 1.1-5x slower than the one before it, and
    nothing in it said so."""
    return [f"{name}: the baseline ran {b['gemm'][0]}, this run {name_why[0]} ({name_why[1]})"
            for name, name_why in gemm.items()
            if (b := base["speed"].get(name)) is not None and b["gemm"][0] != name_why[0]]


def compare_baseline(base: dict, now: dict, min_effect: float) -> list[str]:
    """Each (entry, timing) of both runs: its time normalised to the baseline's machine over the baseline's. A graphed
    timing is GPU work alone (busy 1); an eager one on a host-bound entry is reported, not judged."""
    regressions = []
    print(f"speed against {base['card']} baseline, normalised by this machine's probes {now['probes']} "
          f"(baseline: {base['probes']}):")
    for name, e in now["speed"].items():
        b = base["speed"].get(name)
        for timing in Timing:
            if timing.value not in e:
                continue
            if b is None or timing.value not in b:
                print(f"  {name:28s} {timing.value:8s} new entry")
                continue
            busy = 1.0 if timing is Timing.GRAPHED else e["busy"]
            factor, factor_se = normalising_factor(busy, now["probes"], base["probes"])
            ratio = e[timing.value]["ms"] * factor / b[timing.value]["ms"]
            margin = max(min_effect, 3 * math.hypot(b[timing.value]["se"], e[timing.value]["se"], factor_se))
            host_bound = is_host_bound(timing, e["busy"])
            slow = ratio > 1 + margin and not host_bound  # a host-bound entry: reported, judged only by --against
            print(f"  {name:28s} {timing.value:8s} {b[timing.value]['ms']:8.3f} -> {e[timing.value]['ms']:8.3f} ms, "
                  f"normalised ratio {ratio:.3f}, margin {margin:.1%}"
                  + (" (host-bound: not judged here)" if host_bound else "") + ("  REGRESSED" if slow else ""))
            if slow:
                regressions.append(f"speed {name} ({timing.value}): normalised {ratio - 1:+.1%} > {margin:.1%}")
    for row_id, now_verdict in now["accuracy"].items():
        was = base["accuracy"].get(row_id)
        if was is not None and Verdict[now_verdict] > Verdict[was]:
            regressions.append(f"accuracy {row_id}: {was} -> {now_verdict}")
    return regressions


# ---- the command ---------------------------------------------------------------------------------------------------

SLOWDOWNS = (0.0, 0.03, 0.05, 0.10)  # --self-test: A/A, then the injected slowdowns


def self_test(runs: int, points, rounds: int, min_effect: float, rep_ms: int, device_type: str, processes: int,
              on_run: Callable[[dict], None] = lambda table: None) -> dict:
    """N runs; per point and per slowdown of SLOWDOWNS, how often the gate flagged it (either timing regressed: what
    makes the gate exit 1), the median B/A it estimated per timing, and what the injected sleeps added (the table so
    far is handed to `on_run` after every run, so a run cut short by a time limit still leaves one).

    `processes` groups of one A worker and one B worker per slowdown (0 is the A/A twin), all of this tree, each group
    timed back to back in an order that rotates round by round (`interleaved_times`); each B is judged against its
    group's A, over the groups, exactly as the gate judges its B against its A over its process pairs. One pass so
    measures the four tables at 5 timings per group instead of 8; an A timing is further from its B's than in the
    gate's A B interleave, which can only add noise: the false-alarm counts are if anything high. The workers live
    for the whole self-test: a process's own speed is drawn once, not once per run as in separate gate runs."""
    busy = busy_shares(ROOT, points, rep_ms, device_type)
    groups = [[Worker(ROOT, f"A{k}"), *(Worker(ROOT, f"B{k}+{s:.0%}") for s in SLOWDOWNS)] for k in range(processes)]
    workers = [w for group in groups for w in group]
    flagged = {s: [0] * len(points) for s in SLOWDOWNS}
    undecided = {s: [0] * len(points) for s in SLOWDOWNS}  # runs where a point had an UNDECIDED timing, none regressed
    ratios = {(s, timing): [[] for _ in points] for s in SLOWDOWNS for timing in Timing}
    try:
        prepared = setup(workers, points, rep_ms, (0.0, *SLOWDOWNS) * processes, procs.shared_cpus(device_type))
        series = prepared.series
        # what each slowdown's sleeps add, per timing and point: the median over the groups (member j of each)
        by_group = [prepared.added[k * len(group):(k + 1) * len(group)] for k, group in enumerate(groups)]
        added = {(slowdown, t.value): [None if by_group[0][j][t.value][i] is None
                                       else statistics.median(group[j][t.value][i] for group in by_group)
                                       for i in range(len(points))]
                 for j, slowdown in enumerate(SLOWDOWNS[1:], start=2) for t in Timing}
        for run in range(runs):
            times = interleaved_times(groups, series, rounds)
            for j, slowdown in enumerate(SLOWDOWNS, start=1):
                regressed, unsure = [False] * len(points), [False] * len(points)
                for i, s in enumerate(series):
                    v = judge_pairs(entry(points, s.point), [t[0] for t in times[i]], [t[j] for t in times[i]],
                                    busy[s.point], min_effect, s.timing)
                    regressed[s.point] |= v.regressed
                    unsure[s.point] |= v.undecided
                    ratios[slowdown, s.timing][s.point].append(v.ratio)
                for i, flag in enumerate(regressed):
                    flagged[slowdown][i] += flag
                    undecided[slowdown][i] += unsure[i] and not flag
            timed = [t for t in Timing if any(x.timing is t for x in series)]
            table = {entry(points, i): dict(
                busy=busy[i], runs=run + 1, flagged={f"{s:.0%}": flagged[s][i] for s in SLOWDOWNS},
                undecided={f"{s:.0%}": undecided[s][i] for s in SLOWDOWNS},
                ratio={t.value: {f"{s:.0%}": statistics.median(ratios[s, t][i]) for s in SLOWDOWNS}
                       for t in timed if ratios[0.0, t][i]},
                added={t.value: {f"{s:.0%}": added[s, t.value][i] for s in SLOWDOWNS[1:]}
                       for t in timed if ratios[0.0, t][i]})
                for i in range(len(points))}
            on_run(table)
            print(f"self-test: run {run + 1}/{runs}: flagged " +
                  ", ".join(f"{s:.0%} {sum(flagged[s])}" for s in SLOWDOWNS) + "; undecided " +
                  ", ".join(f"{s:.0%} {sum(undecided[s])}" for s in SLOWDOWNS), flush=True)
    finally:
        for worker in workers:
            worker.close()
    return table


def format_self_test(table: dict) -> str:
    cols = " ".join(f"{s:>5.0%}" for s in SLOWDOWNS)
    lines = [f"  {'entry':28s} {'busy':>5s}  flagged: {cols}   undecided: {cols}   eager B/A: {cols}   "
             f"graphed B/A: {cols}"]
    for name, row in table.items():
        ratios = [" ".join(f"{row['ratio'][t.value][f'{s:.0%}']:5.3f}" if t.value in row["ratio"] else "    -"
                           for s in SLOWDOWNS) for t in Timing]
        lines.append(f"  {name:28s} {row['busy']:5.0%}           "
                     + " ".join(f"{row['flagged'][f'{s:.0%}']:5d}" for s in SLOWDOWNS) + "             "
                     + " ".join(f"{row['undecided'][f'{s:.0%}']:5d}" for s in SLOWDOWNS)
                     + f"              {ratios[0]}                {ratios[1]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except WorkerFailed as failure:
        print(f"verify.gate: {failure}", file=sys.stderr)
        code = failure.exit_code()
        if code == 1:
            print(f"REGRESSED:\nthe working tree's pipeline failed: {failure.error}: {failure.message}")
        elif failure.error == "OutOfMemoryError":
            print("verify.gate: no verdict: the GPU ran out of memory (fewer workers: --processes 1)", file=sys.stderr)
        else:
            print(f"verify.gate: no verdict: {failure.tree}'s pipeline failed, nothing to compare with",
                  file=sys.stderr)
        return code


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m verify.gate", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--against", metavar="REF", help="A/B against this git ref's pipeline (or a checkout's folder), "
                      "on this machine")
    mode.add_argument("--baseline", metavar="PATH", help="against a stored baseline (baselines/<card>.json)")
    mode.add_argument("--self-test", type=int, metavar="N", help="N A/A runs and N runs per injected slowdown")
    p.add_argument("--update", action="store_true", help="--baseline: measure and write it instead")
    p.add_argument("--pairs", type=int, default=PAIRS, help="interleaved A/B pairs per point and process pair "
                   "(default %(default)s)")
    p.add_argument("--processes", type=int, default=PROCESS_PAIRS, help="A/B process pairs; a regression must show in "
                   "each (default %(default)s)")
    p.add_argument("--min-effect", type=float, help=f"smallest slowdown that counts (0.03 = 3%%; default "
                   f"{MIN_EFFECT * 100:.0f}%% on one machine, {BASELINE_MIN_EFFECT * 100:.0f}%% against a stored "
                   "baseline)")
    p.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="accuracy: catalogue cases (all)")
    p.add_argument("--no-accuracy", action="store_true", help="speed only")
    p.add_argument("--inject-slowdown", type=float, default=0.0, metavar="F",
                   help="slow the working tree's side by F x each point's time (a GPU sleep: eager, before the "
                        "default call's read-back; graphed, before the replay)")
    p.add_argument("--json", help="write the measurements and the verdicts here")
    args = p.parse_args(argv)
    if args.min_effect is None:
        args.min_effect = BASELINE_MIN_EFFECT if args.baseline else MIN_EFFECT
    if args.pairs < MIN_PAIRS:
        print(f"verify.gate: --pairs {args.pairs}: below {MIN_PAIRS} pairs the signed-rank test cannot reach "
              f"p < {ALPHA} (with every pair slower, p = 2^-pairs): nothing could ever be flagged", file=sys.stderr)
        return 2
    if args.processes < 1:
        print(f"verify.gate: --processes {args.processes}: needs at least one A/B process pair", file=sys.stderr)
        return 2
    device_type = torch.device(default_device()).type
    run = Run(args, device_type, torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
              points_for(device_type), REP_MS[device_type], args.cases or [c.name for c in CASES])
    start = time.perf_counter()
    try:
        if args.self_test:
            return run_self_test(run)
        result = run_against(run) if args.against else run_baseline(run)
    except UsageError as exc:
        print(f"verify.gate: {exc}", file=sys.stderr)
        return 2
    if result is None:  # a baseline written
        return 0
    report, regressions, undecided = result
    if regressions:
        print("\n".join(["REGRESSED:", *regressions]))
    elif undecided:  # a slowdown neither shown nor ruled out: "no regression" would claim what was not shown
        print("\n".join(["NO VERDICT (a slowdown seen in every process pair, too noisy to be shown: rerun with more "
                         "--pairs, or on a quieter machine):", *undecided]))
    else:
        print("no regression")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if regressions else 2 if undecided else 0


@dataclasses.dataclass(frozen=True)
class Run:
    """One gate command: its arguments and the machine's facts."""

    args: argparse.Namespace
    device_type: str
    card: str
    points: list[tuple[str, int]]
    rep_ms: int
    cases: list[str]  # accuracy: the catalogue cases judged


def run_self_test(run: Run) -> int:
    """--self-test N: the table of flags per point for A/A and each injected slowdown (exit 0)."""
    args = run.args

    def save(table: dict) -> None:
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(dict(card=run.card, runs=args.self_test, pairs=args.pairs,
                                                               processes=args.processes, table=table), indent=1))

    table = self_test(args.self_test, run.points, args.pairs, args.min_effect, run.rep_ms, run.device_type,
                      args.processes, on_run=save)
    print(f"\nself-test on {run.card}: {args.self_test} runs each, {args.processes} process groups x {args.pairs} "
          f"pairs per point, timed on CPUs {procs.shared_cpus(run.device_type)}")
    print(format_self_test(table))
    return 0


def run_against(run: Run) -> tuple[dict, list[str], list[str]]:
    """--against REF: REF's pipeline (A) and the working tree's (B) interleaved on this machine; (the report, the
    regressions, the undecided entries)."""
    args = run.args
    ref_tree = export(args.against)
    busy = busy_shares(ROOT, run.points, run.rep_ms, run.device_type)
    pairs = [(Worker(ref_tree, f"A{k}"), Worker(ROOT, f"B{k}")) for k in range(args.processes)]
    try:
        prepared = setup([w for pair in pairs for w in pair], run.points, run.rep_ms,
                         (0.0, args.inject_slowdown) * args.processes, procs.shared_cpus(run.device_type))
        verdicts = ab_speed(pairs, run.points, prepared.series, args.pairs, args.min_effect, busy)
        accuracy = {} if args.no_accuracy else accuracy_grades(list(pairs[0]), run.cases)
    finally:
        for pair in pairs:
            for worker in pair:
                worker.close()
        shutil.rmtree(ref_tree, ignore_errors=True)
    print(f"verify.gate: A = {args.against}, B = the working tree, on {run.card}")
    print(format_speed(verdicts, args.min_effect))
    for name, why in prepared.not_graphed.items():
        print(f"  {name}: eager only ({why})")
    if accuracy:
        drops = sum(1 for v in accuracy.values() if v[0] != v[1])
        print(f"accuracy: {len(accuracy)} rank rows judged for both; {drops} changed grade")
    regressions = accuracy_regressions(accuracy) + [
        f"speed {v.entry} ({v.timing.value}): B/A {v.ratio:.3f} (p {v.p_value:.1e}, threshold {v.threshold:.1%})"
        for v in verdicts if v.regressed]
    undecided = [f"speed {v.entry} ({v.timing.value}): B/A {v.ratio:.3f}, per pair "
                 f"{'/'.join(f'{r:.3f}' for r in v.pair_ratios)}, but p {v.p_value:.1e} >= {ALPHA}"
                 for v in verdicts if v.undecided]
    report = dict(card=run.card, against=args.against,
                  speed=[dict(dataclasses.asdict(v), timing=v.timing.value) for v in verdicts],
                  not_graphed=prepared.not_graphed, injected=prepared.added[1::2], accuracy=accuracy,
                  regressions=regressions, undecided=undecided)
    return report, regressions, undecided


def load_baseline(path: str, card: str) -> dict:
    """The stored baseline at `path`, refused (UsageError) when missing, of an older format or of another card."""
    try:
        base = json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--baseline {path} does not exist (create it with --update)") from None
    if base.get("format") != BASELINE_FORMAT:
        raise UsageError(f"--baseline {path} was written by an older gate, which timed differently; write it again "
                         "with --update")
    if base["card"] != card:
        raise UsageError(f"--baseline {path} was measured on {base['card']}, this is {card}")
    return base


def run_baseline(run: Run) -> tuple[dict, list[str], list[str]] | None:
    """--baseline PATH: the working tree measured, normalised by the machine's probes, against the stored baseline
    (the report, the regressions, no undecided entries); with --update the baseline is written instead (None)."""
    args = run.args
    if args.update and args.inject_slowdown:
        raise UsageError("--inject-slowdown has no meaning with --update")
    base = None if args.update else load_baseline(args.baseline, run.card)
    worker = Worker(ROOT, "tree")
    try:
        prepared = setup([worker], run.points, run.rep_ms, [args.inject_slowdown], procs.shared_cpus(run.device_type))
        gemm = {entry(run.points, i): name_why for i, name_why in enumerate(prepared.gemm)}
        differences = [] if base is None else gemm_differences(base, gemm)
        if differences:  # before anything is timed
            raise UsageError("no verdict: other GEMMs than the baseline's:\n  " + "\n  ".join(differences))
        speed, probes = baseline_speed(worker, run.points, prepared.series, REPEATS,
                                       functools.partial(machine_probes, run.device_type))
        for name, name_why in gemm.items():
            speed[name]["gemm"] = name_why
        current = dict(format=BASELINE_FORMAT, card=run.card, probes=probes, speed=speed)
        accuracy = {} if args.no_accuracy else accuracy_grades([worker], run.cases)
        current["accuracy"] = {row_id: grades[0] for row_id, grades in accuracy.items()}
    finally:
        worker.close()
    if args.update:
        pathlib.Path(args.baseline).write_text(json.dumps(current, indent=1))
        print(f"verify.gate: baseline written to {args.baseline} ({len(current['accuracy'])} rows, "
              f"{len(current['speed'])} speed entries, {run.card})")
        return None
    regressions = compare_baseline(base, current, args.min_effect)
    return dict(current, regressions=regressions), regressions, []


if __name__ == "__main__":
    raise SystemExit(main())
