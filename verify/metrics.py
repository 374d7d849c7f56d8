"""Error metrics of one implementation output against the references, localised to the worst row and expert.

Raw by construction: every number here is an error as measured, relative to the reference's own magnitude (the row's
max, or the L2 norm of the rows compared), so an all-zero output scores 1.0, never "close". How much error is honest
for how many rows is the bands' business (verify/bands.py), never folded in here. Rows whose reference is exactly
zero (no local expert) are not scored relatively: they must be exactly zero ("stray" rows otherwise).
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class ExpertError:
    expert: int  # LOCAL expert id
    rows: int  # output rows that hold at least one slot of this expert
    rel_l2: float  # ||out - faithful|| / ||faithful|| over those rows
    exact_rel_l2: float  # the same against the exact reference


@dataclasses.dataclass(frozen=True)
class Metrics:
    row_err: float  # max over routed rows of max|out - faithful| / max|faithful row|
    worst_row: int  # the row (of this output) where row_err is reached; -1 if none
    experts: tuple[ExpertError, ...]  # the relative L2 error of each local expert's rows
    rel_l2: float  # ||out - faithful|| / ||faithful|| over all routed rows
    routed_rows: int  # rows with at least one local slot
    exact_row_err: float  # row_err against the exact reference
    exact_rel_l2: float  # rel_l2 against the exact reference
    calc_diff: float  # DeepGEMM's global 1 - 2 sum(xy) / sum(x^2 + y^2) against the exact reference (for comparison)
    default_allclose: bool  # torch.testing's default bf16 assert_close (rtol 1.6e-2, atol 1e-5) vs exact passes
    nonfinite_rows: int  # rows with a NaN or Inf anywhere
    stray_rows: int  # rows with no local expert whose output is not exactly 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row: max|out - ref| / max|ref| (inf where out is not finite, 0 where ref and out are both zero)."""
    scale = ref.abs().amax(dim=1)
    err = (out - ref).abs().amax(dim=1)
    err = torch.where(torch.isfinite(out).all(dim=1), err, torch.full_like(err, math.inf))
    return torch.where(scale > 0, err / scale.clamp_min(torch.finfo(torch.float64).tiny), err)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (inf where out is not finite; 0 when both are zero)."""
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

    row_err = torch.where(routed, _row_errors(out, faithful), 0.0)
    exact_row_err = torch.where(routed, _row_errors(out, exact), 0.0)
    experts = []
    for e in local_ids[local_ids >= 0].unique().tolist():
        rows = (local_ids == e).any(dim=1)
        experts.append(ExpertError(e, int(rows.sum()), rel_l2(out[rows], faithful[rows]),
                                   rel_l2(out[rows], exact[rows])))

    return Metrics(
        row_err=float(row_err.max()) if routed.any() else 0.0,
        worst_row=int(row_err.argmax()) if routed.any() else -1,
        experts=tuple(experts),
        rel_l2=rel_l2(out[routed], faithful[routed]),
        routed_rows=int(routed.sum()),
        exact_row_err=float(exact_row_err.max()) if routed.any() else 0.0,
        exact_rel_l2=rel_l2(out[routed], exact[routed]),
        calc_diff=calc_diff(out, exact) if torch.isfinite(out).all() else math.nan,
        default_allclose=bool(torch.isclose(out, exact, rtol=1.6e-2, atol=1e-5).all()),
        nonfinite_rows=int(nonfinite.sum()),
        stray_rows=int(stray.sum()),
    )
