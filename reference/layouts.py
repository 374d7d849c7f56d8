"""What each pipeline stage's output must hold for a rank view: the facts the layout checks compare against.

Everything here is derived from the routing alone (never from an implementation's output), and on its own: kernels/
derives the same sizes in kernels/dispatch.py, and the golden model never imports it (docs/contract.md, "Parts"), so a
slip in one cannot hide in the other. The facts (docs/contract.md, "Layout contracts"):
- which (token, slot) pairs go to which local expert (`local_expert_ids`, `assignments`),
- how many rows each local expert gets (`expert_counts`),
- where each expert's segment starts in the contiguous layout (`segment_starts`, `padded_rows`),
- what DeepGEMM's `m_indices` (contiguous) and `masked_m` (masked) must hold.
Row order inside a segment is not part of any contract: checks follow the implementation's `output_index`.
"""

from __future__ import annotations

import torch


def align_up(n, alignment: int):
    """Smallest multiple of `alignment` that is >= n (an int, or elementwise on an integer tensor)."""
    return (n + alignment - 1) // alignment * alignment


def local_expert_ids(topk_ids: torch.Tensor, ep_size: int, ep_rank: int, num_experts: int) -> torch.Tensor:
    """GLOBAL ids [M, k] -> LOCAL ids of rank `ep_rank` (int64), -1 for -1 ids and for experts on other ranks."""
    num_local_experts = num_experts // ep_size
    local = topk_ids.long() - ep_rank * num_local_experts
    on_rank = (topk_ids >= 0) & (local >= 0) & (local < num_local_experts)
    return torch.where(on_rank, local, torch.full_like(local, -1))


def assignments(local_ids: torch.Tensor) -> torch.Tensor:
    """Every (token, slot, local expert) triple whose id is local, as an int64 [n, 3] tensor in (token, slot) order."""
    token, slot = (local_ids >= 0).nonzero(as_tuple=True)
    return torch.stack([token, slot, local_ids[token, slot]], dim=1)


def expert_counts(local_ids: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """Rows each local expert receives (int64 [E_local]); duplicates of an expert in one row count twice."""
    ids = local_ids[local_ids >= 0]
    return torch.bincount(ids, minlength=num_local_experts)


def segment_starts(counts: torch.Tensor, alignment: int) -> torch.Tensor:
    """Contiguous layout: first row of each expert's segment (exclusive prefix sum of counts aligned up)."""
    aligned = align_up(counts, alignment)
    return torch.cumsum(aligned, 0) - aligned


def padded_rows(counts: torch.Tensor, alignment: int) -> int:
    """Contiguous layout: total rows, every segment aligned up; an expert with no tokens has no rows."""
    return int(align_up(counts, alignment).sum())


def expected_m_indices(counts: torch.Tensor, alignment: int) -> torch.Tensor:
    """Contiguous layout: expert id on each of expert e's first counts[e] segment rows, -1 on padding rows."""
    m_indices = torch.full((padded_rows(counts, alignment),), -1, dtype=torch.int32)
    for e, (start, count) in enumerate(zip(segment_starts(counts, alignment).tolist(), counts.tolist(), strict=True)):
        m_indices[start : start + count] = e
    return m_indices


def expected_masked_m(counts: torch.Tensor) -> torch.Tensor:
    """Masked layout: rows of block e that hold tokens (its first masked_m[e] rows)."""
    return counts.to(torch.int32)
