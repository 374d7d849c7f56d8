"""verify.gate: the paired verdict on known numbers (noise alone never regresses; a real slowdown with evidence does;
a host-bound point must beat its own measured spread), the normalisation of a stored baseline, and the CLI on the CPU
(tiny points): the tree against HEAD passes, an injected slowdown fails, usage errors exit 2."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from verify.perf import gate, procs


def pairs(ratio: float, noise: float, n: int = 20, seed: int = 0, processes: int = 2, offsets=None):
    """Timings of `processes` A/B process pairs: B = A x ratio x noise, x each pair's own steady offset of B."""
    rng = random.Random(seed)
    a = [[1.0 * math.exp(rng.gauss(0, noise)) for _ in range(n)] for _ in range(processes)]
    offsets = offsets or [1.0] * processes
    return a, [[x * ratio * off * math.exp(rng.gauss(0, noise)) for x in ak]
               for ak, off in zip(a, offsets, strict=True)]


def test_noise_alone_never_regresses_and_a_real_slowdown_does():
    assert not any(gate.judge_pairs("e", *pairs(1.0, 0.06, seed=s), 1.0, 0.03).regressed for s in range(50))
    slow = gate.judge_pairs("e", *pairs(1.10, 0.02), 1.0, 0.03)
    assert slow.regressed and slow.p_value < gate.ALPHA and 1.07 < slow.ratio < 1.13
    small = gate.judge_pairs("e", *pairs(1.02, 0.005), 1.0, 0.03)  # significant, but below the minimum effect
    assert small.p_value < gate.ALPHA and not small.regressed


def test_a_large_slowdown_without_the_evidence_is_undecided_not_passed():
    """3x slower, but one round in seven the other way (a stall on A's side, the largest |log ratio|): p = 0.15 on
    one process pair, far short of ALPHA. "No regression" would pass it; the verdict is undecided. Noise alone never
    is."""
    a, b = pairs(3.0, 0.01, n=7, processes=1)
    a[0][3] *= 10  # A stalled once: that round's B/A is 0.3
    stalled = gate.judge_pairs("e", a, b, 0.3, 0.03)
    assert stalled.p_value >= gate.ALPHA and stalled.ratio > 2 and not stalled.regressed and stalled.undecided
    assert not any(gate.judge_pairs("e", *pairs(1.0, 0.06, n=7, seed=s), 0.3, 0.03).undecided for s in range(50))
    shown = gate.judge_pairs("e", *pairs(3.0, 0.01, n=7, processes=1), 0.3, 0.03)  # every round the same way
    assert shown.regressed and not shown.undecided


def test_one_process_pairs_steady_offset_is_not_a_regression():
    """A B process 6% slower than its A for its whole life (seen at host-bound points on an H200), in one pair of two:
    significant and above 3% pooled, but the other pair does not show it. In both pairs it is flagged."""
    one = gate.judge_pairs("e", *pairs(1.0, 0.005, offsets=[1.06, 1.0]), 1.0, 0.03)
    assert one.p_value < gate.ALPHA and one.pair_ratios[0] > 1.05 and not one.regressed
    both = gate.judge_pairs("e", *pairs(1.0, 0.005, offsets=[1.06, 1.06]), 1.0, 0.03)
    assert both.regressed and min(both.pair_ratios) > 1.05


def test_every_point_must_beat_its_measured_spread_host_bound_or_not():
    a, b = pairs(1.10, 0.20)  # 10% slower amid 20% noise: not shown
    gpu, host = gate.judge_pairs("e", a, b, 0.9, 0.03), gate.judge_pairs("e", a, b, 0.3, 0.03)
    assert host.host_bound and not gpu.host_bound
    assert gpu.threshold == host.threshold > 0.1 and not gpu.regressed and not host.regressed
    quiet = gate.judge_pairs("e", *pairs(1.10, 0.01), 0.9, 0.03)  # 1% noise: the min effect decides
    assert quiet.threshold == 0.03 and quiet.regressed


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_every_worker_times_on_the_same_two_allowed_cpus():
    allowed = os.sched_getaffinity(0)
    cpus = procs.shared_cpus("cpu")
    assert set(cpus) <= allowed and len(cpus) == min(2, len(allowed)) and cpus == sorted(allowed)[: len(cpus)]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_a_pinned_block_times_on_its_cpus_and_gives_the_callers_back():
    allowed = os.sched_getaffinity(0)
    one = min(allowed)
    with procs.pinned([one]):
        assert os.sched_getaffinity(0) == {one}
    assert os.sched_getaffinity(0) == allowed
    with pytest.raises(RuntimeError), procs.pinned([one]):  # given back when the block raises too
        raise RuntimeError
    assert os.sched_getaffinity(0) == allowed


def test_a_stored_baseline_judges_graphed_timings_and_only_gpu_bound_eager_ones(capsys):
    probes = dict(copy_gbps=4000.0, matmul_tflops=800.0, launch_us=5.0,
                  se=dict(copy_gbps=0.001, matmul_tflops=0.001, launch_us=0.01))
    timing = lambda ms: dict(ms=ms, se=0.001, runs=[ms])  # noqa: E731
    base = dict(card="card", probes=probes, accuracy={}, speed={
        "host-bound/M=1": dict(busy=0.2, eager=timing(1.0), graphed=timing(0.5)),
        "gpu-bound/M=1": dict(busy=0.9, eager=timing(1.0), graphed=timing(0.9))})
    now = dict(base, speed={  # everything 20% slower
        name: dict(busy=e["busy"], eager=timing(e["eager"]["ms"] * 1.2), graphed=timing(e["graphed"]["ms"] * 1.2))
        for name, e in base["speed"].items()})
    regressed = gate.compare_baseline(base, now, 0.03)
    assert [r.split(":")[0] for r in regressed] == [
        "speed host-bound/M=1 (graphed)", "speed gpu-bound/M=1 (eager)", "speed gpu-bound/M=1 (graphed)"]
    assert "host-bound: not judged here" in capsys.readouterr().out
    assert gate.compare_baseline(base, base, 0.03) == []


def test_a_stored_baseline_is_normalised_by_the_machine_and_the_probes_noise_widens_the_margin():
    exact = dict(copy_gbps=0.0, matmul_tflops=0.0, launch_us=0.0)
    base = dict(copy_gbps=4000.0, matmul_tflops=800.0, launch_us=5.0, se=exact)
    slower_gpu = dict(base, copy_gbps=2000.0, matmul_tflops=400.0)  # half the GPU, the same host
    assert gate.normalising_factor(1.0, slower_gpu, base) == pytest.approx((0.5, 0.0))
    assert gate.normalising_factor(0.0, slower_gpu, base) == pytest.approx((1.0, 0.0))
    slower_host = dict(base, launch_us=10.0)
    assert gate.normalising_factor(0.0, slower_host, base) == pytest.approx((0.5, 0.0))
    noisy = dict(base, se=dict(copy_gbps=0.03, matmul_tflops=0.04, launch_us=0.5))  # a GPU entry: copy and matmul
    assert gate.normalising_factor(1.0, noisy, base)[1] == pytest.approx(0.5 * 0.05)

    timing = dict(ms=1.0, se=0.0, runs=[1.0])
    stored = dict(card="card", probes=base, accuracy={}, speed={"e/M=1": dict(busy=1.0, graphed=timing)})
    now = dict(stored, speed={"e/M=1": dict(busy=1.0, graphed=dict(timing, ms=1.04))})
    assert gate.compare_baseline(stored, now, 0.03)  # 4% slower, probes exact: flagged
    assert not gate.compare_baseline(stored, dict(now, probes=noisy), 0.03)  # within 3 x 2.5% of the probes' noise


def test_a_stored_baseline_probes_the_machine_in_every_pass_beside_the_entries():
    from types import SimpleNamespace

    calls = []

    class Worker:
        def ask(self, op, point, graphed=False):
            calls.append(op)
            return dict(ms=1.0 + point, busy=0.5)

    probes = iter([dict(copy_gbps=c, matmul_tflops=800.0, launch_us=5.0) for c in (9.0, 4.0, 4.1, 3.9, 4.0)])
    series = [SimpleNamespace(point=0, timing=gate.Timing.EAGER), SimpleNamespace(point=0, timing=gate.Timing.GRAPHED)]
    speed, measured = gate.baseline_speed(Worker(), [("deepseek-ep8", 64)], series, 5, lambda: calls.append("probe")
                                          or next(probes))
    assert calls == ["probe", "time", "time"] * 5 + ["busy"]
    assert measured["copy_gbps"] == 4.0 and measured["matmul_tflops"] == 800.0  # the odd first pass: outvoted
    assert measured["se"]["matmul_tflops"] == 0.0 < measured["se"]["copy_gbps"] and len(measured["runs"]) == 5
    assert speed["deepseek-ep8/M=64"]["graphed"]["ms"] == 1.0


@pytest.mark.long
def test_the_tree_against_head_passes_and_an_injected_slowdown_fails(tmp_path, capsys):
    report = tmp_path / "gate.json"
    assert gate.main(["--against", "HEAD", "--cases", "single_token", "--pairs", "7", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert len(result["speed"]) == 2 and result["accuracy"] and not result["regressions"]
    assert all(len(v["pair_ratios"]) == gate.PROCESS_PAIRS for v in result["speed"])
    assert all(a == b == "PASS" for a, b in result["accuracy"].values())
    # one process pair, 16 rounds: a stall on A's side turns one round the other way (in ci-local, on two shared CPUs,
    # a tiny point timed 342 ms instead of 64), which leaves p at 2^-6 or more with 7 rounds (the gate then says
    # UNDECIDED, exit 2) and at 0.0026 at most with 16
    assert gate.main(["--against", "HEAD", "--no-accuracy", "--pairs", "16", "--processes", "1",
                      "--inject-slowdown", "2"]) == 1
    assert "REGRESSED" in capsys.readouterr().out


def test_a_point_is_graphed_by_the_decode_capture_else_with_its_counts_else_eager_with_the_reason():
    import gc
    import weakref
    from types import SimpleNamespace

    from verify.perf import abworker

    inp = SimpleNamespace(args=(), local_ids=torch.tensor([[0, -1], [2, 0]]), w13=torch.empty(3, 1, 1))
    stages = []

    class Stage:  # the stage owns the buffers its graph reads
        def __init__(self, host_counts):
            self.graph = SimpleNamespace(replay=lambda: ("counts", host_counts))
            stages.append(weakref.ref(self))

    def stage_type(fail_decode: bool, fail_counts: bool):
        def make(*args, host_counts=None, **kw):
            if (host_counts is None and fail_decode) or (host_counts is not None and fail_counts):
                raise ValueError("x: over the masked budget" if host_counts is None else "no room")
            return Stage(host_counts)
        return make

    def replayed(**fails):
        replay, why = abworker._graphed(SimpleNamespace(GraphedExpertStage=stage_type(**fails)), inp, {})
        gc.collect()
        assert stages[-1]() is not None, "the stage was freed while its graph is still replayed"
        return replay(), why

    assert replayed(fail_decode=False, fail_counts=True) == (("counts", None), None)
    assert replayed(fail_decode=True, fail_counts=False) == (("counts", [2, 0, 1]), None)
    assert abworker._graphed(SimpleNamespace(GraphedExpertStage=stage_type(True, True)), inp, {}) == (
        None, "ValueError: no room")
    assert abworker._graphed(SimpleNamespace(), inp, {})[1] == "this tree has no kernels.GraphedExpertStage"

    pools = []  # a tree whose stage takes a memory pool shares the worker's among its points; one that does not, not

    def with_pool(*args, pool=None, host_counts=None, **kw):
        pools.append(pool)
        return Stage(host_counts)

    abworker._graphed(SimpleNamespace(GraphedExpertStage=with_pool), inp, {}, pool="the worker's")
    abworker._graphed(SimpleNamespace(GraphedExpertStage=stage_type(False, False)), inp, {}, pool="the worker's")
    assert pools == ["the worker's"]


@pytest.mark.parametrize("hidden", [0.0, 0.04, 0.5])
def test_an_injected_sleep_is_fitted_to_what_it_adds(hidden):
    """A sleep adds its length less what hides where the GPU would have waited anyway (`hidden`, in units of the
    call's time): the fitted sleep adds the asked share where that hidden part is small, and where no sleep up to four
    times the share can add it, what it adds is reported as it is."""
    from verify.perf import abworker

    def slow(delay_ms):  # the callable the fit times: it reports its modelled time
        return lambda: 1.0 + max(delay_ms - hidden, 0.0)

    def timer(fn):
        return fn() * math.exp(random.gauss(0, 0.002))

    random.seed(0)
    for fraction in (0.03, 0.05, 0.10):
        _, added = abworker._fitted(lambda ms: ms, timer, lambda: 1.0, slow, fraction)
        assert added == pytest.approx(fraction if hidden <= 3 * fraction else 0.0, abs=0.01)


@pytest.mark.extended  # the A/B run against HEAD checks the same verdict; this tabulates it per slowdown
def test_the_self_test_tabulates_flags_ratios_and_what_the_sleeps_added(tmp_path):
    report = tmp_path / "self-test.json"
    assert gate.main(["--self-test", "1", "--pairs", str(gate.MIN_PAIRS), "--processes", "1", "--json",
                      str(report)]) == 0
    table = json.loads(report.read_text())["table"]
    assert set(table) == {f"{name}/M={tokens}" for name, tokens in gate.points_for("cpu")}
    for row in table.values():
        assert row["runs"] == 1 and all(row["flagged"][f"{s:.0%}"] in (0, 1) for s in gate.SLOWDOWNS)
        assert set(row["ratio"]) == {"eager"} and set(row["ratio"]["eager"]) == {f"{s:.0%}" for s in gate.SLOWDOWNS}
        assert set(row["added"]["eager"]) == {f"{s:.0%}" for s in gate.SLOWDOWNS[1:]}
        assert all(math.isfinite(added) for added in row["added"]["eager"].values())  # measured: noisy on a busy CPU


@pytest.mark.long
def test_a_stored_baseline_is_written_and_a_much_slower_run_against_it_fails(tmp_path, capsys):
    baseline = tmp_path / "cpu.json"
    assert gate.main(["--baseline", str(baseline), "--update", "--no-accuracy"]) == 0
    written = json.loads(baseline.read_text())
    assert written["format"] == gate.BASELINE_FORMAT and written["card"] == "cpu"
    assert set(written["speed"]) == {f"{name}/M={tokens}" for name, tokens in gate.points_for("cpu")}
    assert all(entry["gemm"][0] == "loop" for entry in written["speed"].values())  # the CPU's auto GEMM
    for entry in written["speed"].values():  # as if stored on a machine 100x faster: far past any CPU's noise
        entry["eager"]["ms"] /= 100
    baseline.write_text(json.dumps(written))
    assert gate.main(["--baseline", str(baseline), "--no-accuracy"]) == 1
    next(iter(written["speed"].values()))["gemm"] = ["deep_gemm", "auto -> deep_gemm"]  # written with DeepGEMM
    baseline.write_text(json.dumps(written))
    assert gate.main(["--baseline", str(baseline), "--no-accuracy"]) == 2  # other GEMMs: no verdict
    assert "the baseline ran deep_gemm, this run loop" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, capsys):
    def refused(*argv, says: str) -> bool:
        return gate.main(list(argv)) == 2 and says in capsys.readouterr().err

    assert refused("--against", "HEAD", "--pairs", str(gate.MIN_PAIRS - 1), says="could ever be flagged")
    assert refused("--against", "HEAD", "--processes", "0", says="--processes")
    assert refused("--against", "no-such-ref-anywhere", "--no-accuracy", says="no-such-ref-anywhere")
    assert refused("--baseline", str(tmp_path / "none.json"), "--no-accuracy", says="does not exist")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(format=gate.BASELINE_FORMAT, card="NVIDIA H20", probes={}, speed={}, accuracy={})))
    assert refused("--baseline", str(other), "--no-accuracy", says="measured on NVIDIA H20")
    other.write_text(json.dumps(dict(card="cpu", probes={}, speed={}, accuracy={})))  # an older gate's baseline
    assert refused("--baseline", str(other), "--no-accuracy", says="older gate")


def test_a_failing_worker_is_reported_as_data_with_what_it_printed():
    worker = gate.Worker(gate.ROOT, "X")
    try:
        with pytest.raises(gate.WorkerFailed) as failed:
            worker.ask(op="setup", points=[["no-such-case", 1]], rep_ms=1, cpus=[])
    finally:
        worker.close()
    failure = failed.value
    assert (failure.label, failure.error, failure.message) == ("X", "KeyError", "'no-such-case'")
    assert any("KeyError" in line for line in failure.log)  # its traceback, quoted


def test_what_a_failing_worker_means_for_the_gate():
    def failed(tree, error):
        return gate.WorkerFailed("w", tree, error, "", [])

    assert failed(gate.ROOT, "AcceleratorError").exit_code() == 1  # the working tree is broken: a regression
    assert failed(gate.ROOT, None).exit_code() == 1  # it died without answering
    assert failed(gate.ROOT.parent, "AcceleratorError").exit_code() == 2  # REF is: nothing to compare with
    assert failed(gate.ROOT, "OutOfMemoryError").exit_code() == 2  # the machine is: no verdict on either
