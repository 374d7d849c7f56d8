"""@triton.jit kernels of the memory-bound stages. Launchers (with argument checks) live in kernels/*.py.

Rules every kernel here follows:
- bf16 values are only loaded, stored, or cast to fp32 before any arithmetic (the Triton interpreter holds bf16 as
  raw uint16, so bf16 arithmetic and comparisons would be wrong there);
- pointer offsets are computed in int64 (rows x hidden can pass 2**31 at prefill sizes);
- every store is masked, so no kernel writes outside the buffers its launcher sized.
"""

import triton
import triton.language as tl

from kernels._details.common import silu_mul, to_bf16


@triton.jit
def _segment_starts(counts_ptr, num_local_experts, ALIGN: tl.constexpr, E_PAD: tl.constexpr):
    """Contiguous layout: exclusive prefix sum of the counts aligned up to ALIGN ([E_PAD] vector), and the counts."""
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < num_local_experts, other=0)
    aligned = (counts + ALIGN - 1) // ALIGN * ALIGN
    return tl.cumsum(aligned, 0) - aligned, counts


@triton.jit
def _local_ids(topk_ids_ptr, offs, in_range, first_expert, num_local_experts, num_experts):
    """GLOBAL ids at offs -> LOCAL ids (-1 where not on this rank, int32), and where an id lies outside
    [-1, num_experts)."""
    ids = tl.load(topk_ids_ptr + offs, mask=in_range, other=-1).to(tl.int64)
    bad = in_range & ((ids < -1) | (ids >= num_experts))
    local = ids - first_expert
    here = in_range & (ids >= 0) & (local >= 0) & (local < num_local_experts)
    return tl.where(here, local, -1).to(tl.int32), bad


@triton.jit
def _count(local, bad, stats_ptr, num_local_experts, E_PAD: tl.constexpr):
    """Adds the histogram of local ids ([rows, columns], -1 for none) and the bad-id count to stats: one atomic per
    expert the program saw (not one per slot, and none for the others). Relaxed atomics: nothing is read back before
    the kernel ends, except by the fused scatter's publishing program, which a CTA barrier and a release order after
    them (route_scatter_masked_kernel)."""
    experts = tl.arange(0, E_PAD)
    block_counts = tl.sum(tl.sum((local[:, :, None] == experts[None, None, :]).to(tl.int32), axis=1), axis=0)
    tl.atomic_add(stats_ptr + experts, block_counts, mask=(experts < num_local_experts) & (block_counts > 0),
                  sem="relaxed")
    num_bad = tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0)
    if num_bad > 0:
        tl.atomic_add(stats_ptr + num_local_experts, num_bad, sem="relaxed")


@triton.jit
def local_ids_kernel(
    topk_ids_ptr, local_ids_ptr, stats_ptr,  # stats = [counts per local expert..., number of out-of-range ids]
    num_slots, first_expert, num_local_experts, num_experts,
    BLOCK: tl.constexpr, E_PAD: tl.constexpr,
):
    """GLOBAL ids -> LOCAL ids (-1 where not on this rank), per-local-expert counts, and a bad-id count."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_slots
    local, bad = _local_ids(topk_ids_ptr, offs, in_range, first_expert, num_local_experts, num_experts)
    tl.store(local_ids_ptr + offs, local, mask=in_range)
    _count(local[:, None], bad[:, None], stats_ptr, num_local_experts, E_PAD)


@triton.jit
def _token_slots(num_tokens, TOPK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """The program's tokens [BLOCK_T], the flat offsets of their slots [BLOCK_T, K_PAD], and which slots exist."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.arange(0, K_PAD)
    offs = tokens[:, None] * TOPK + ks[None, :]
    return tokens, offs, (tokens < num_tokens)[:, None] & (ks < TOPK)[None, :]


@triton.jit
def _copy_rows(values, row, cols, hidden, rows_ptr):
    """values [BLOCK_T, BLOCK_H] (columns `cols` of the program's tokens) stored into each of their slots' rows (row
    [BLOCK_T, K_PAD], -1 for none), all slots in one masked store."""
    dest = rows_ptr + tl.where(row >= 0, row, 0)[:, :, None] * hidden + cols[None, None, :]
    tl.store(dest, values[:, None, :], mask=(row >= 0)[:, :, None] & (cols < hidden)[None, None, :])


@triton.jit
def _place(x_ptr, tokens, local, offs, in_range, start, room, fill_ptr, stats_ptr, rows_ptr, output_index_ptr,
           hidden, num_local_experts, BLOCK_H: tl.constexpr):
    """Each local slot (local >= 0) of the program's tokens takes the next row of its expert's room (an atomic on the
    fill counter: relaxed, only the tickets' uniqueness matters) from `start`, and x[token] is copied there: read once
    per token, however many of its slots are local, and its first BLOCK_H columns loaded before the tickets are
    taken, so that the load and the atomics are in flight together (H200, graphed, M = 4096: Qwen3-like 22.6 -> 18.6
    us, DeepSeek-like 48.6 -> 44.6 us against one program per 4 slots). A slot whose ticket is past the room is
    dropped: counted in stats, its fill ticket given back (so a fill ends at min(count, room), the rows filled),
    nothing written. output_index[slot] = the row (flat over the layout's rows), -1 for skipped and dropped ids."""
    valid = in_range & (local >= 0)
    wanted = tl.max(valid.to(tl.int32), axis=1) > 0  # the tokens with a local slot: only their rows of x are read
    cols = tl.arange(0, BLOCK_H)
    x_rows = x_ptr + tokens[:, None] * hidden
    values = tl.load(x_rows + cols[None, :], mask=wanted[:, None] & (cols < hidden)[None, :])
    expert = tl.where(valid, local, 0)
    slot = tl.atomic_add(fill_ptr + expert, 1, mask=valid, sem="relaxed")
    dropped = valid & (slot >= room)
    num_dropped = tl.sum(tl.sum(dropped.to(tl.int32), axis=1), axis=0)
    if num_dropped > 0:
        tl.atomic_add(fill_ptr + expert, -1, mask=dropped, sem="relaxed")
        # LocalRouting.stats: [..., bad, dropped]
        tl.atomic_add(stats_ptr + num_local_experts + 1, num_dropped, sem="relaxed")
    valid = valid & (slot < room)
    row = tl.where(valid, start + slot.to(tl.int64), -1)
    tl.store(output_index_ptr + offs, row.to(tl.int32), mask=in_range)
    _copy_rows(values, row, cols, hidden, rows_ptr)
    for h0 in range(BLOCK_H, hidden, BLOCK_H):  # hidden sizes past BLOCK_H
        values = tl.load(x_rows + h0 + cols[None, :], mask=wanted[:, None] & (h0 + cols < hidden)[None, :])
        _copy_rows(values, row, h0 + cols, hidden, rows_ptr)


@triton.jit
def scatter_kernel(
    x_ptr, local_ids_ptr, counts_ptr, fill_ptr, stats_ptr, rows_ptr, output_index_ptr,
    num_tokens, hidden, num_local_experts, block_rows,
    MASKED: tl.constexpr, ALIGN: tl.constexpr, E_PAD: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Each local (token, slot) of the program's BLOCK_T tokens takes a row of its expert's segment and x[token] is
    copied there (`_place`).

    Contiguous: expert e's segment starts at the aligned prefix sum of the counts and holds counts[e] rows. Masked:
    block e starts at row e * block_rows and holds block_rows rows."""
    tokens, offs, in_range = _token_slots(num_tokens, TOPK, K_PAD, BLOCK_T)
    local = tl.load(local_ids_ptr + offs, mask=in_range, other=-1)
    if MASKED:
        start = local.to(tl.int64) * block_rows
        room = block_rows
    else:
        starts, counts = _segment_starts(counts_ptr, num_local_experts, ALIGN, E_PAD)
        experts = tl.arange(0, E_PAD)
        mine = local[:, :, None] == experts[None, None, :]
        start = tl.sum(tl.where(mine, starts[None, None, :], 0), axis=2).to(tl.int64)
        room = tl.sum(tl.where(mine, counts[None, None, :], 0), axis=2)
    _place(x_ptr, tokens, local, offs, in_range, start, room, fill_ptr, stats_ptr, rows_ptr, output_index_ptr,
           hidden, num_local_experts, BLOCK_H)


@triton.jit
def route_scatter_masked_kernel(
    x_ptr, topk_ids_ptr, counters_ptr, rows_ptr, output_index_ptr, host_ptr, masked_m_ptr,
    num_tokens, hidden, first_expert, num_local_experts, num_experts, block_rows,
    PUBLISH: tl.constexpr, RESET: tl.constexpr, E_PAD: tl.constexpr, STATS_PAD: tl.constexpr, TOPK: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """local_ids_kernel and the masked scatter_kernel in one launch (the decode path: counts stay on the device, so
    the blocks are placed without them): GLOBAL ids mapped, counted into stats, and their slots placed.

    counters (zeroed): fill [E_local], stats [E_local + 2], done [1]. With PUBLISH, the last program to finish copies
    the final stats to host_ptr (pinned host memory): the host reads them once the kernel is done, with no copy queued
    between this kernel and the GEMMs. With RESET, the last program copies the final fill to masked_m_ptr (the
    GEMMs' masked_m) and zeroes every counter, so that the caller may keep them for its next launch on this stream
    without a memset (a fill kernel's launch; kernels/executor.py, `_Reused`). Every program's atomics on the counters
    happen before its ticket on `done` (a CTA barrier, then a release: the pattern of CUDA's cooperative-groups grid
    barrier), and the program holding the last ticket reads them after acquiring it."""
    fill_ptr = counters_ptr
    stats_ptr = counters_ptr + num_local_experts
    tokens, offs, in_range = _token_slots(num_tokens, TOPK, K_PAD, BLOCK_T)
    local, bad = _local_ids(topk_ids_ptr, offs, in_range, first_expert, num_local_experts, num_experts)
    _count(local, bad, stats_ptr, num_local_experts, E_PAD)
    _place(x_ptr, tokens, local, offs, in_range, local.to(tl.int64) * block_rows, block_rows, fill_ptr, stats_ptr,
           rows_ptr, output_index_ptr, hidden, num_local_experts, BLOCK_H)
    if PUBLISH or RESET:
        tl.debug_barrier()  # every thread's atomics on the counters done before the ticket is taken
        ticket = tl.atomic_add(counters_ptr + 2 * num_local_experts + 2, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            entries = tl.arange(0, STATS_PAD)
            if PUBLISH:
                mine = entries < num_local_experts + 2
                final = tl.atomic_add(stats_ptr + entries, tl.zeros([STATS_PAD], dtype=tl.int32), mask=mine,
                                      sem="acquire")
                tl.store(host_ptr + entries, final, mask=mine)
            if RESET:
                experts = tl.arange(0, E_PAD)
                ours = experts < num_local_experts
                filled = tl.atomic_add(fill_ptr + experts, tl.zeros([E_PAD], dtype=tl.int32), mask=ours,
                                       sem="acquire")
                tl.store(masked_m_ptr + experts, filled, mask=ours)
                tl.store(fill_ptr + experts, tl.zeros([E_PAD], dtype=tl.int32), mask=ours)
                and_done = entries < num_local_experts + 3  # stats, then the ticket counter
                tl.store(stats_ptr + entries, tl.zeros([STATS_PAD], dtype=tl.int32), mask=and_done)


@triton.jit
def m_indices_kernel(
    counts_ptr, m_indices_ptr, num_rows, num_local_experts,
    ALIGN: tl.constexpr, E_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Contiguous layout: m_indices[row] = e on expert e's first counts[e] rows, -1 on every padding row."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    starts, counts = _segment_starts(counts_ptr, num_local_experts, ALIGN, E_PAD)
    experts = tl.arange(0, E_PAD)
    holds = (rows[:, None] >= starts[None, :]) & (rows[:, None] < starts[None, :] + counts[None, :])
    expert = tl.sum(tl.where(holds, experts[None, :], 0), axis=1)
    expert = tl.where(tl.sum(holds.to(tl.int32), axis=1) > 0, expert, -1)
    tl.store(m_indices_ptr + rows, expert.to(tl.int32), mask=rows < num_rows)


@triton.jit
def silu_and_mul_kernel(
    h_ptr, a_ptr, layout_ptr, num_rows, inter, block_rows,  # layout_ptr: m_indices or masked_m
    MASKED: tl.constexpr, GATE_FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """a = silu(gate) * up on valid rows only (fp32 math from bf16, bf16 store); padding rows are not touched.

    Valid rows: contiguous, m_indices[row] >= 0; masked, row % block_rows < masked_m[row // block_rows]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < num_rows
    if MASKED:
        filled = tl.load(layout_ptr + rows // block_rows, mask=in_range, other=0)
        valid = in_range & (rows % block_rows < filled)
    else:
        valid = in_range & (tl.load(layout_ptr + rows, mask=in_range, other=-1) >= 0)
    if tl.max(valid.to(tl.int32), axis=0) == 0:  # all padding (a skewed masked block is mostly that): leave now
        return
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = valid[:, None] & (cols[None, :] < inter)
    first = tl.load(h_ptr + rows[:, None] * (2 * inter) + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    second = tl.load(h_ptr + rows[:, None] * (2 * inter) + inter + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GATE_FIRST:
        gate, up = first, second
    else:
        gate, up = second, first
    tl.store(a_ptr + rows[:, None] * inter + cols[None, :], to_bf16(silu_mul(gate, up)), mask=mask)


@triton.jit
def gather_kernel(
    y_ptr, output_index_ptr, weights_ptr, out_ptr, num_tokens, hidden,
    TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] = sum over slots k (in order) of weight[t, k] * y[output_index[t, k]], fp32 accumulation, bf16 store.
    Slots with output_index -1 are skipped; every row of out is written (0 where no slot is local). The slot loop is
    unrolled (TOPK is a constant); a slot local to none of the program's tokens is skipped by a branch, which leaves
    the sum as it was (under ep 8 seven slots in eight are remote). The rows of y, each read once, are loaded
    evict_first (docs/design.md, "The stage kernels' shapes and launches")."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_range = tokens < num_tokens
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOPK):
        row = tl.load(output_index_ptr + tokens * TOPK + k, mask=in_range, other=-1).to(tl.int64)
        if tl.max((row >= 0).to(tl.int32), axis=0) > 0:
            weight = tl.load(weights_ptr + tokens * TOPK + k, mask=in_range, other=0.0)
            used = (row >= 0)[:, None] & col_ok[None, :]
            row = tl.where(row >= 0, row, 0)
            # each row of y is read once, by one program: evict_first leaves L2 to the rest
            values = tl.load(y_ptr + row[:, None] * hidden + cols[None, :], mask=used, other=0.0,
                             eviction_policy="evict_first").to(tl.float32)
            acc = tl.where(used, acc + weight[:, None] * values, acc)
    tl.store(out_ptr + tokens[:, None] * hidden + cols[None, :], to_bf16(acc),
             mask=in_range[:, None] & col_ok[None, :])
