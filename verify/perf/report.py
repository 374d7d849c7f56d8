"""What verify.bench's measurements mean: the performance targets as measured ratios, the layout rule fitted to the
data, markdown tables and the plots. Pure functions of the results dict (so `--from-json` re-reports a saved run).

Each ratio uses times and ceilings from ONE run on one card. "Ours" is the production configuration the hybrid picks
at that point (point["auto_layout"], point["auto_backend"]); the targets are the issue's, declared once in TARGETS.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from kernels.dispatch import LAYOUTS
from kernels.executor import MASKED_BLOCK_BUDGET_BYTES

STAGES = ("count", "scatter", "gemm1", "silu", "gemm2", "gather")


def auto_backend(p: dict, layout: str) -> str:
    """The backend gemm="auto" runs at this point in `layout` (the masked Dispatch may go to another backend than the
    contiguous one: kernels.gemm.for_dispatch); runs before that was recorded name one backend for both."""
    return p.get("auto_backends", {}).get(layout, p["auto_backend"])


def _key(p: dict, stage: str) -> str:
    """The measurement's name of `stage` in the hybrid's layout (and backend, for gemm / whole; the count has
    neither)."""
    layout = p["auto_layout"]
    backend = auto_backend(p, layout)
    if stage == "count":
        return stage
    return f"{stage}/{backend}/{layout}" if stage in ("gemm1", "gemm2", "whole") else f"{stage}/{layout}"


def _ours(p: dict, stage: str) -> float:
    """ms of `stage` in the hybrid's layout (and backend, for gemm / whole), as called."""
    return p["ms"][_key(p, stage)]


def ours_ms(p: dict) -> float:
    """The production call's whole-stage time: the better of its two measurements in the run (the hybrid call, and
    the same layout and backend forced), since both time one configuration and host noise only ever adds."""
    return min(p["ms"]["hybrid"], _ours(p, "whole"))


def floor_ms(p: dict, ceil: dict) -> float:
    """Reading the weights of the experts that received tokens once, at the measured copy bandwidth."""
    return p["weight_bytes"] / (ceil["copy_gbps"] * 1e6)


def _gpu_ms(p: dict, stage: str) -> float:
    """The stage's GPU time: its graphed time where the run has one (a GPU), else as called."""
    return p["ms"].get(f"graphed/{_key(p, stage)}") or _ours(p, stage)


MOVED_BYTES = {  # what the memory-bound stages read + write
    "scatter": lambda p: 2 * p["slots"] * p["hidden"] * 2,  # the slots' rows read, and written
    "gather": lambda p: (p["slots"] + p["tokens"]) * p["hidden"] * 2,  # the slots' rows read, the output written
}


def _span_ms(p: dict, stage: str) -> float | None:
    """The stage's kernels' GPU span (verify.perf.bench.kernel_span_ms), None where the run has none (CPU runs, and
    runs recorded before kernel spans were)."""
    return p["ms"].get(f"kernels/{_key(p, stage)}")


def over_copy_bandwidth(p: dict, stage: str, ceil: dict) -> float:
    """The stage's bytes per second over the large copy's, both read the same way: by their kernels' spans where the
    run has them, else the stage graphed (or as called) over the copy timed by do_bench."""
    span = _span_ms(p, stage)
    ms, copy_gbps = (span, ceil["copy_kernel_gbps"]) if span else (_gpu_ms(p, stage), ceil["copy_gbps"])
    return MOVED_BYTES[stage](p) / ms / 1e6 / copy_gbps


def over_same_size_copy(p: dict, stage: str) -> float | None:
    """The stage's speed over a device-to-device copy of the bytes it moves, timed in the same run and the same way
    (kernel spans where the run has them, else graphed): how near the stage comes to what its size allows, ramp
    included (None where the run has no such copy)."""
    span, copy_span = _span_ms(p, stage), p["ms"].get(f"kernels/copy/{stage}")
    if span and copy_span:
        return copy_span / span
    copy = p["ms"].get(f"copy/{stage}")
    return copy / _gpu_ms(p, stage) if copy else None


def glue_ms(p: dict) -> float:
    """Whole stage minus its stages timed alone: host work the GPU waits for (the sync, launches), allocations."""
    return _ours(p, "whole") - sum(_ours(p, s) for s in STAGES)


def gemm_share(p: dict) -> float:
    return (_ours(p, "gemm1") + _ours(p, "gemm2")) / _ours(p, "whole")


def gemm_share_gpu(p: dict) -> float:
    """The two GEMMs' share of the stage's GPU time, everything graphed (the host's launches and read-back left out):
    of the whole captured stage where the run has one (the decode path, M <= 1024), else of its stages summed."""
    whole = p["ms"].get("graphed") or sum(_gpu_ms(p, s) for s in STAGES)
    return (_gpu_ms(p, "gemm1") + _gpu_ms(p, "gemm2")) / whole


def floor_ratio(p: dict, ceil: dict) -> float:
    return ours_ms(p) / floor_ms(p, ceil)


def decode_ratio(run: str) -> Callable[[dict, dict], float]:
    """The decode path's whole stage ("decode": eager, "graphed": the captured graph) / the weight-read floor."""
    return lambda p, c: p["ms"][run] / floor_ms(p, c)


def _decode(shape: str) -> Callable[[dict], bool]:
    return lambda p: p["shape"] == shape and p["tokens"] <= 256


def torch_native_ratio(p: dict) -> float:
    return p["ms"]["torch_native"] / ours_ms(p)


def masked_over_contiguous(p: dict) -> float:
    """Whole-stage time of the masked layout over the contiguous one, each with the backend auto runs it on."""
    return p["ms"][_whole(p, "masked")] / p["ms"][_whole(p, "contiguous")]


def _whole(p: dict, layout: str) -> str:
    return f"whole/{auto_backend(p, layout)}/{layout}"


def best_whole(p: dict, layout: str) -> tuple[str, float]:
    runs = {k.split("/")[1]: v for k, v in p["ms"].items() if k.startswith("whole/") and k.endswith("/" + layout)}
    name = min(runs, key=runs.get)
    return name, runs[name]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    what: str
    goal: str  # ">=" or "<="
    bound: float
    applies: Callable[[dict], bool]
    value: Callable[[dict, dict], float]

    def met(self, value: float) -> bool:
        return value >= self.bound if self.goal == ">=" else value <= self.bound


TARGETS = (
    Target("gemm_share", "the two grouped GEMMs' share of the whole stage (M >= 256)", ">=", 0.85,
           lambda p: p["tokens"] >= 256,
           lambda p, c: gemm_share(p)),
    Target("gemm_share_gpu", "the two grouped GEMMs' share of the stage's GPU time, graphed (M >= 256)", ">=", 0.85,
           lambda p: p["tokens"] >= 256 and "graphed/count" in p["ms"], lambda p, c: gemm_share_gpu(p)),
    Target("decode_floor", "whole stage / weight-read floor at the measured copy bandwidth (M <= 256)", "<=", 1.15,
           lambda p: p["tokens"] <= 256, floor_ratio),
    Target("decode_graphed_deepseek", "DeepSeek-like: graphed decode path / weight-read floor (M <= 256)", "<=",
           1.15, _decode("deepseek"), decode_ratio("graphed")),
    Target("decode_eager_deepseek", "DeepSeek-like: eager decode path (sync='after') / floor (M <= 256)", "<=", 1.2,
           _decode("deepseek"), decode_ratio("decode")),
    Target("decode_graphed_qwen3", "Qwen3-like: graphed decode path / weight-read floor (M <= 256)", "<=", 2.5,
           _decode("qwen3"), decode_ratio("graphed")),
    Target("decode_eager_qwen3", "Qwen3-like: eager decode path (sync='after') / floor (M <= 256)", "<=", 4.0,
           _decode("qwen3"), decode_ratio("decode")),
    *(Target(f"{stage}_bw", f"{stage} bytes/s / copy bandwidth, kernel spans on a GPU (M >= 4096)", ">=", 0.70,
             lambda p: p["tokens"] >= 4096, lambda p, c, stage=stage: over_copy_bandwidth(p, stage, c))
      for stage in ("scatter", "gather")),
    # the two above judge a stage of 40-180 MB by a 1 GiB copy's bandwidth, which an SM copy of 42-50 MB does not reach
    # itself (0.82 of it by kernel spans, 0.64-0.67 graphed, at Qwen3-like M = 4096 on an H200):
    # these judge it by that copy
    *(Target(f"{stage}_vs_same_size_copy", f"{stage} / an SM copy of the bytes it moves, timed alike (M >= 4096)",
             ">=", 0.70, lambda p, stage=stage: p["tokens"] >= 4096 and f"copy/{stage}" in p["ms"],
             lambda p, c, stage=stage: over_same_size_copy(p, stage)) for stage in ("scatter", "gather")),
    Target("vs_torch_native_large", "torch-native pipeline time / ours (M >= 4096)", ">=", 1.5,
           lambda p: p["tokens"] >= 4096, lambda p, c: torch_native_ratio(p)),
    Target("vs_torch_native_small", "torch-native pipeline time / ours (M <= 1024)", ">=", 1.3,
           lambda p: p["tokens"] <= 1024, lambda p, c: torch_native_ratio(p)),
    Target("auto_backend", "gemm='auto' backend / fastest backend, whole stage in the hybrid's layout", "<=", 1.05,
           lambda p: True, lambda p, c: _ours(p, "whole") / best_whole(p, p["auto_layout"])[1]),
    Target("hybrid_layout", "the layout layout='auto' picks / the better layout, auto backend", "<=", 1.05,
           lambda p: True,
           lambda p, c: _ours(p, "whole") / min(p["ms"][_whole(p, str(lay))] for lay in LAYOUTS)),
    Target("hybrid_memory", "masked block bytes / budget when the hybrid picks masked", "<=", 1.0,
           lambda p: p["auto_layout"] == "masked", lambda p, c: p["masked_block_bytes"] / MASKED_BLOCK_BUDGET_BYTES),
)


def evaluate(results: dict) -> list[dict]:
    """One entry per target: every applicable point's value, how many met it, the worst one."""
    out, ceil = [], results["ceilings"]
    for t in TARGETS:
        rows = []
        for p in results["points"]:
            if t.applies(p):
                try:
                    rows.append(dict(case=p["case"], tokens=p["tokens"], value=t.value(p, ceil)))
                except KeyError as missing:  # a run that failed at this point (see the point's "errors")
                    rows.append(dict(case=p["case"], tokens=p["tokens"], value=math.nan, missing=str(missing)))
        for r in rows:
            r["met"] = t.met(r["value"])  # NaN (not measured) never meets a target
        measured = [r for r in rows if not math.isnan(r["value"])]
        worst = (min if t.goal == ">=" else max)(measured, key=lambda r: r["value"], default=None)
        out.append(dict(name=t.name, what=t.what, goal=f"{t.goal} {t.bound}", met=sum(r["met"] for r in rows),
                        total=len(rows), worst=worst, rows=rows))
    return out


def fit_layout_rule(points: list[dict]) -> dict | None:
    """The threshold T on mean rows per active expert for "masked iff mean_rows <= T and the block fits the budget"
    that minimises the total, then the worst, excess time over the better layout (auto backend) on these points."""
    data = []
    for p in points:
        masked, contiguous = (p["ms"].get(_whole(p, str(lay))) for lay in LAYOUTS)
        if masked is not None and contiguous is not None:
            fits = p["masked_block_bytes"] <= MASKED_BLOCK_BUDGET_BYTES
            data.append((p["mean_rows"], fits, masked, contiguous))
    if not data:
        return None
    means = sorted({d[0] for d in data})
    candidates = [means[0] / 2] + [math.sqrt(a * b) for a, b in zip(means, means[1:], strict=False)] + [means[-1] * 2]

    def excess(threshold):  # mean first: one noisy point must not move the rule for all the others
        ex = [(m if mean <= threshold and fits else c) / min(m, c) - 1 for mean, fits, m, c in data]
        return sum(ex), max(ex)

    best = min(candidates, key=excess)
    total, worst = excess(best)
    return dict(threshold=best, worst_excess=worst, mean_excess=total / len(data), points=len(data))


def report(results: dict) -> dict:
    return dict(targets=evaluate(results), layout_fit=fit_layout_rule(results["points"]))


def point_line(p: dict) -> str:
    return (f"{p['case']:20s} M={p['tokens']:6d} slots={p['slots']:6d} hybrid {p['ms']['hybrid']:8.3f} ms "
            f"({p['auto_layout']}, {p['auto_backend']}) {p['flops'] / p['ms']['hybrid'] / 1e9:6.1f} TFLOP/s "
            f"torch-native {p['ms']['torch_native']:8.3f} ms  l2/u {p['accuracy']['hybrid']['l2_u']:.2f} "
            f"{p['accuracy']['hybrid']['verdict']}")


def _bandwidth_cell(p: dict, stage: str, ceil: dict) -> str:
    same = over_same_size_copy(p, stage)
    return f"{over_copy_bandwidth(p, stage, ceil):.2f}" + (f" ({same:.2f})" if same else "")


def format_report(results: dict) -> str:
    """Markdown: the per-point table (ratios), outside implementations beside ours, the targets, the layout rule."""
    ceil = results["ceilings"]
    lines = [f"Card: {results['card']} (torch {results['torch']}, triton {results['triton']}); same-run ceilings: "
             f"copy {ceil['copy_gbps']:.0f} GB/s, dense bf16 matmul {ceil['peak_tflops']:.0f} TFLOP/s", "",
             "| case | M | slots | layout, backend | whole ms | TFLOP/s | / dense same FLOPs | / weight floor | GEMM "
             "share | glue ms | scatter / copy (same bytes) | gather / copy (same bytes) | torch-native / ours | "
             "masked / contiguous | l2/u |",
             "|" + "---|" * 15]
    for p in results["points"]:
        lines.append(
            f"| {p['case']} | {p['tokens']} | {p['slots']} | {p['auto_layout']}, {p['auto_backend']} | "
            f"{ours_ms(p):.3f} | {p['flops'] / ours_ms(p) / 1e9:.1f} | {ours_ms(p) / p['ms']['dense']:.2f} | "
            f"{floor_ratio(p, ceil):.2f} | {gemm_share(p):.2f} | {glue_ms(p):.3f} | "
            f"{_bandwidth_cell(p, 'scatter', ceil)} | {_bandwidth_cell(p, 'gather', ceil)} | "
            f"{torch_native_ratio(p):.2f} | {masked_over_contiguous(p):.2f} | "
            f"{p['accuracy']['hybrid']['l2_u']:.2f} |")
    return "\n".join(lines + summary_lines(results))


def summary_lines(results: dict, fit_from: int = 0) -> list[str]:
    """Markdown lines of a bench run's summary: outside implementations beside ours (verify.bench --impl), the
    targets, the fitted layout rule (when fitted on at least `fit_from` points)."""
    lines = []
    outside = sorted({k for p in results["points"] for k in p["ms"] if k.startswith("impl/")})
    if outside:
        lines += ["", "| case | M | ours ms | " + " | ".join(f"{k[5:]} / ours (l2/u, verdict)" for k in outside) + " |",
                  "|" + "---|" * (3 + len(outside))]
        for p in results["points"]:
            cells = [f"{p['ms'][k] / ours_ms(p):.2f} ({p['accuracy'][k]['l2_u']:.2f}, {p['accuracy'][k]['verdict']})"
                     if k in p["ms"] else p["errors"].get(k, "-")[:40] for k in outside]
            lines.append(f"| {p['case']} | {p['tokens']} | {ours_ms(p):.3f} | " + " | ".join(cells) + " |")
    rep = results.get("report") or report(results)
    lines += ["", "| target | goal | met | worst (case, M) |", "|---|---|---|---|"]
    for t in rep["targets"]:
        w = t["worst"]
        worst = f"{w['value']:.3f} ({w['case']}, M={w['tokens']})" if w else "-"
        lines.append(f"| {t['name']}: {t['what']} | {t['goal']} | {t['met']}/{t['total']} | {worst} |")
    fit = rep["layout_fit"]
    if fit and fit["points"] >= fit_from:
        lines += ["", f"Layout rule fitted on {fit['points']} points: masked iff mean rows per active expert <= "
                      f"{fit['threshold']:.0f} and the masked block <= {MASKED_BLOCK_BUDGET_BYTES >> 30} GiB; worst "
                      f"excess over the better layout {100 * fit['worst_excess']:.1f}%, mean "
                      f"{100 * fit['mean_excess']:.2f}%"]
    return lines


def plot(results: dict, path: str) -> None:
    """Left: roofline (whole stage, hybrid, per case); right: masked / contiguous whole-stage time per M."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceil = results["ceilings"]
    fig, (roof, lay) = plt.subplots(1, 2, figsize=(13, 5))
    cases = list(dict.fromkeys(p["case"] for p in results["points"]))
    intensities = [p["flops"] / (p["weight_bytes"] + p["io_bytes"]) for p in results["points"]]
    lo, hi = min(intensities) / 2, max(intensities) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    roof.plot(xs, [min(ceil["peak_tflops"], x * ceil["copy_gbps"] / 1e3) for x in xs], "k-",
              label=f"roofline (copy {ceil['copy_gbps']:.0f} GB/s, matmul {ceil['peak_tflops']:.0f} TFLOP/s)")
    for case in cases:
        pts = [p for p in results["points"] if p["case"] == case]
        roof.plot([p["flops"] / (p["weight_bytes"] + p["io_bytes"]) for p in pts],
                  [p["flops"] / ours_ms(p) / 1e9 for p in pts], "o-", label=case, ms=4)
        lay.plot([p["tokens"] for p in pts], [masked_over_contiguous(p) for p in pts], "o-", label=case, ms=4)
    roof.set(xscale="log", yscale="log", xlabel="FLOP per byte (weights of active experts + token rows)",
             ylabel="TFLOP/s (routed rows)", title=f"Whole expert stage, hybrid, {results['card']}")
    roof.legend(fontsize=7)
    lay.axhline(1.0, color="k", lw=0.8)
    fit = (results.get("report") or report(results))["layout_fit"]
    lay.set(xscale="log", xlabel="M (tokens received per rank)", ylabel="masked / contiguous time (auto backend)",
            title="Layout: below 1, masked is faster" + (f" (fitted rule: mean rows <= {fit['threshold']:.0f})"
                                                       if fit else ""))
    lay.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
