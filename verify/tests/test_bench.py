"""verify/perf: the bench, its report and the peers: the targets and the layout fit computed right on known numbers,
the CLI's plumbing on the CPU (tiny shapes), and the committed GPU results consistent with the layout rule the
executor ships. (The gate: test_gate.py.)"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

from kernels import executor
from kernels.gemm import BACKENDS, availability, select
from verify.diff import main as diff_main
from verify.perf import bench, procs, report
from verify.perf.timing import Timers


def _point(tokens=4096, mean_rows=64.0, masked=1.0, contiguous=1.2, layout="masked", block=1 << 20, **ms):
    times = {"whole/deep_gemm/masked": masked, "whole/deep_gemm/contiguous": contiguous,
             "whole/triton/masked": 2 * masked, "whole/triton/contiguous": 2 * contiguous, "hybrid": masked,
             "torch_native": 2.0, "gemm1/deep_gemm/masked": 0.5, "gemm2/deep_gemm/masked": 0.3,
             "scatter/masked": 0.1, "gather/masked": 0.1, "dense": 0.8, "graphed": 0.275, "decode": 0.3}
    times.update(ms)
    return dict(case="c", shape="deepseek", tokens=tokens, slots=2 * tokens, hidden=1024, inter=512,
                mean_rows=mean_rows, weight_bytes=10**9, io_bytes=10**6, flops=10**12, masked_block_bytes=block,
                auto_layout=layout, auto_backend="deep_gemm", ms=times,
                accuracy={"hybrid": {"l2_u": 0.3, "verdict": "PASS"}})


CEILINGS = {"copy_gbps": 4000.0, "peak_tflops": 800.0}


def test_targets_are_the_declared_ratios():
    results = {"ceilings": CEILINGS, "points": [_point(tokens=256)]}
    got = {t["name"]: t for t in report.evaluate(results)}
    assert got["gemm_share"]["rows"][0]["value"] == pytest.approx(0.8)
    assert not got["gemm_share"]["rows"][0]["met"]
    assert got["gemm_share_gpu"]["total"] == 0  # no graphed stage times in this run
    graphed = {"graphed/count": 0.01, "graphed/scatter/masked": 0.02, "graphed/gemm1/deep_gemm/masked": 0.45,
               "graphed/silu/masked": 0.02, "graphed/gemm2/deep_gemm/masked": 0.3, "graphed/gather/masked": 0.03}
    summed = _point(tokens=4096, **graphed)
    del summed["ms"]["graphed"]  # no whole graphed stage at this M: its stages summed
    whole = _point(**graphed, graphed=0.85)  # the whole stage captured: its graph's time
    share = {t["name"]: t for t in report.evaluate({"ceilings": CEILINGS, "points": [summed, whole]})}
    assert [r["value"] for r in share["gemm_share_gpu"]["rows"]] == pytest.approx([0.75 / 0.83, 0.75 / 0.85])
    assert got["decode_floor"]["rows"][0]["value"] == pytest.approx(1.0 / (1e9 / 4000e6))
    assert got["decode_graphed_deepseek"]["rows"][0]["value"] == pytest.approx(1.1)  # floor: 1 GB at 4000 GB/s
    assert got["decode_eager_deepseek"]["rows"][0]["value"] == pytest.approx(1.2)
    assert got["decode_graphed_qwen3"]["total"] == 0  # another shape
    assert got["vs_torch_native_small"]["rows"][0]["value"] == pytest.approx(2.0)
    assert got["vs_torch_native_large"]["total"] == 0  # M = 256 is not >= 4096
    assert got["auto_backend"]["rows"][0]["value"] == pytest.approx(1.0)
    assert got["hybrid_layout"]["rows"][0]["value"] == pytest.approx(1.0)
    big = {"ceilings": CEILINGS, "points": [_point(block=executor.MASKED_BLOCK_BUDGET_BYTES + 1)]}
    memory = {t["name"]: t for t in report.evaluate(big)}["hybrid_memory"]
    assert memory["met"] == 0 and memory["total"] == 1
    scatter = {t["name"]: t for t in report.evaluate(big)}["scatter_bw"]["rows"][0]["value"]
    assert scatter == pytest.approx(2 * 8192 * 1024 * 2 / 0.1 / 1e6 / 4000.0)
    assert report.over_same_size_copy(whole, "gather") is None  # no copy of the same bytes in this run
    copied = _point(**graphed, **{"copy/gather": 0.021})
    assert report.over_same_size_copy(copied, "gather") == pytest.approx(0.7)  # the graphed gather: 0.03 ms
    assert report._bandwidth_cell(copied, "gather", CEILINGS).endswith("(0.70)")  # the report's cell: "x (same-size)"
    large = {"ceilings": CEILINGS, "points": [_point(tokens=4096, **graphed, **{"copy/gather": 0.0209}),
                                              _point(tokens=4096, **graphed)]}  # the second: no copy in its run
    same_size = {t["name"]: t for t in report.evaluate(large)}
    assert same_size["gather_vs_same_size_copy"]["total"] == 1 and same_size["gather_vs_same_size_copy"]["met"] == 0
    assert same_size["gather_vs_same_size_copy"]["rows"][0]["value"] == pytest.approx(0.0209 / 0.03)
    assert same_size["scatter_vs_same_size_copy"]["total"] == 0
    # a GPU run that reads bandwidths by kernel spans, the large copy's included
    spans = _point(tokens=4096, **graphed, **{"copy/gather": 0.021, "kernels/gather/masked": 0.02,
                                              "kernels/copy/gather": 0.018})
    ceil = dict(CEILINGS, copy_kernel_gbps=4100.0)
    assert report.over_copy_bandwidth(spans, "gather", ceil) == pytest.approx((8192 + 4096) * 1024 * 2 / 0.02 / 1e6
                                                                              / 4100.0)
    assert report.over_copy_bandwidth(copied, "gather", ceil) == pytest.approx((8192 + 4096) * 1024 * 2 / 0.03 / 1e6
                                                                               / 4000.0)  # graphed: do_bench's copy
    assert report.over_same_size_copy(spans, "gather") == pytest.approx(0.9)  # spans over spans, not 0.021 / 0.03


@pytest.mark.gpu
def test_kernel_span_times_each_call_from_its_first_kernel_to_its_last():
    x = torch.zeros(1 << 24, device="cuda")
    one = bench.kernel_span_ms(lambda: x.add_(1), "cuda")
    two = bench.kernel_span_ms(lambda: (x.add_(1), x.mul_(2)), "cuda")  # two kernels per call, back to back
    assert 0 < one and 1.6 * one < two < 3 * one


def test_each_layout_is_read_with_the_backend_auto_runs_it_on():
    """A point whose masked Dispatch goes to another backend than the contiguous one (the skinny kernel at decode
    sizes) compares the layouts as the hybrid would run them; a run from before that was recorded, with one backend."""
    p = _point(masked=1.0, contiguous=1.2, **{"whole/triton/masked": 0.9, "gemm1/triton/masked": 0.4,
                                               "gemm2/triton/masked": 0.2})
    p.update(auto_backend="triton", auto_backends={"masked": "triton", "contiguous": "deep_gemm"})
    assert report.masked_over_contiguous(p) == pytest.approx(0.9 / 1.2)
    assert report.gemm_share(p) == pytest.approx(0.6 / 0.9)
    assert report.fit_layout_rule([p])["worst_excess"] == 0.0  # masked (0.9) the better layout, as the hybrid runs it
    assert report.masked_over_contiguous(_point(masked=1.0, contiguous=1.2)) == pytest.approx(1.0 / 1.2)


def test_layout_fit_finds_the_crossover_and_respects_the_budget():
    points = [_point(mean_rows=r, masked=1.0, contiguous=1.1 if r <= 256 else 0.9) for r in (8, 64, 256, 1024, 4096)]
    fit = report.fit_layout_rule(points)
    assert 256 < fit["threshold"] < 1024 and fit["worst_excess"] == 0.0
    # a masked block over the budget must go contiguous whatever the threshold: the fit pays its excess
    points.append(_point(mean_rows=8, masked=1.0, contiguous=1.5, block=executor.MASKED_BLOCK_BUDGET_BYTES + 1))
    assert report.fit_layout_rule(points)["worst_excess"] == pytest.approx(0.5)


def test_bench_cli_on_the_cpu_writes_points_report_and_plot(tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    assert bench.main(["--case", "tiny", "--tokens", "16", "--backends", "loop", "grouped_mm", "--json", str(out),
                       "--plot", str(png)]) == 0
    results = json.loads(out.read_text())
    (point,) = results["points"]
    expected = {"count", "scatter/masked", "gemm1/loop/contiguous", "silu/masked", "gemm2/grouped_mm/masked",
                "gather/contiguous", "whole/loop/masked", "hybrid", "torch_native", "reference", "dense",
                "copy/scatter", "copy/gather"}
    assert expected <= set(point["ms"]) and not point["errors"]
    assert all(v > 0 for v in point["ms"].values())
    assert all(a["verdict"] != "FAIL" for a in point["accuracy"].values()), point["accuracy"]
    assert {t["name"] for t in results["report"]["targets"]} == {t.name for t in report.TARGETS}
    assert png.stat().st_size > 10_000
    assert results["cpus"] == procs.shared_cpus("cpu")  # timed where the gate's workers time
    if hasattr(os, "sched_getaffinity"):
        assert os.sched_getaffinity(0) == affinity  # and the caller's CPUs given back
    assert bench.main(["--from-json", str(out)]) == 0  # re-reports without measuring


def test_the_bench_times_the_backends_asked_for_and_the_one_auto_picks_and_refuses_an_unavailable_one(capsys):
    case = bench.BENCH_CASES["tiny"]
    auto = select("auto", case.device, case.shape.hidden, case.shape.inter)[0].name
    others = [b for b in ("loop", "grouped_mm") if b != auto]
    assert bench.available_backends(case, others[:1]) == [others[0], auto]  # the report reads auto's whole stage
    assert bench.available_backends(case, [auto]) == [auto]
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench.main(["--case", "tiny", "--tokens", "16", "--backends", "deep_gemm"]) == 2
    assert "--backends deep_gemm: DeepGEMM runs on CUDA GPUs only" in capsys.readouterr().err


# the Triton GEMM's tiles also cover padding rows (unspecified contents: NaN patterns and huge finite values
# included) and the interpreter warns there (as in test_reliability's sanitizer workload)
@pytest.mark.long
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered in (matmul|add):RuntimeWarning")
def test_the_point_names_the_backend_the_hybrid_call_runs(monkeypatch):
    """Where kernels.gemm.for_dispatch gives the hybrid call's masked Dispatch to another backend (on a GPU, a
    decode-sized block to the Triton skinny kernel; stood in for here), the point's auto_backend names that backend,
    so the report reads its GEMMs and its whole stage, both timed."""
    case = bench.BENCH_CASES["tiny"]
    ok, why = availability("triton", case.device, case.shape.hidden, case.shape.inter)
    if not ok:
        pytest.skip(why)
    asked = []

    def skinny(backend, dispatch, hidden, inter):
        asked.append(dispatch)
        return BACKENDS["triton"]

    monkeypatch.setattr(bench, "for_dispatch", skinny)
    # each configuration run once: the names are what is checked, and which timer timed each
    timers = Timers(eager=lambda fn: (fn(), 1.0)[1], gpu=lambda fn: (fn(), 2.0)[1])
    point = bench.measure_point(case, 16, case.draw_weights(), ["loop", "triton"], timers)
    assert point["auto_layout"] == "masked"  # tiny at M = 16: a small block
    assert [d.layout for d in asked] == ["masked"] and asked[0].counts_host is not None  # the synced call's Dispatch
    assert point["auto_backend"] == "triton"
    assert {"whole/triton/masked", "gemm1/triton/masked", "gemm2/triton/masked"} <= set(point["ms"])
    assert report.gemm_share(point) == pytest.approx((point["ms"]["gemm1/triton/masked"] + point["ms"][
        "gemm2/triton/masked"]) / point["ms"]["whole/triton/masked"])
    gpu_work = {"copy/scatter", "copy/gather", "dense"}  # a call as made (host included) is timed back to back
    assert {k for k, ms in point["ms"].items() if ms == 2.0} == gpu_work and set(point["ms"].values()) == {1.0, 2.0}


def test_the_same_size_copy_copies_every_word():
    words = torch.randint(-2**62, 2**62, (1001,), dtype=torch.int64)
    copy = bench.sm_copy(words)
    assert torch.equal(copy(), words) and copy().data_ptr() != words.data_ptr()


def test_bench_cli_refuses_a_gpu_case_on_the_cpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench.main(["--case", "deepseek-ep8"]) == 2
    assert "deepseek-ep8" in capsys.readouterr().err


FITTED = pathlib.Path(__file__).resolve().parents[2] / "baselines" / "results" / "nvidia-h200" / "bench.json"


def test_committed_gpu_bench_fits_the_executors_layout_rule():
    """The run the rule was fitted to (kernels/executor.py cites it) gives the constant the executor ships, fitted
    again from its points."""
    data = json.loads(FITTED.read_text())
    fit = data["report"]["layout_fit"]
    assert report.fit_layout_rule(data["points"]) == fit
    assert executor.MASKED_MAX_MEAN_ROWS == round(fit["threshold"]) and fit["points"] >= 60


def test_torch_native_peer_passes_the_differential_tester():
    assert diff_main(["--case", "skewed", "--impl", "verify.perf.peers:torch_native_forward"]) == 0
