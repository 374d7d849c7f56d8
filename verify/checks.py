"""Checks that are not about values: the layout contract, order independence, poisoning, inputs left alone.

The layout contract (docs/contract.md, "Layout contracts") is checked EXACTLY against what reference.layouts derives
from the routing, and always through `output_index` (row order inside a segment is not part of the contract; padding
rows are never read).
The hooks here plug into `kernels.Stages` for implementations that expose their stages.
"""

from __future__ import annotations

import dataclasses

import torch

from kernels.dispatch import Dispatch, Layout
from reference import layouts

POISON_INT = -2  # never a legal row (rows are >= 0, skipped ids are -1): an unwritten index shows


def poisoned_empty(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty that fills floats with NaN and integers with POISON_INT, so an unwritten element shows."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan") if dtype.is_floating_point else POISON_INT)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaN == NaN when their bits agree)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(bits), b.contiguous().view(bits)
    return torch.equal(a, b)


def layout_problems(dispatch: Dispatch, x: torch.Tensor, local_ids: torch.Tensor, alignment: int) -> list[str]:
    """Every way `dispatch` breaks the layout contract for rows x [M, H] routed by local_ids [M, k] (-1: not local),
    with segments aligned to the GEMM backend's `alignment` (what the dispatch says of itself is not trusted)."""
    problems: list[str] = []
    if dispatch.alignment != alignment:
        problems.append(f"segments aligned to {dispatch.alignment}, the GEMM backend needs {alignment}")
    num_local_experts = dispatch.num_local_experts
    counts = layouts.expert_counts(local_ids.cpu(), num_local_experts)
    if list(dispatch.counts_host) != counts.tolist() or dispatch.counts.cpu().tolist() != counts.tolist():
        return [f"counts {dispatch.counts.cpu().tolist()} (host {list(dispatch.counts_host)}) "
                f"!= routed {counts.tolist()}"]

    out_index = dispatch.output_index.long().cpu()
    local = local_ids.cpu()
    if not torch.equal(out_index[local < 0], torch.full_like(out_index[local < 0], -1)):
        problems.append("output_index is not -1 on every slot whose id is -1 or remote")
    token, slot, expert = layouts.assignments(local).unbind(1)
    rows = out_index[token, slot]
    if dispatch.layout is Layout.CONTIGUOUS:
        first = layouts.segment_starts(counts, alignment)[expert]
        expected_m = layouts.expected_m_indices(counts, alignment)
        if dispatch.m_indices is None or not torch.equal(dispatch.m_indices.cpu(), expected_m):
            problems.append(f"m_indices differs from the aligned segments (expert on valid rows, -1 on padding; "
                            f"{expected_m.numel()} rows expected, got {tuple(dispatch.rows.shape)})")
    else:
        first = expert * dispatch.block_rows
        if dispatch.block_rows < int(counts.max()) or dispatch.rows.shape[0] != num_local_experts:
            problems.append(f"masked block {tuple(dispatch.rows.shape)} cannot hold counts {counts.tolist()}")
    inside = (rows >= first) & (rows < first + counts[expert])
    if not inside.all():
        bad = int((~inside).nonzero()[0])
        problems.append(f"token {int(token[bad])} slot {int(slot[bad])} (expert {int(expert[bad])}) got row "
                        f"{int(rows[bad])}, outside its segment [{int(first[bad])}, +{int(counts[expert[bad]])})")
    elif rows.unique().numel() != rows.numel():
        problems.append("two (token, slot) pairs share a row")
    elif rows.numel() and not bitwise_equal(dispatch.flat_rows().cpu()[rows], x.cpu()[token]):
        problems.append("a scattered row is not a bitwise copy of its token's x row")
    return problems


def restore(tensors, saved) -> None:
    """Copy `saved` back into every tensor an implementation wrote into."""
    for t, original in zip(tensors, saved, strict=True):
        if not bitwise_equal(t, original):
            t.copy_(original)


def valid_row_mask(dispatch: Dispatch) -> torch.Tensor:
    """Bool [num_rows] over the layout's flat rows: True where a row holds a token."""
    counts = torch.tensor(dispatch.counts_host, dtype=torch.int64)
    if dispatch.layout is Layout.CONTIGUOUS:
        return layouts.expected_m_indices(counts, dispatch.alignment) >= 0
    return (torch.arange(dispatch.block_rows)[None, :] < counts[:, None]).flatten()


def poison_padding(dispatch: Dispatch) -> Dispatch:
    """The same dispatch with every row that holds no token set to NaN: a stage that reads one poisons a result."""
    rows = dispatch.rows.clone()
    rows.view(-1, rows.shape[-1])[~valid_row_mask(dispatch).to(rows.device)] = float("nan")
    return dataclasses.replace(dispatch, rows=rows)


def permute_segments(dispatch: Dispatch, generator: torch.Generator) -> Dispatch:
    """A legal alternative slot order (what other GPU atomics could have produced): the rows inside each expert's
    segment permuted at random, together with `output_index`."""
    counts = torch.tensor(dispatch.counts_host, dtype=torch.int64)
    valid = valid_row_mask(dispatch).nonzero().flatten()  # flat rows holding tokens, expert by expert, in order
    shuffled = torch.cat([valid[torch.randperm(int(c), generator=generator) + int(o)]
                          for c, o in zip(counts, torch.cumsum(counts, 0) - counts, strict=True)])
    new_row_of = torch.full((dispatch.flat_rows().shape[0],), -1, dtype=torch.int64)
    new_row_of[valid] = shuffled
    rows = dispatch.rows.clone()
    device = rows.device
    rows.view(-1, rows.shape[-1])[shuffled.to(device)] = dispatch.flat_rows()[valid.to(device)]
    index = dispatch.output_index.long()
    moved = torch.where(index >= 0, new_row_of.to(device)[index.clamp_min(0)], index)
    return dataclasses.replace(dispatch, rows=rows, output_index=moved.to(torch.int32))
