"""Scatter stage: global ids -> local ids and counts (on device), then tokens -> per-expert rows.

`route_local_experts` maps GLOBAL ids to this rank's LOCAL ids and histograms them on the device, so a caller's count
can never make a scatter write out of bounds; it reads nothing back. `count_local_experts` (the synced pipeline where
it reads first) is that, then `read_counts`, which reads the counts back to size the buffers: the pipeline's one
device-to-host sync before its GEMMs, which carries the out-of-range id count too, so bad ids cost no extra sync.
`check_routing` is that check on stats read back otherwise (published by `route_scatter_masked`, or copied after a
scatter).

`scatter_contiguous` / `scatter_masked` copy each local (token, slot) to a row of its expert and return a
`kernels.dispatch.Dispatch` (the layouts, and the arithmetic that sizes them, are described there).
`route_scatter_masked` is the route and the masked scatter in one kernel, where nothing is read back in between: the
decode path's, and the synced pipeline's early scatter (into a block sized before the counts are read). Rows inside
a segment are assigned by atomics: their order is NOT deterministic on a GPU.
`output_index` is the authoritative token -> row map that the gather follows. A slot that finds no room (its expert's
segment is full, or its block is: only when the sizes came from somewhere else than these ids) is dropped, counted in
the routing's stats, never written; the masked layout's counts (masked_m) are then the rows actually filled.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kernels._details import stage_kernels as K
from kernels._details.launch import Launcher, cdiv, next_power_of_2
from kernels._device import interpreting
from kernels.dispatch import (
    Allocator,
    Dispatch,
    Layout,
    LocalRouting,
    contiguous_rows,
    expected_local_slots,
    masked_block_rows,
)

_LOCAL_IDS = Launcher(K.local_ids_kernel)
_SCATTER = Launcher(K.scatter_kernel)
_M_INDICES = Launcher(K.m_indices_kernel)
_ROUTE_SCATTER_MASKED = Launcher(K.route_scatter_masked_kernel)


def _check(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes or t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D {'/'.join(map(str, dtypes))} tensor, got {t.dtype} "
                         f"{tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def route_local_experts(
    topk_ids: torch.Tensor, *, ep_rank: int, num_local_experts: int, num_experts: int
) -> LocalRouting:
    """Local ids, counts and stats of rank `ep_rank` on the device; nothing is read back (counts_host is None)."""
    _check("topk_ids", topk_ids, (torch.int32, torch.int64), 2)
    local_ids = torch.empty(topk_ids.shape, dtype=torch.int32, device=topk_ids.device)
    stats = torch.zeros(num_local_experts + 2, dtype=torch.int32, device=topk_ids.device)
    # one-hot histogram of [block, E_PAD]: big blocks for the interpreter, register-sized ones on a GPU
    block = 1024 if interpreting() else max(32, 8192 // next_power_of_2(num_local_experts))
    _LOCAL_IDS[(cdiv(topk_ids.numel(), block),)](
        topk_ids, local_ids, stats, topk_ids.numel(), ep_rank * num_local_experts, num_local_experts, num_experts,
        BLOCK=block, E_PAD=next_power_of_2(num_local_experts),
    )
    return LocalRouting(local_ids, stats[:num_local_experts], None, stats)


def check_routing(stats: Sequence[int], num_experts: int, host_counts: Sequence[int] | None = None) -> int:
    """Raise ValueError on ids outside [-1, num_experts) or on host counts the ids contradict; else return the number
    of slots the scatter dropped. `stats`: a LocalRouting's stats, read back."""
    *histogram, num_bad, dropped = stats
    if num_bad:
        raise ValueError(f"topk_ids: {num_bad} id(s) outside [-1, num_experts={num_experts})")
    if host_counts is not None and list(host_counts) != histogram:
        raise ValueError(f"host_counts {list(host_counts)} != the counts of topk_ids on this rank {histogram}")
    return dropped


def count_local_experts(
    topk_ids: torch.Tensor, *, ep_rank: int, num_local_experts: int, num_experts: int
) -> LocalRouting:
    """Local ids and counts of rank `ep_rank`, counts read back; raises ValueError if any id lies outside
    [-1, num_experts). Synchronizes once (reads E_local + 2 int32 back)."""
    return read_counts(route_local_experts(topk_ids, ep_rank=ep_rank, num_local_experts=num_local_experts,
                                           num_experts=num_experts), num_experts)


def read_counts(routing: LocalRouting, num_experts: int) -> LocalRouting:
    """`routing` with its counts read back (the sync: waits for every kernel queued so far); raises ValueError if any
    id lies outside [-1, num_experts)."""
    stats = routing.stats.tolist()
    check_routing(stats, num_experts)
    return LocalRouting(routing.local_ids, routing.counts, tuple(stats[: routing.num_local_experts]), routing.stats)


@functools.cache  # asked at every call of the host-bound decode path; never mutated by its callers
def _scatter_config(hidden: int, topk: int) -> dict:
    """Tokens per program and the columns each loads at once (kernels/_details/stage_kernels.py, `_place`)."""
    if interpreting():  # few, large programs: the interpreter pays per program and per op, not per element
        return dict(BLOCK_T=max(1, 256 // next_power_of_2(topk)), BLOCK_H=min(next_power_of_2(hidden), 1024),
                    TOPK=topk, K_PAD=next_power_of_2(topk))
    # one token per program, its whole row at once up to 8192 columns (H200, graphed, M = 4096: four warps ahead of
    # eight at Qwen3-, DeepSeek- and gpt-oss-like shapes)
    return dict(BLOCK_T=1, BLOCK_H=min(next_power_of_2(hidden), 8192), TOPK=topk, K_PAD=next_power_of_2(topk),
                num_warps=4)


def _scatter(x, routing, rows, masked: bool, block_rows: int, alignment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """output_index, and the fill counters: the rows each expert received (masked_m for the masked layout)."""
    _check("x", x, (torch.bfloat16,), 2)
    if routing.local_ids.shape[0] != x.shape[0]:
        raise ValueError(f"local_ids has {routing.local_ids.shape[0]} rows but x has {x.shape[0]}")
    num_local_experts = routing.num_local_experts
    output_index = torch.empty(routing.local_ids.shape, dtype=torch.int32, device=x.device)
    fill = torch.zeros(num_local_experts, dtype=torch.int32, device=x.device)
    cfg = _scatter_config(x.shape[1], routing.local_ids.shape[1])
    _SCATTER[(cdiv(x.shape[0], cfg["BLOCK_T"]),)](
        x, routing.local_ids, routing.counts, fill, routing.stats, rows, output_index,
        x.shape[0], x.shape[1], num_local_experts, block_rows,
        MASKED=masked, ALIGN=alignment, E_PAD=next_power_of_2(num_local_experts), **cfg,
    )
    return output_index, fill


def scatter_contiguous(
    x: torch.Tensor, routing: LocalRouting, *, alignment: int = 128, empty: Allocator = torch.empty
) -> Dispatch:
    """Contiguous (flat) layout (kernels/dispatch.py), sized by the host's counts. `empty` allocates every output
    buffer."""
    _check_alignment(alignment)
    if routing.counts_host is None:
        raise ValueError("routing: the contiguous layout is sized by counts on the host (counts_host is None)")
    num_rows = contiguous_rows(routing.counts_host, alignment)
    rows = empty((num_rows, x.shape[1]), dtype=torch.bfloat16, device=x.device)
    output_index, _ = _scatter(x, routing, rows, masked=False, block_rows=0, alignment=alignment)
    m_indices = empty((num_rows,), dtype=torch.int32, device=x.device)
    num_local_experts = routing.num_local_experts
    block = 1024 if interpreting() else max(16, 4096 // next_power_of_2(num_local_experts))
    _M_INDICES[(cdiv(num_rows, block),)](
        routing.counts, m_indices, num_rows, num_local_experts, ALIGN=alignment,
        E_PAD=next_power_of_2(num_local_experts), BLOCK_R=block,
    )
    return Dispatch(Layout.CONTIGUOUS, rows, output_index, routing.counts, routing.counts_host, alignment, m_indices)


def scatter_masked(
    x: torch.Tensor, routing: LocalRouting, *, alignment: int = 128, empty: Allocator = torch.empty,
    block_rows: int | None = None,
) -> Dispatch:
    """Masked (3D) layout (kernels/dispatch.py): blocks of `masked_block_rows` rows, sized by the host's counts, not
    M; or of `block_rows` rows (a multiple of `alignment`) when the counts stay on the device. The Dispatch's counts
    (masked_m) are the rows each block received."""
    _check_alignment(alignment)
    if block_rows is None:
        if routing.counts_host is None:
            raise ValueError("block_rows: needed when the routing's counts are not on the host")
        block_rows = masked_block_rows(routing.counts_host, alignment)
    else:
        _check_block_rows(block_rows, alignment)
    rows = empty((routing.num_local_experts, block_rows, x.shape[1]), dtype=torch.bfloat16, device=x.device)
    output_index, masked_m = _scatter(x, routing, rows, masked=True, block_rows=block_rows, alignment=alignment)
    return Dispatch(Layout.MASKED, rows, output_index, masked_m, routing.counts_host, alignment)


def route_scatter_masked(
    x: torch.Tensor, topk_ids: torch.Tensor, *, ep_rank: int, num_local_experts: int, num_experts: int,
    block_rows: int, alignment: int = 128, empty: Allocator = torch.empty, publish: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> tuple[Dispatch, torch.Tensor | None]:
    """`route_local_experts` then `scatter_masked(..., block_rows=block_rows)` in one kernel, for the decode path
    (counts on the device: the blocks are placed without them). Returns the Dispatch (counts_host None; the local
    slots expected as the GEMMs' hint, `expected_local_slots`) and the routing's stats ([histogram..., bad ids,
    dropped slots], as LocalRouting.stats; None with `counters`), read by nothing here. `publish`: an int32
    [E_local + 2] host tensor (pinned, on a GPU) into which the kernel copies the final stats once every slot is
    placed: read it after an event recorded behind this call (no device-to-host copy is queued, so nothing stands
    between the scatter and the GEMMs). `counters`: int32 [2 * E_local + 3] zeros on x's device that the caller keeps
    for its next call on this stream: the kernel leaves them zero again (its last program copies masked_m out first),
    so no memset is launched; None: zeroed here."""
    _check("x", x, (torch.bfloat16,), 2)
    _check("topk_ids", topk_ids, (torch.int32, torch.int64), 2)
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows but x has {x.shape[0]}")
    _check_alignment(alignment)
    _check_block_rows(block_rows, alignment)
    if publish is not None and (publish.dtype != torch.int32 or publish.shape != (num_local_experts + 2,)
                                or publish.is_cuda):  # unpinned on a GPU: Triton refuses the pointer itself
        raise ValueError(f"publish must be an int32 [{num_local_experts + 2}] host tensor (pinned when x is on a GPU), "
                         f"got {publish.dtype} {tuple(publish.shape)} on {publish.device}")
    rows = empty((num_local_experts, block_rows, x.shape[1]), dtype=torch.bfloat16, device=x.device)
    output_index = empty(topk_ids.shape, dtype=torch.int32, device=x.device)
    reset = counters is not None  # kept counters: the kernel copies masked_m out and leaves them zero
    if reset:
        if counters.dtype != torch.int32 or counters.shape != (2 * num_local_experts + 3,) \
                or counters.device != x.device:
            raise ValueError(f"counters must be int32 [{2 * num_local_experts + 3}] zeros on {x.device}, got "
                             f"{counters.dtype} {tuple(counters.shape)} on {counters.device}")
        masked_m = empty((num_local_experts,), dtype=torch.int32, device=x.device)
    else:
        counters = torch.zeros(2 * num_local_experts + 3, dtype=torch.int32, device=x.device)  # fill, stats, done
        masked_m = counters[:num_local_experts]
    cfg = _scatter_config(x.shape[1], topk_ids.shape[1])
    _ROUTE_SCATTER_MASKED[(cdiv(x.shape[0], cfg["BLOCK_T"]),)](
        x, topk_ids, counters, rows, output_index, counters if publish is None else publish, masked_m, x.shape[0],
        x.shape[1], ep_rank * num_local_experts, num_local_experts, num_experts, block_rows,
        PUBLISH=publish is not None, RESET=reset, E_PAD=next_power_of_2(num_local_experts),
        STATS_PAD=next_power_of_2(num_local_experts + 3), **cfg,
    )
    expected = expected_local_slots(x.shape[0], topk_ids.shape[1], num_experts, num_local_experts)
    return Dispatch(Layout.MASKED, rows, output_index, masked_m, None, alignment, expected_slots=expected), \
        None if reset else counters[num_local_experts : 2 * num_local_experts + 2]


def _check_alignment(alignment: int) -> None:
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, got {alignment}")


def _check_block_rows(block_rows: int, alignment: int) -> None:
    if block_rows < alignment or block_rows % alignment:
        raise ValueError(f"block_rows must be a positive multiple of alignment={alignment}, got {block_rows}")
