"""THE tolerance table: every PASS / WARN / FAIL threshold of the suite, each with its one-line justification, and
every widening of a threshold (the metrics themselves stay raw: verify/metrics.py).

Unit: u = 2**-8, the unit roundoff of bf16 (8 significant bits, round to nearest even). One bf16 ulp is 2u relative
to a value in [1, 2). Errors are relative to the reference's own scale (row max, or the L2 norm of the rows compared;
see metrics.py), so the table holds for any magnitude of data.

Rounding model (docs/contract.md, "Rounding points"): four bf16 rounding points per token -- h (gate+up GEMM), a
(silu * up), y (down GEMM), out (gather) -- each a relative error of at most u, uniform-like (RMS about u/sqrt(3)).
- Against the EXACT reference the four roundings add in quadrature: RMS ~ u (relative L2), row max a few u. For
  random-sign data both the error and the result grow as sqrt(K), so this band does not grow with K.
- Against the FAITHFUL reference (same rounding points, exact accumulation) an honest implementation differs only
  where its accumulation lands a rounding on the other side: one ulp at one element. Hopper tensor cores (DeepGEMM,
  torch._grouped_mm and our Triton GEMM alike: bit-identical results) do that at a rate of ~5.6e-7 * K per element,
  8x an fp32 sequential sum, unbiased (docs/bands.md, "On a GPU"). An h flip moves
  every y element a little through the down GEMM and flips some of its roundings, so the honest L2 error grows like
  sqrt(K): measured on an H200 up to 0.30u (L2), 0.36u (per expert, over many rows), 3.3u (row max) at H=7168,
  I=2048. The faithful L2 and per-expert bands therefore scale with sqrt((H + I) / 9216) (1 at the DeepSeek shape),
  never below their small-K floor, and widen for errors measured over few rows (`small_sample`).
- An L2 error over few independent roundings spreads more than over many. Against the exact reference the
  independent samples of a row number about min(H, I): with a small I, every output of a row shares the same few
  roundings of h and a. So the exact L2 band widens with rows x min(H, I) (the fuzzer found this: one routed row,
  H = 16, I = 1 gave 2.04u against a 2u bound; an honest implementation, bit-identical to the faithful reference).
- Row-relative errors need a row of several elements to have a scale: with H = 1 the one element of a row can be
  a near-cancelled sum, and an honest error relative to it is unbounded (the fuzzer found 10.2u, H = 1, I = 16). The
  bands are stated for H >= MIN_HIDDEN; every case of the catalogue and of the fuzzer has it.
Bugs that only these bands see (docs/bands.md): an extra bf16 rounding of silu (L2 1.04u at every K), bf16
accumulation in the gather (0.64-0.68u), one expert 2% off (per expert 3.5u over many rows).
"""

from __future__ import annotations

import dataclasses
import math

from verify.findings import Check, Finding, Verdict
from verify.metrics import Metrics

U_BF16 = 2.0**-8
MIN_HIDDEN = 16  # the smallest H the bands are stated for (see above)
REFERENCE_K = 7168 + 2048  # H + I of the DeepSeek-V3 expert, where the GPU honest errors were measured
u = U_BF16


def small_sample(rows: int) -> float:
    """How much larger a relative L2 error over few samples (rows, or independent roundings) may be than over many:
    honest GPU errors are sparse ulp flips, and a group of few rows is dominated by the few it happens to hold
    (measured on an H200: one-row errors reach 2.5x the many-row error). 3 for one sample, 1.2 for a hundred."""
    return 1 + 2 / math.sqrt(max(rows, 1))


@dataclasses.dataclass(frozen=True)
class Band:
    metric: str  # a Metrics field, or "expert_err": the rel_l2 of each local expert's rows (Metrics.experts)
    against: str  # "faithful", "exact", or "-" for exact counts
    passes: float  # PASS when metric <= passes (for many rows)
    fails: float  # FAIL when metric > fails (WARN in between)
    why: str
    samples_per_row: int = 0  # >0: both bounds widen by small_sample(rows x this) for an error over few samples

    def bounds(self, rows: int) -> tuple[float, float]:
        """(passes, fails) for an error measured over `rows` rows."""
        scale = small_sample(rows * self.samples_per_row) if self.samples_per_row else 1.0
        return self.passes * scale, self.fails * scale

    def judge(self, metrics: Metrics) -> Finding:
        """This band's finding. The per-expert band judges every expert against its own (row-count) bounds and
        reports the one closest to, or furthest over, its FAIL bound."""
        if self.metric == "expert_err":
            groups = [(e.rel_l2, e.rows, e.expert) for e in metrics.experts] or [(0.0, 0, None)]
        else:
            groups = [(getattr(metrics, self.metric), metrics.routed_rows, None)]

        def closeness(group):
            value, rows, _ = group
            fails = self.bounds(rows)[1]
            return math.inf if math.isnan(value) else value / fails if fails > 0 else (math.inf if value else 0.0)

        value, rows, expert = max(groups, key=closeness)
        passes, fails = self.bounds(rows)
        verdict = (Verdict.FAIL if math.isnan(value) or value > fails else
                   Verdict.PASS if value <= passes else Verdict.WARN)
        limit = fails if verdict is Verdict.FAIL else passes
        sign = "<=" if verdict is Verdict.PASS else ">"
        where = f" (local expert {expert}, {rows} rows)" if expert is not None else ""
        return Finding(Check.BAND, verdict, f"{self.metric}={self.format(value)} {sign} {self.format(limit)}{where}",
                       metric=self.metric, value=value, limit=limit, expert=expert)

    def format(self, value: float) -> str:
        if self.against == "-" or not math.isfinite(value):
            return f"{value:g}"
        return f"{value / u:.3g}u"


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
             f"tensor-core flips: honest <= 0.36u at H=7168 (H200), 0.14u on CPUs, over many rows; x sqrt(K) scale "
             f"{s:.2f}; one expert 2% off gives 3.5u, an extra bf16 rounding 1.1u", samples_per_row=1),
        Band("rel_l2", "faithful", max(u / 8, 0.35 * u * s), max(u / 4, 0.5 * u * s),
             f"same flips over all rows: honest <= 0.30u at H=7168 (H200); x sqrt(K) scale {s:.2f}; bf16 gather "
             "accumulation gives 0.64u, silu in bf16 1.04u", samples_per_row=1),
        Band("exact_row_err", "exact", 4 * u, 8 * u,
             "four roundings of <= u each, propagated with random signs: <= 2.9u measured (CPU and H200)"),
        Band("exact_rel_l2", "exact", 1.5 * u, 2 * u,
             "four roundings of RMS ~u/sqrt(3) in quadrature: ~u predicted, 1.00-1.04u measured (CPU and H200); "
             "over few independent roundings (rows x min(H, I)) up to 2.14u (1-4 rows, I = 1-16, CPU)",
             samples_per_row=min(hidden, inter)),
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


def judge(metrics: Metrics, bands: tuple[Band, ...]) -> list[Finding]:
    """One finding per band, PASS included, in the table's order."""
    return [band.judge(metrics) for band in bands]


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
