"""The hybrid executor: `moe_expert_forward`, the bf16 expert stage of one rank under DeepEP normal mode.

    route (global -> local ids, per-expert counts, on the device)
      -> [sync="before": counts read back, the one device->host sync before the GEMMs; where the masked layout may
          serve, the route and the masked scatter run first, as one kernel, and the read waits for them]
      -> layout choice (masked 3D block or contiguous flat rows)
      -> scatter (without counts on the host, route and scatter are one kernel)
      -> grouped GEMM (gate+up) -> silu_and_mul -> grouped GEMM (down) -> gather with router weights
         (gemm="auto": the backend chosen for the shapes, or for a decode-sized masked block the Triton skinny
          kernel, which fuses silu_and_mul into the gate+up GEMM: kernels/gemm/triton.py)
      -> [sync="after": the routing's error flags read back once every kernel is queued (the decode path's scatter
          writes them to pinned host memory itself, the other paths copy them after the scatter: either way the read
          waits for the scatter, not for the GEMMs)]

With the counts on the host (read back, or the caller's `host_counts`), every buffer is sized from the routing
actually seen, by the arithmetic of kernels/dispatch.py (the masked block from the largest per-expert count, the
contiguous rows from the aligned counts), except the early scatter's block: sync="before" scatters into a masked block
sized from the counts expected (`speculative_block_rows`, a tail bound of uniform routing) before it reads, so that
the GPU is busy while the host waits (the host's work between the read and the first GEMM left the GPU idle: ~0.1 ms
a call at DeepSeek-like M = 256 on an H200), and scatters again, sized by the counts read, only when that block
overflowed or the layout rule picked contiguous. Without counts (sync="after" / "never", the decode path) the masked
block is sized from M, which the host knows (`unsynced_block_rows`), the GEMMs read masked_m on the device, and
nothing waits for the GPU before the last kernel is queued; sync="never" reads nothing at all, so the stage can be
captured in a CUDA graph (kernels/graphs.py). Inputs are never modified. `Stages` lists the replaceable pieces:
tests swap one to inject legal slot permutations, poisoned allocations or mutants, without touching this file. The
contract this implements: docs/contract.md, "Entry points".
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import typing
from collections.abc import Callable, Sequence

import torch

from kernels import activation, gather, scatter
from kernels.dispatch import (
    Allocator,
    Dispatch,
    Layout,
    LocalRouting,
    masked_block_bytes,
    masked_bytes,
    speculative_block_rows,
    unsynced_block_rows,
)
from kernels.gemm import BACKENDS, GroupedGemm, for_dispatch, select

LAYOUT_CHOICES = ("auto", *(str(layout) for layout in Layout))
SYNCS = ("before", "after", "never")
GEMMS = ("auto", *BACKENDS)
GATE_UP_ORDERS = activation.GATE_UP_ORDERS

# Layout rule used when `masked_max_tokens` is not given (docs/design.md, "Choosing the layout"), fitted by
# verify.perf.report.fit_layout_rule to the bench run in baselines/results/nvidia-h200/bench.json (62 points: 7
# shapes x uniform and skewed routings, M = 1..16384): masked was the faster layout wherever its block fitted the
# budget, up to the largest mean measured (2250 rows per active expert), so the fitted bound sits at twice that.
# Its cost is memory: the block holds E_local x block_rows rows of x, h, a and y, however skewed the counts are, and
# the budget is what turns skewed and prefill-sized batches contiguous.
MASKED_MAX_MEAN_ROWS = 4500
MASKED_BLOCK_BUDGET_BYTES = 2 << 30


def choose_layout(
    counts: Sequence[int], num_tokens: int, hidden: int, inter: int, alignment: int, masked_max_tokens: int | None
) -> Layout:
    """The layout for this routing. With masked_max_tokens: masked iff M <= it."""
    if masked_max_tokens is not None:
        return Layout.MASKED if num_tokens <= masked_max_tokens else Layout.CONTIGUOUS
    active = [c for c in counts if c]
    mean_rows = sum(active) / max(len(active), 1)
    fits = masked_block_bytes(counts, hidden, inter, alignment) <= MASKED_BLOCK_BUDGET_BYTES
    return Layout.MASKED if fits and mean_rows <= MASKED_MAX_MEAN_ROWS else Layout.CONTIGUOUS


def _unchanged(dispatch: Dispatch) -> Dispatch:
    return dispatch


@dataclasses.dataclass(frozen=True)
class Stages:
    """The pipeline's replaceable pieces. Defaults are production; `dataclasses.replace` one to test it."""

    # sync="before" without host_counts: True (production) routes and scatters first, as one kernel
    # (`route_scatter_masked`), wherever the masked layout may serve, and reads while the GPU works; False reads the
    # counts first (`count`), then scatters (`scatter_masked` / `scatter_contiguous`). A test or mutant that replaces
    # count or scatter_masked sets it False, or its stage would not run where the early scatter serves.
    scatter_before_read: bool = True
    count: Callable[..., LocalRouting] = scatter.count_local_experts  # read first
    # host_counts given, or the early scatter's block overflowed: the host has the counts, nothing more is read
    route: Callable[..., LocalRouting] = scatter.route_local_experts
    # the decode path's and sync="before"'s early scatter; it must fill the host tensor passed as `publish` (the
    # stats read) when one is passed, and leave the `counters` passed (kept ones) zero
    route_scatter_masked: Callable[..., tuple[Dispatch, torch.Tensor | None]] = scatter.route_scatter_masked
    choose_layout: Callable[..., Layout] = choose_layout
    scatter_contiguous: Callable[..., Dispatch] = scatter.scatter_contiguous
    scatter_masked: Callable[..., Dispatch] = scatter.scatter_masked
    after_scatter: Callable[[Dispatch], Dispatch] = _unchanged  # e.g. a legal permutation of rows in a segment
    silu_and_mul: Callable[..., torch.Tensor] = activation.silu_and_mul
    gather: Callable[..., torch.Tensor] = gather.gather
    gemm: GroupedGemm | None = None  # overrides the `gemm` argument's backend when set
    empty: Allocator = torch.empty  # allocates every stage's output (tests poison them)


PRODUCTION = Stages()


def moe_expert_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    ep_size: int = 1,
    ep_rank: int = 0,
    num_experts: int | None = None,
    layout: str = "auto",
    masked_max_tokens: int | None = None,
    gemm: str = "auto",
    gate_up_order: str = "gate_up",
    sync: str = "before",
    host_counts: Sequence[int] | None = None,
    stages: Stages = PRODUCTION,
) -> torch.Tensor:
    """bf16 [M, H] output of rank `ep_rank`'s experts for the tokens it received (docs/contract.md, "Entry points").

    x bf16 [M, H]; topk_ids int32/int64 [M, k] GLOBAL ids or -1; topk_weights fp32 [M, k]; w13 bf16 [E_local, 2I, H];
    w2 bf16 [E_local, H, I]. layout: "auto" | "masked" | "contiguous"; gemm: "auto" | "deep_gemm" | "grouped_mm" |
    "triton" | "loop". sync: when the host reads the device ("before" the GEMMs, "after" every kernel is queued, or
    "never": CUDA-graph capture); host_counts: this rank's per-local-expert counts when the caller has them (DeepEP's
    num_recv_tokens_per_expert_list). Raises TypeError / ValueError naming the argument on bad input."""
    num_experts = _validate(x, topk_ids, topk_weights, w13, w2, ep_size, ep_rank, num_experts, layout,
                            masked_max_tokens, gemm, gate_up_order, sync, host_counts)
    num_tokens, hidden = x.shape
    num_local_experts, inter = w13.shape[0], w13.shape[1] // 2
    backend = stages.gemm or select(gemm, x.device, hidden, inter)[0]
    if num_tokens == 0:
        return torch.empty(0, hidden, dtype=torch.bfloat16, device=x.device)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if sync != "never" and capturing:
        raise ValueError(f"sync={sync!r} reads the device, which CUDA-graph capture forbids: capture with "
                         "sync='never' (kernels/graphs.py)")

    call = _Call(x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous(), w13.contiguous(), w2.contiguous(),
                 dict(ep_rank=ep_rank, num_local_experts=num_local_experts, num_experts=num_experts), layout,
                 masked_max_tokens, gemm, gate_up_order, stages, backend, capturing)
    return _forward(call, sync, host_counts)


class _Call(typing.NamedTuple):
    """One call's inputs (contiguous) and choices, as `_forward` and its steps read them."""

    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    where: dict  # ep_rank, num_local_experts, num_experts: what routing a global id needs
    layout: str  # as asked ("auto" too)
    masked_max_tokens: int | None
    gemm: str
    gate_up_order: str
    stages: Stages
    backend: GroupedGemm  # the backend chosen for the shapes
    capturing: bool  # under CUDA-graph capture


class _Scattered(typing.NamedTuple):
    dispatch: Dispatch
    scratch: Allocator  # what allocates the intermediates (h, a, y): stages.empty or the decode path's kept buffers
    flags: Callable[[], list[int]] | None  # sync="after": the routing's stats, read once every kernel is queued


def _forward(call: _Call, sync: str, host_counts: Sequence[int] | None) -> torch.Tensor:
    """route -> scatter -> GEMM (gate+up) -> silu_and_mul -> GEMM (down) -> gather, as the module docstring says."""
    on_device = sync != "before" and host_counts is None  # the decode path: the counts stay on the device
    scattered = _scatter_on_device(call, sync) if on_device else _scatter_by_counts(call, sync, host_counts)
    if scattered is None:
        if on_device:  # prefill-sized: the M-row block is over the budget, so read the counts first
            return _forward(call, "before", None)
        # sync="before" and every id remote or -1: nothing to compute, no GEMM
        return torch.zeros(call.x.shape[0], call.x.shape[1], dtype=torch.bfloat16, device=call.x.device)
    dispatch = call.stages.after_scatter(scattered.dispatch)
    y = _gemms(call, dispatch, scattered.scratch)
    out = call.stages.gather(y, dispatch, call.topk_weights, empty=call.stages.empty)
    if scattered.flags is not None:
        stats = scattered.flags()
        if scatter.check_routing(stats, call.where["num_experts"], host_counts):  # a row repeated an id past the
            return _forward(call, "before", stats[:call.where["num_local_experts"]])  # M-row block: by these counts
    return out


def _gemms(call: _Call, dispatch: Dispatch, scratch: Allocator) -> torch.Tensor:
    """y = (silu_and_mul of the gate+up GEMM) through the down GEMM, on the dispatch's rows."""
    backend, hidden, inter = call.backend, call.x.shape[1], call.w13.shape[1] // 2
    if call.stages.gemm is None and call.gemm == "auto":
        backend = for_dispatch(backend, dispatch, hidden, inter)
    # fused where the backend can (a stand-in silu_and_mul, a test's, always runs as its own stage)
    a = backend.gate_up_silu(dispatch.rows, call.w13, dispatch, call.gate_up_order, scratch) \
        if call.stages.silu_and_mul is activation.silu_and_mul else None
    if a is None:
        h = backend(dispatch.rows, call.w13, dispatch, scratch)
        a = call.stages.silu_and_mul(h, dispatch, gate_up_order=call.gate_up_order, empty=scratch)
    return backend(a, call.w2, dispatch, scratch)


def _scatter_on_device(call: _Call, sync: str) -> _Scattered | None:
    """The decode path (sync="after" / "never", no host counts): route + masked scatter as one kernel into an M-row
    block, from kept buffers where small; None where that block is over the masked budget (sync="never" raises)."""
    (num_tokens, hidden), inter = call.x.shape, call.w13.shape[1] // 2
    num_local_experts, alignment = call.where["num_local_experts"], call.backend.m_alignment
    if call.layout == "contiguous":
        raise ValueError(f"layout='contiguous' is sized by counts on the host: with sync={sync!r} pass "
                         "host_counts, or use layout='masked' / 'auto'")
    block_rows = unsynced_block_rows(num_tokens, alignment)
    nbytes = masked_bytes(num_local_experts, block_rows, hidden, inter)
    if nbytes > MASKED_BLOCK_BUDGET_BYTES:
        if sync == "never":
            raise ValueError(f"x: {num_tokens} tokens need a masked block of {block_rows} rows per expert when the "
                             f"counts stay on the device, over the {MASKED_BLOCK_BUDGET_BYTES} B budget: capture "
                             "fewer tokens, or pass host_counts")
        return None
    kept = _kept_buffers(call.x.device, (num_local_experts, block_rows, hidden, inter, call.gemm, call.gate_up_order),
                         nbytes) if call.stages.empty is torch.empty and not call.capturing else None
    scratch, counters = call.stages.empty, None
    if kept is not None:  # this small call's intermediates, and the scatter's counters, from kept buffers
        scratch = kept
        counters = kept.zeros((2 * num_local_experts + 3,), dtype=torch.int32, device=call.x.device)
    dispatch, flags = _route_scatter(call.stages, call.x, call.topk_ids, call.where, block_rows, alignment,
                                     publish=sync == "after", empty=scratch, counters=counters)
    return _Scattered(dispatch, scratch, flags)


def _scatter_by_counts(call: _Call, sync: str, host_counts: Sequence[int] | None) -> _Scattered | None:
    """The counts on the host (read back: sync="before"; or the caller's host_counts): the layout chosen from them and
    the buffers sized by them. Where the masked layout may serve, sync="before" routes and scatters first into a
    block sized from the counts expected and reads while the GPU works, scattering again only when that block
    overflowed or the layout rule picked contiguous. None: sync="before" and no id local (nothing to compute)."""
    x, stages, where, alignment = call.x, call.stages, call.where, call.backend.m_alignment
    (num_tokens, hidden), inter = x.shape, call.w13.shape[1] // 2
    num_experts, num_local_experts = where["num_experts"], where["num_local_experts"]
    rows, seen_as = _early_block(x.device, num_tokens, call.topk_ids.shape[1], num_experts, num_local_experts, hidden,
                                 inter, alignment, call.layout, call.masked_max_tokens, sync, host_counts, stages)
    early = rows if rows and seen_as not in _EARLY_MISSED else 0
    if early:  # route + masked scatter first, then the one read: the GPU scatters while the host waits
        scattered, read = _route_scatter(stages, x, call.topk_ids, where, early, alignment, publish=True,
                                         empty=stages.empty, counters=None)
        stats = read()
        dropped = scatter.check_routing(stats, num_experts)
        routing, counts_host = None, tuple(stats[:num_local_experts])
    elif host_counts is None:
        routing = stages.count(call.topk_ids, **where)
        counts_host = routing.counts_host
    else:
        routing = stages.route(call.topk_ids, **where)
        counts = _counts_source(host_counts, x.device).to(x.device, non_blocking=True)
        counts_host = tuple(host_counts)
        routing = dataclasses.replace(routing, counts=counts, counts_host=counts_host)
        if sync == "before":
            scatter.check_routing(routing.stats.tolist(), num_experts, host_counts)
    if sync == "before" and sum(counts_host) == 0:
        return None
    layout = call.layout
    if layout == "auto":
        layout = stages.choose_layout(counts_host, num_tokens, hidden, inter, alignment, call.masked_max_tokens)
    if rows:  # whether these counts suited the early block: what this shape's next call does
        suited = max(counts_host) <= rows and Layout(layout) is Layout.MASKED
        (_EARLY_MISSED.discard if suited else _EARLY_MISSED.add)(seen_as)
    if early and not dropped and Layout(layout) is Layout.MASKED:
        dispatch = dataclasses.replace(scattered, counts_host=counts_host, expected_slots=None)
    else:
        if routing is None:  # the early block overflowed, or the rule chose contiguous: again, by the counts
            routing = dataclasses.replace(stages.route(call.topk_ids, **where), counts_host=counts_host)
        scatter_to = stages.scatter_masked if Layout(layout) is Layout.MASKED else stages.scatter_contiguous
        dispatch = scatter_to(x, routing, alignment=alignment, empty=stages.empty)
    flags = _read_later(routing.stats) if sync == "after" else None  # final once the scatter is done
    return _Scattered(dispatch, stages.empty, flags)


def _route_scatter(stages: Stages, x, topk_ids, where: dict, block_rows: int, alignment: int, publish: bool,
                   empty: Allocator, counters: torch.Tensor | None) -> tuple[Dispatch, Callable[[], list[int]] | None]:
    """`stages.route_scatter_masked` into blocks of `block_rows` rows allocated by `empty` (`counters`: kept zeros it
    leaves zero, or None); with `publish`, also the reader of the stats the kernel publishes to a borrowed host buffer
    (`_read_when_done`: the read waits for this kernel, not for later ones), else None."""
    host, done = _borrow((where["num_local_experts"] + 2,), x.device) if publish else (None, None)
    dispatch, _ = stages.route_scatter_masked(x, topk_ids, **where, block_rows=block_rows, alignment=alignment,
                                              empty=empty, publish=host, counters=counters)
    return dispatch, None if host is None else _read_when_done(host, done, x.device)


def _early_block(device, num_tokens, topk, num_experts, num_local_experts, hidden, inter, alignment, layout,
                 masked_max_tokens, sync, host_counts, stages: Stages) -> tuple[int, tuple | None]:
    """(rows per expert block of sync="before"'s early scatter, 0 where it cannot serve; the key its outcomes are
    kept under). It can serve only with `stages.scatter_before_read`, where the masked layout may serve (not
    layout="contiguous", nor M above masked_max_tokens), and where its block fits the masked budget."""
    if sync != "before" or host_counts is not None or not stages.scatter_before_read or layout == "contiguous" \
            or (masked_max_tokens is not None and num_tokens > masked_max_tokens):
        return 0, None
    rows = _early_rows(num_tokens, topk, num_experts, num_local_experts, hidden, inter, alignment)
    return rows, (device, rows, topk, num_experts, num_local_experts, hidden, inter, layout, masked_max_tokens)


@functools.lru_cache(maxsize=4096)  # asked at every sync="before" call (1.7 us of host time uncached on a CPU)
def _early_rows(num_tokens, topk, num_experts, num_local_experts, hidden, inter, alignment) -> int:
    """`speculative_block_rows`, or 0 where that block is over the masked budget."""
    rows = speculative_block_rows(num_tokens, topk, num_experts, num_local_experts, alignment)
    return rows if masked_bytes(num_local_experts, rows, hidden, inter) <= MASKED_BLOCK_BUDGET_BYTES else 0


# The early scatter's misses, per call shape (`_early_block`'s key: the shapes and the early block's rows): a shape
# whose last counts did not suit its early block (a count over the block's rows, or "auto" choosing contiguous) reads
# first at its next call, and every call that can take the early scatter, whichever way it went, records whether its
# counts suited it. A skewed routing keeps its skew from batch to batch (hot experts stay hot): without this, each of
# its calls paid a wasted scatter and its launch (docs/design.md, "When the host reads the device").
# The two ways differ in where the rows sit and how many rows a block has, not in any row's arithmetic: their outputs
# are bitwise equal wherever compared (verify/tests/test_executor.py on a CPU and a GPU; DeepGEMM and the skinny
# kernel at ten bench points on an H200).
_EARLY_MISSED: set[tuple] = set()


# The decode path's intermediates (the masked block's rows, the slots' row index, masked_m, h, a, y, and the fused
# scatter's counters, which that kernel leaves zero) come from buffers kept per (device, stream, thread, call shape)
# where they are small, not from the allocator at every call: each torch.empty costs several microseconds of host time
# (a torch.zeros a kernel launch more), and a small call's host time is its time (the Qwen3-like eager decode call
# is host-bound). A kept buffer is rewritten by the next call on the same stream only after this call's kernels have
# read it (one stream runs its kernels in order), and no kernel reads a row this call did not write (the GEMMs read the
# rows below masked_m, the gather the rows output_index names: the same rows the poisoned tests check). Not under
# CUDA-graph capture (a graph keeps its own buffers), and not when `Stages.empty` is replaced (tests poison it). The
# output is always allocated. At most KEPT_SHAPES call shapes of at most KEPT_MAX_BYTES each are kept (the least
# recently used goes first): 256 MiB of device memory at most.
KEPT_MAX_BYTES = 64 << 20
KEPT_SHAPES = 4
_KEPT: dict[tuple, list[torch.Tensor]] = {}
_KEPT_LOCK = threading.Lock()


def _kept_buffers(device: torch.device, shape_key: tuple, nbytes: int) -> _Reused | None:
    """The allocator of a decode-path call's intermediates: `_Reused` on this call shape's kept buffers, or None
    where they would take more than KEPT_MAX_BYTES (`nbytes`: kernels.dispatch.masked_bytes of the block)."""
    if nbytes > KEPT_MAX_BYTES:
        return None
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream, threading.get_ident(), *shape_key)
    with _KEPT_LOCK:  # callers on other threads share the dict (never a key: the thread is in it)
        kept = _KEPT.pop(key, None)
        if kept is None:
            kept = []
            if len(_KEPT) >= KEPT_SHAPES:
                del _KEPT[next(iter(_KEPT))]  # the least recently used: the dict keeps the order of use
        _KEPT[key] = kept
    return _Reused(kept)


class _Reused:
    """An Allocator for one call: its n-th request gets the n-th kept buffer of its call shape (allocated at the first
    call, and again where a request's shape or dtype differs from the buffer kept)."""

    __slots__ = ("kept", "taken")

    def __init__(self, kept: list[torch.Tensor]):
        self.kept, self.taken = kept, 0

    def __call__(self, shape, *, dtype: torch.dtype, device, make=torch.empty) -> torch.Tensor:
        n, kept = self.taken, self.kept
        self.taken = n + 1
        if n < len(kept) and kept[n].shape == shape and kept[n].dtype == dtype:
            return kept[n]
        buffer = make(shape, dtype=dtype, device=device)
        if n < len(kept):
            kept[n] = buffer
        else:
            kept.append(buffer)
        return buffer

    def zeros(self, shape, *, dtype: torch.dtype, device) -> torch.Tensor:
        """A kept buffer zeroed when allocated, for counters that whoever uses them leaves zero again (the scatter's:
        kernels/scatter.py, `route_scatter_masked`)."""
        return self(shape, dtype=dtype, device=device, make=torch.zeros)


def _counts_source(host_counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """host_counts as a host tensor to copy to the device. Under CUDA-graph capture the copy is captured and repeats at
    every replay from the same host address: it must be pinned and outlive the graph (`_pinned_counts`)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _pinned_counts(tuple(host_counts))
    return torch.tensor(list(host_counts), dtype=torch.int32)


@functools.cache
def _pinned_counts(host_counts: tuple[int, ...]) -> torch.Tensor:
    """Kept for the process's life: one small tensor per distinct counts captured."""
    return torch.tensor(host_counts, dtype=torch.int32).pin_memory()


def _borrow(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """An int32 host tensor of `shape` for the device to fill (pinned, with an event, on a GPU; a plain tensor and no
    event on a CPU), taken from the ones earlier reads gave back (`_read_when_done`): allocating a pinned buffer and
    an event cost tens of microseconds per call in the host-bound decode path."""
    if device.type != "cuda":
        return torch.empty(shape, dtype=torch.int32), None
    free = _READBACKS.setdefault((device, shape), [])
    return free.pop() if free else (torch.empty(shape, dtype=torch.int32, pin_memory=True), torch.cuda.Event())


def _read_when_done(host: torch.Tensor, done: torch.cuda.Event | None, device: torch.device) -> Callable[[], list[int]]:
    """Reads `host` when called, as the kernels queued so far on `device` leave it: the event is recorded now, so the
    read waits for those kernels only, not for the GEMMs queued after them (the call returns while the GPU still
    works). The buffer goes back to the pool only once read: a read never made (an error in between) keeps it out."""
    if done is None:
        return host.tolist
    done.record(_current_stream(device.index))

    def read() -> list[int]:
        done.synchronize()
        values = host.tolist()
        _READBACKS[device, tuple(host.shape)].append((host, done))
        return values

    return read


def _read_later(t: torch.Tensor) -> Callable[[], list[int]]:
    """t's values as the kernels queued so far leave them, read when called (`_read_when_done`): on a GPU through a
    non-blocking copy to a borrowed pinned buffer, on a CPU a plain read."""
    if not t.is_cuda:
        return t.tolist
    host, done = _borrow(tuple(t.shape), t.device)
    host.copy_(t, non_blocking=True)
    return _read_when_done(host, done, t.device)


_READBACKS: dict[tuple, list[tuple[torch.Tensor, torch.cuda.Event]]] = {}


def _current_stream(device_index: int) -> torch.cuda.Stream:
    """torch.cuda.current_stream(device_index), kept per raw stream handle: building the Stream object costs ~4 us of
    host time per call (Event.record() without a stream asks for it), the raw handle a fraction of that. An event is
    recorded on the stream's handle, so the Stream first seen with a handle serves every later stream with it."""
    raw = torch._C._cuda_getCurrentRawStream(device_index)
    stream = _STREAMS.get((device_index, raw))
    if stream is None:
        stream = _STREAMS[device_index, raw] = torch.cuda.current_stream(device_index)
    return stream


_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}


def _validate(x, topk_ids, topk_weights, w13, w2, ep_size, ep_rank, num_experts, layout, masked_max_tokens, gemm,
              gate_up_order, sync, host_counts) -> int:
    """Host-side checks (no device sync); ids outside [-1, num_experts) are caught on the device by `count`."""
    tensors = {"x": x, "topk_ids": topk_ids, "topk_weights": topk_weights, "w13": w13, "w2": w2}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t, dtypes, ndim in (
        ("x", x, (torch.bfloat16,), 2),
        ("topk_ids", topk_ids, (torch.int32, torch.int64), 2),
        ("topk_weights", topk_weights, (torch.float32,), 2),
        ("w13", w13, (torch.bfloat16,), 3),
        ("w2", w2, (torch.bfloat16,), 3),
    ):
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    num_tokens, hidden = x.shape
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows but x has {num_tokens}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights shape {tuple(topk_weights.shape)} != topk_ids shape {tuple(topk_ids.shape)}")
    num_local_experts, two_inter, w13_hidden = w13.shape
    if w13_hidden != hidden or two_inter == 0 or two_inter % 2:
        raise ValueError(f"w13 must be [E_local, 2*I, H={hidden}] with I > 0, got {tuple(w13.shape)}")
    if tuple(w2.shape) != (num_local_experts, hidden, two_inter // 2):
        raise ValueError(f"w2 must be [E_local={num_local_experts}, H={hidden}, I={two_inter // 2}], got "
                         f"{tuple(w2.shape)}")
    if num_local_experts == 0:
        raise ValueError("w13 holds no expert (E_local == 0)")
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive int, got {ep_size!r}")
    if not isinstance(ep_rank, int) or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank must be in [0, ep_size={ep_size}), got {ep_rank!r}")
    if num_experts is None:
        num_experts = num_local_experts * ep_size
    if not isinstance(num_experts, int) or num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts!r} is not divisible by ep_size={ep_size}")
    if num_experts // ep_size != num_local_experts:
        raise ValueError(f"num_experts={num_experts} / ep_size={ep_size} != {num_local_experts} experts in w13")
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"layout must be one of {LAYOUT_CHOICES}, got {layout!r}")
    if masked_max_tokens is not None and (not isinstance(masked_max_tokens, int) or masked_max_tokens < 0):
        raise ValueError(f"masked_max_tokens must be None or an int >= 0, got {masked_max_tokens!r}")
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    if gate_up_order not in GATE_UP_ORDERS:
        raise ValueError(f"gate_up_order must be one of {GATE_UP_ORDERS}, got {gate_up_order!r}")
    if sync not in SYNCS:
        raise ValueError(f"sync must be one of {SYNCS}, got {sync!r}")
    if host_counts is not None and (
        len(host_counts) != num_local_experts or not all(isinstance(c, int) and c >= 0 for c in host_counts)
    ):
        raise ValueError(f"host_counts must hold {num_local_experts} ints >= 0 (one per local expert), got "
                         f"{list(host_counts)!r}")
    return num_experts
