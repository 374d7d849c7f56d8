"""THE tolerance table: every PASS / WARN / FAIL threshold of the suite, each with its one-line justification.

Unit: u = 2**-8, the unit roundoff of bf16 (8 significant bits, round to nearest even). One bf16 ulp is 2u relative
to a value in [1, 2). Errors are relative to the reference's own scale (row max, or the L2 norm of the rows compared;
see metrics.py), so the table holds for any magnitude of data.

Rounding model (CONTRACT.md): four bf16 rounding points per token -- h (gate+up GEMM), a (silu * up), y (down GEMM),
out (gather) -- each a relative error of at most u, uniform-like (RMS about u/sqrt(3)). GEMMs and the gather
accumulate in fp32, so their own error is ~2**-24 relative.
- Against the FAITHFUL reference (same rounding points, exact accumulation) an honest implementation differs only
  where its fp32 accumulation order makes one of those roundings land on the other side: one ulp (2u) at one element,
  at a rate of roughly sqrt(K) * 2**-16 per element. The rate grows with K, the size of a flip does not, so per-row
  maxima stay under one output ulp and L2 errors stay far below u at every K (measured below).
- Against the EXACT reference the four roundings add in quadrature: RMS ~ u (relative L2), row max a few u. For
  random-sign data both the error and the result grow as sqrt(K), so the relative band does not grow with K.
Measured (docs/bands.md, CPU, K-chunked fp32 accumulation like a tensor-core K loop, H = 256..7168, I = 128..2048):
honest vs faithful row <= 1.35u, per-expert L2 <= 0.14u, L2 <= 0.075u; honest vs exact row <= 2.6u, L2 <= 1.03u.
"""

from __future__ import annotations

import dataclasses
import math

from verify.metrics import Metrics

U_BF16 = 2.0**-8
PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


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
BANDS: tuple[Band, ...] = (
    Band("nonfinite_rows", "-", 0, 0, "a NaN or Inf in a valid output row is never rounding"),
    Band("stray_rows", "-", 0, 0, "a row with no local expert must be exactly 0 (nothing was routed to this rank)"),
    Band("row_err", "faithful", 2 * u, 4 * u,
         "one bf16 output ulp (2u) may flip with the fp32 accumulation order; two ulps in a row is not rounding"),
    Band("expert_err", "faithful", u / 4, u / 2,
         "ulp flips are rare (~sqrt(K)*2^-16 per element): honest per-expert L2 <= 0.14u measured; a systematic "
         "deviation of one expert (2% scaling, an extra bf16 rounding, bf16 accumulation) lands at 0.7u-5u"),
    Band("rel_l2", "faithful", u / 8, u / 4, "same flips over the whole output: honest <= 0.075u measured"),
    Band("exact_row_err", "exact", 4 * u, 8 * u,
         "four roundings of <= u each, propagated with random signs: faithful itself reaches 2.6u at most measured"),
    Band("exact_rel_l2", "exact", 1.5 * u, 2 * u,
         "four roundings of RMS ~u/sqrt(3) in quadrature: ~u predicted, 1.03u measured for faithful itself"),
)

# Combined output of all ranks (sum of per-rank bf16 outputs) against the ep_size = 1 references: each rank's output
# is rounded on its own, so against the FAITHFUL ep=1 reference the partial sums' roundings count too. The combine
# is judged against the sum of the faithful per-rank references ("faithful") and the exact ep=1 reference ("exact").
COMBINE_BANDS: tuple[Band, ...] = tuple(
    dataclasses.replace(b, passes=2 * b.passes, fails=2 * b.fails,
                        why=b.why + "; doubled: up to ep_size partial sums are each rounded to bf16 once")
    if b.metric in ("exact_row_err", "exact_rel_l2") else b
    for b in BANDS
)


def expert_band_floor(num_elements: int) -> float:
    """A per-expert L2 over few elements is noisy: one ulp flip among n elements alone weighs 2u / sqrt(n). The
    expert band's FAIL threshold is raised to three such flips' weight when that is larger than u/2."""
    return 3 * 2 * u / math.sqrt(max(num_elements, 1))


def judge(metrics: Metrics, bands: tuple[Band, ...] = BANDS, expert_elements: int | None = None
          ) -> tuple[str, list[str]]:
    """Overall verdict (worst of the bands) and, for each band not passed, 'metric=value (> threshold)'."""
    worst, notes = PASS, []
    for band in bands:
        if band.metric == "expert_err" and expert_elements is not None:
            floor = expert_band_floor(expert_elements)
            band = dataclasses.replace(band, passes=max(band.passes, floor / 2), fails=max(band.fails, floor))
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
