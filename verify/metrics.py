"""Error metrics of one implementation output against the references, localised to the worst row and expert.

Scale-aware by construction: every error is relative to the reference's own magnitude (the row's max, or the L2 norm
of the rows compared), so an all-zero output scores 1.0, never "close". Rows whose reference is exactly zero (no local
expert) are not scored relatively: they must be exactly zero ("stray" rows otherwise).
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class Metrics:
    row_err: float  # max over rows of max|out - faithful| / max|faithful row|
    worst_row: int  # the row (of this rank's output) where row_err is reached; -1 if none
    expert_err: float  # max over local experts e of their rows' rel. L2 error / small_sample(rows of e)
    worst_expert: int  # the local expert where expert_err is reached; -1 if none
    rel_l2: float  # ||out - faithful|| / ||faithful|| over all rows
    exact_row_err: float  # row_err against the exact reference
    exact_rel_l2: float  # rel_l2 against the exact reference
    calc_diff: float  # DeepGEMM's global 1 - 2 sum(xy) / sum(x^2 + y^2) against the exact reference (for comparison)
    default_allclose: bool  # torch.testing's default bf16 assert_close (rtol 1.6e-2, atol 1e-5) vs exact passes
    nonfinite_rows: int  # rows with a NaN or Inf anywhere
    stray_rows: int  # rows with no local expert whose output is not exactly 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def small_sample(rows: int) -> float:
    """How much larger a relative L2 error over few rows may be than over many: honest GPU errors are sparse ulp
    flips, and a group of few rows is dominated by the few it happens to hold (measured on an H200: one-row errors
    reach 2.5x the many-row error). 3 for one row, 1.2 for a hundred."""
    return 1 + 2 / math.sqrt(max(rows, 1))


def _row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row: max|out - ref| / max|ref| (inf where out is not finite, 0 where ref and out are both zero)."""
    scale = ref.abs().amax(dim=1)
    err = (out - ref).abs().amax(dim=1)
    err = torch.where(torch.isfinite(out).all(dim=1), err, torch.full_like(err, math.inf))
    return torch.where(scale > 0, err / scale.clamp_min(torch.finfo(torch.float64).tiny), err)


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm()
    diff = (out - ref).norm()
    return float(diff / denom) if denom > 0 else (0.0 if diff == 0 else math.inf)


def calc_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """DeepGEMM's similarity metric: 1 - 2 sum(x y) / sum(x^2 + y^2), in float64 (0 for identical inputs)."""
    x, y = out.double(), ref.double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


def compare(out: torch.Tensor, faithful: torch.Tensor, exact: torch.Tensor, local_ids: torch.Tensor) -> Metrics:
    """out: the implementation's [M, H] output; faithful / exact: the references; local_ids: [M, k], -1 if not local."""
    out, faithful, exact = out.double(), faithful.double(), exact.double()
    routed = (local_ids >= 0).any(dim=1)
    nonfinite = ~torch.isfinite(out).all(dim=1)
    stray = ~routed & (nonfinite | (out != 0).any(dim=1))

    row_err = _row_errors(out, faithful)
    row_err = torch.where(routed, row_err, torch.zeros_like(row_err))
    worst_row = int(row_err.argmax()) if routed.any() else -1
    exact_row_err = torch.where(routed, _row_errors(out, exact), torch.zeros_like(row_err))

    expert_err, worst_expert = 0.0, -1
    for e in local_ids[local_ids >= 0].unique().tolist():
        rows = (local_ids == e).any(dim=1)
        err = _rel_l2(out[rows], faithful[rows]) / small_sample(int(rows.sum()))
        if err > expert_err or worst_expert < 0:
            expert_err, worst_expert = err, e

    return Metrics(
        row_err=float(row_err.max()) if routed.any() else 0.0,
        worst_row=worst_row,
        expert_err=expert_err,
        worst_expert=worst_expert,
        rel_l2=_rel_l2(out[routed], faithful[routed]),
        exact_row_err=float(exact_row_err.max()) if routed.any() else 0.0,
        exact_rel_l2=_rel_l2(out[routed], exact[routed]),
        calc_diff=calc_diff(out, exact) if torch.isfinite(out).all() else math.nan,
        default_allclose=bool(torch.isclose(out, exact, rtol=1.6e-2, atol=1e-5).all()),
        nonfinite_rows=int(nonfinite.sum()),
        stray_rows=int(stray.sum()),
    )
