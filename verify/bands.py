"""THE tolerance table: every PASS / WARN / FAIL threshold of the suite, each with its one-line justification.

Unit: u = 2**-8, the unit roundoff of bf16 (8 significant bits, round to nearest even). One bf16 ulp is 2u relative
to a value in [1, 2). Errors are relative to the reference's own scale (row max, or the L2 norm of the rows compared;
see metrics.py), so the table holds for any magnitude of data.

Rounding model (CONTRACT.md): four bf16 rounding points per token -- h (gate+up GEMM), a (silu * up), y (down GEMM),
out (gather) -- each a relative error of at most u, uniform-like (RMS about u/sqrt(3)).
- Against the EXACT reference the four roundings add in quadrature: RMS ~ u (relative L2), row max a few u. For
  random-sign data both the error and the result grow as sqrt(K), so this band does not grow with K.
- Against the FAITHFUL reference (same rounding points, exact accumulation) an honest implementation differs only
  where its accumulation lands a rounding on the other side: one ulp at one element. Hopper tensor cores (DeepGEMM,
  torch._grouped_mm and our Triton GEMM alike: bit-identical results) do that at a rate of ~5.6e-7 * K per element,
  8x an fp32 sequential sum, unbiased (docs/bands.md, H200). An h flip moves every y element a little through the
  down GEMM and flips some of its roundings, so the honest L2 error grows like sqrt(K): measured on an H200 up to
  0.30u (L2), 0.36u (per expert), 3.3u (row max) at H=7168, I=2048. The faithful L2 and per-expert bands therefore
  scale with sqrt((H + I) / 9216) (1 at the DeepSeek shape), never below their small-K floor, and widen for errors
  measured over few rows (metrics.small_sample).
Bugs that only these bands see (same docs): an extra bf16 rounding of silu (L2 1.04u at every K), bf16 accumulation
in the gather (0.64-0.68u), one expert 2% off (per expert 3.5u).
"""

from __future__ import annotations

import dataclasses
import math

from verify.metrics import Metrics, small_sample

U_BF16 = 2.0**-8
PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
REFERENCE_K = 7168 + 2048  # H + I of the DeepSeek-V3 expert, where the GPU honest errors were measured


@dataclasses.dataclass(frozen=True)
class Band:
    metric: str  # a Metrics field
    against: str  # "faithful", "exact", or "-" for exact counts
    passes: float  # PASS when metric <= passes
    fails: float  # FAIL when metric > fails (WARN in between)
    why: str

    def verdict(self, value: float) -> str:
        if math.isnan(value) or value > self.fails:
            return FAIL
        return PASS if value <= self.passes else WARN


u = U_BF16


def accumulation_scale(hidden: int, inter: int) -> float:
    """How honest faithful-L2 errors grow with the GEMMs' K: sqrt((H + I) / 9216)."""
    return math.sqrt((hidden + inter) / REFERENCE_K)


def bands_for(hidden: int, inter: int) -> tuple[Band, ...]:
    """The bands for a stage with hidden size H and intermediate size I."""
    s = accumulation_scale(hidden, inter)
    return (
        Band("nonfinite_rows", "-", 0, 0, "a NaN or Inf in a valid output row is never rounding"),
        Band("stray_rows", "-", 0, 0, "a row with no local expert must be exactly 0 (nothing was routed to it)"),
        Band("row_err", "faithful", 4 * u, 6 * u,
             "the max over thousands of rows of a few one-ulp flips: <= 3.3u measured (H200, 16k rows); "
             "a few % off on part of a row reaches 7u"),
        Band("expert_err", "faithful", max(u / 4, 0.45 * u * s), max(u / 2, 0.65 * u * s),
             f"tensor-core flips: honest <= 0.36u at H=7168 (H200), 0.14u on CPUs; x sqrt(K) scale {s:.2f}; one "
             "expert 2% off gives 3.5u, an extra bf16 rounding 1.1u"),
        Band("rel_l2", "faithful", max(u / 8, 0.35 * u * s), max(u / 4, 0.5 * u * s),
             f"same flips over all rows: honest <= 0.30u at H=7168 (H200); x sqrt(K) scale {s:.2f}; bf16 gather "
             "accumulation gives 0.64u, silu in bf16 1.04u"),
        Band("exact_row_err", "exact", 4 * u, 8 * u,
             "four roundings of <= u each, propagated with random signs: <= 2.9u measured (CPU and H200)"),
        Band("exact_rel_l2", "exact", 1.5 * u, 2 * u,
             "four roundings of RMS ~u/sqrt(3) in quadrature: ~u predicted, 1.00-1.04u measured (CPU and H200)"),
    )


def combine_bands(hidden: int, inter: int) -> tuple[Band, ...]:
    """The combined output of all ranks (a sum of per-rank bf16 outputs) against the ep_size = 1 references: against
    "faithful" = the sum of the faithful per-rank references, the rank bands; against the exact ep=1 reference the
    exact bands doubled, as each rank's partial sum is rounded to bf16 once more."""
    return tuple(
        dataclasses.replace(b, passes=2 * b.passes, fails=2 * b.fails,
                            why=b.why + "; doubled: up to ep_size partial sums are each rounded to bf16 once")
        if b.against == "exact" else b
        for b in bands_for(hidden, inter)
    )


def judge(metrics: Metrics, bands: tuple[Band, ...], rows: int | None = None) -> tuple[str, list[str]]:
    """Overall verdict (worst of the bands) and, for each band not passed, 'metric=value (> threshold)'.
    `rows`: how many routed rows the output has; the faithful L2 band widens for few (metrics.small_sample)."""
    worst, notes = PASS, []
    for band in bands:
        if band.metric == "rel_l2" and rows is not None:
            factor = small_sample(rows)
            band = dataclasses.replace(band, passes=band.passes * factor, fails=band.fails * factor)
        value = getattr(metrics, band.metric)
        verdict = band.verdict(value)
        if verdict != PASS:
            limit = band.fails if verdict == FAIL else band.passes
            notes.append(f"{band.metric}={_fmt(band, value)} > {_fmt(band, limit)} ({verdict})")
        worst = FAIL if FAIL in (worst, verdict) else WARN if WARN in (worst, verdict) else PASS
    return worst, notes


def _fmt(band: Band, value: float) -> str:
    if band.against == "-" or not math.isfinite(value):
        return f"{value:g}"
    return f"{value / u:.3g}u"


@dataclasses.dataclass(frozen=True)
class StageTolerance:
    """torch.testing.assert_close tolerances for one stage against its reference (reference/stages.py), for the
    unit-scale data the tests draw. rtol 2u = one bf16 ulp of the element itself."""

    rtol: float
    atol: float
    why: str


STAGE_TOLERANCES: dict[str, StageTolerance] = {
    "scatter": StageTolerance(0.0, 0.0, "a copy of x rows with no arithmetic: bit for bit"),
    "silu_and_mul": StageTolerance(2 * u, 0.0, "one rounding of an fp32 value whose last bits depend on the exp "
                                   "implementation: at most one bf16 ulp of the element"),
    "gather": StageTolerance(2 * u, 2**-20, "fp32 accumulation in the same slot order; an FMA may round once less "
                             "(~2^-24 of the partial sums), flipping the bf16 store by one ulp"),
    "gemm": StageTolerance(2 * u, 2**-12, "fp32 accumulation in another order (~sqrt(K) 2^-24 of sum |terms|) can "
                           "flip the bf16 store by one ulp; atol covers results that cancel to near zero"),
}
