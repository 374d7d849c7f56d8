"""The mutant catalogue: realistic MoE bugs, each a small named deviation of one stage of our own pipeline.

One mechanism for all of them: a mutant is `kernels.moe_expert_forward` run with a `kernels.Stages` in which one
piece is replaced (count, layout choice, scatter, the after-scatter hook, silu_and_mul, the GEMM backend, gather).
No production file is edited. `Mutant.impl` is the bugged implementation, with the contract's signature; it exposes
its (bugged) stages, so the tester's own probes compose with them. `python -m verify.mutants` hunts them all
(verify/power/hunt.py); `--impl verify.mutants:NAME` runs one through verify.diff.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from kernels import PRODUCTION, Dispatch, Stages, choose_layout, moe_expert_forward
from kernels.dispatch import Layout, LocalRouting
from kernels.gemm.base import GroupedGemm
from kernels.gemm.loop import Loop
from reference.layouts import expert_counts
from verify import checks


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    stage: str  # count | scatter | silu_and_mul | gemm | gather | executor
    summary: str
    seen_in: str  # the field report or bug class it stands for
    stages: Stages

    @property
    def impl(self) -> Callable[..., torch.Tensor]:
        return functools.partial(moe_expert_forward, stages=self.stages)

    def describe(self) -> str:
        return f"{self.name} [{self.stage}]: {self.summary} ({self.seen_in})"


def _with(**change) -> Stages:
    return dataclasses.replace(PRODUCTION, **change)


def _read_first(**change) -> Stages:
    """Stages with a bent count or masked scatter, reading the counts first (`Stages.scatter_before_read` False):
    where production routes and scatters before its read, the bent stage would not run."""
    return _with(scatter_before_read=False, **change)


# ---- count / local ids ------------------------------------------------------------------------------------------

def _count_global_as_local(topk_ids, *, ep_rank, num_local_experts, num_experts):
    return PRODUCTION.count(topk_ids, ep_rank=0, num_local_experts=num_local_experts, num_experts=num_experts)


def _local_routing(local: torch.Tensor, num_local_experts: int) -> LocalRouting:
    """A LocalRouting from local ids computed on the host (-1: not local)."""
    local = local.to(torch.int32).contiguous()
    counts = expert_counts(local.long(), num_local_experts).to(torch.int32)
    stats = torch.cat([counts, counts.new_zeros(2)])  # no bad id, nothing dropped yet
    return LocalRouting(local, stats[:num_local_experts], tuple(counts.tolist()), stats)


def _count_minus_one_wraps(topk_ids, *, ep_rank, num_local_experts, num_experts) -> LocalRouting:
    local = topk_ids.long() - ep_rank * num_local_experts
    local = torch.where(local < 0, num_local_experts - 1, local)  # Python's a[-1]
    return _local_routing(torch.where(local >= num_local_experts, -1, local), num_local_experts)


def _count_previous_rank_expert(topk_ids, *, ep_rank, num_local_experts, num_experts) -> LocalRouting:
    """The local range checked as `local >= -1`: the previous rank's last expert (local -1) is taken as expert 0."""
    local = topk_ids.long() - ep_rank * num_local_experts
    here = (topk_ids >= 0) & (local >= -1) & (local < num_local_experts)
    return _local_routing(torch.where(here, local.clamp_min(0), -1), num_local_experts)


def _count_crash_on_empty(topk_ids, **kwargs):
    routing = PRODUCTION.count(topk_ids, **kwargs)
    active = sum(1 for c in routing.counts_host if c)
    _expected_m = sum(routing.counts_host) // active  # ZeroDivisionError when nothing is local (DeepGEMM#20's kin)
    return routing


# ---- scatter ----------------------------------------------------------------------------------------------------

def _drop_slot(dispatch: Dispatch, expert: int, row_in_segment: Callable[[int], int]) -> Dispatch:
    count = dispatch.counts_host[expert]
    if count == 0:
        return dispatch
    index = dispatch.output_index.clone()
    index[index == dispatch.first_rows()[expert] + row_in_segment(count)] = -1
    return dataclasses.replace(dispatch, output_index=index)


def _drop_last_expert_row(dispatch: Dispatch) -> Dispatch:
    return _drop_slot(dispatch, dispatch.num_local_experts - 1, lambda count: count - 1)


def _masked_m_off_by_one(dispatch: Dispatch) -> Dispatch:
    if dispatch.layout is Layout.MASKED:
        for e in range(dispatch.num_local_experts):
            dispatch = _drop_slot(dispatch, e, lambda count: count - 1)
    return dispatch


def _slot_collision(dispatch: Dispatch) -> Dispatch:
    """Two tokens of each expert got the same row from a racy slot counter; the second writer's x won."""
    index, rows = dispatch.output_index.clone(), dispatch.rows.clone()
    flat = rows.view(-1, rows.shape[-1])
    for first, count in zip(dispatch.first_rows(), dispatch.counts_host, strict=True):
        if count >= 2:
            index[index == first + 1] = first
            flat[first] = dispatch.flat_rows()[first + 1]
    return dataclasses.replace(dispatch, output_index=index, rows=rows)


def _segment_start_off_by_one(dispatch: Dispatch) -> Dispatch:
    """Contiguous: rows of experts >= 1 written one row after their segment start (m_indices left right)."""
    if dispatch.layout is not Layout.CONTIGUOUS:
        return dispatch
    index, rows = dispatch.output_index.clone(), dispatch.rows.clone()
    flat, old = rows.view(-1, rows.shape[-1]), dispatch.flat_rows()
    for e, (start, count) in enumerate(zip(dispatch.first_rows(), dispatch.counts_host, strict=True)):
        if e >= 1 and count:
            end = min(start + 1 + count, flat.shape[0])
            flat[start + 1 : end] = old[start : end - 1]
            index[(dispatch.output_index >= start) & (dispatch.output_index < start + count)] += 1
    index[index >= flat.shape[0]] = flat.shape[0] - 1
    return dataclasses.replace(dispatch, output_index=index, rows=rows)


def _scatter_contiguous_aligned_64(x, routing, *, alignment, empty):
    return PRODUCTION.scatter_contiguous(x, routing, alignment=64, empty=empty)


def _scatter_then_scribble_on_x(scatter):
    def scatter_and_dispose(x, routing, **kwargs):
        dispatch = scatter(x, routing, **kwargs)
        x[0].zero_()  # "the input is consumed": rtp-llm's executor disposed it in place
        return dispatch
    return scatter_and_dispose


# ---- silu_and_mul -----------------------------------------------------------------------------------------------

def _silu_halves_swapped(h, dispatch, *, gate_up_order="gate_up", empty=torch.empty):
    other = "up_gate" if gate_up_order == "gate_up" else "gate_up"
    return PRODUCTION.silu_and_mul(h, dispatch, gate_up_order=other, empty=empty)


def _silu_in_bf16(h, dispatch, *, gate_up_order="gate_up", empty=torch.empty):
    """silu rounded to bf16 before the multiply by up: one extra bf16 rounding (a subtle numeric bug)."""
    a = PRODUCTION.silu_and_mul(h, dispatch, gate_up_order=gate_up_order, empty=empty)
    first, second = h.float().chunk(2, dim=-1)
    gate, up = (first, second) if gate_up_order == "gate_up" else (second, first)
    flat = a.view(-1, a.shape[-1])
    valid = checks.valid_row_mask(dispatch).to(a.device)
    redo = (torch.nn.functional.silu(gate).to(torch.bfloat16).float() * up).to(torch.bfloat16)
    flat[valid] = redo.view(-1, a.shape[-1])[valid]
    return a


def _silu_spills_into_next_block(h, dispatch, *, gate_up_order="gate_up", empty=torch.empty):
    """Masked: the row after masked_m[e] of block e is computed and stored at row 0 of block e + 1."""
    a = PRODUCTION.silu_and_mul(h, dispatch, gate_up_order=gate_up_order, empty=empty)
    if dispatch.layout is Layout.MASKED:
        spill = PRODUCTION.silu_and_mul(h, dataclasses.replace(dispatch, counts=dispatch.counts + 1),
                                        gate_up_order=gate_up_order)
        for e, count in enumerate(dispatch.counts_host[:-1]):
            if count < dispatch.block_rows:
                a[e + 1, 0] = spill[e, count]
    return a


# ---- grouped GEMM -----------------------------------------------------------------------------------------------

class _BentGemm(GroupedGemm):
    """The loop backend on weights bent by `bend(b, dispatch)`."""

    def __init__(self, name: str, bend: Callable[[torch.Tensor, Dispatch], torch.Tensor]):
        self.name, self._bend, self._base = name, bend, Loop()

    def availability(self, device):
        return True, "mutant"

    def m_grouped_gemm_nt_contiguous(self, a, b, dispatch, empty):
        return self._base.m_grouped_gemm_nt_contiguous(a, self._bend(b, dispatch), dispatch, empty)

    def m_grouped_gemm_nt_masked(self, a, b, dispatch, empty):
        return self._base.m_grouped_gemm_nt_masked(a, self._bend(b, dispatch), dispatch, empty)


def _drop_k_tail(b: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """The last 16 columns of K never accumulated (a K loop that stops one tile short of a ragged K)."""
    b = b.clone()
    b[..., -16:] = 0
    return b


def _last_segment_uses_previous_weights(b: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    b = b.clone()
    active = [e for e, count in enumerate(dispatch.counts_host) if count]
    if len(active) >= 2:
        b[active[-1]] = b[active[-2]]
    return b


# ---- gather -----------------------------------------------------------------------------------------------------

def _gather_with(change_weights=None, change_index=None, change_y=None):
    def gather(y, dispatch, topk_weights, *, empty=torch.empty):
        if change_index is not None:
            dispatch = dataclasses.replace(dispatch, output_index=change_index(dispatch))
        if change_y is not None:
            y = change_y(y.clone(), dispatch)
        weights = topk_weights if change_weights is None else change_weights(topk_weights)
        return PRODUCTION.gather(y, dispatch, weights.contiguous(), empty=empty)
    return gather


def _scale_expert_0(y, dispatch, factor=1.02):
    start = dispatch.first_rows()[0]
    y.view(-1, y.shape[-1])[start : start + dispatch.counts_host[0]] *= factor
    return y


def _skip_expert_0(dispatch: Dispatch) -> torch.Tensor:
    start, index = dispatch.first_rows()[0], dispatch.output_index
    return torch.where((index >= start) & (index < start + dispatch.counts_host[0]), -1, index)


def _gather_in_bf16(y, dispatch, topk_weights, *, empty=torch.empty):
    """The running sum over slots kept in bf16 (vllm#15045's class: bf16 accumulation of top-k partial sums)."""
    index = dispatch.output_index.long()
    flat = y.reshape(-1, y.shape[-1])
    acc = torch.zeros(index.shape[0], y.shape[-1], dtype=torch.bfloat16, device=y.device)
    for k in range(index.shape[1]):
        used = (index[:, k] >= 0)[:, None]
        acc = torch.where(used, (acc.float() + topk_weights[:, k, None] * flat[index[:, k].clamp_min(0)].float())
                          .to(torch.bfloat16), acc)
    return acc


def _dense_gather(y, dispatch, topk_weights, *, empty=torch.empty):
    """Combine as one dense product W @ y over every row of the layout, W zero off the routed rows: padding rows are
    read and multiplied by 0, which only looks harmless while they hold finite garbage."""
    index = dispatch.output_index.long()
    flat = y.reshape(-1, y.shape[-1]).float()
    dense = torch.zeros(index.shape[0], flat.shape[0], device=y.device)
    used = index >= 0
    tokens = torch.arange(index.shape[0], device=y.device)[:, None].expand_as(index)
    dense[tokens[used], index[used]] = topk_weights[used]
    return (dense @ flat).to(torch.bfloat16)


def _gather_leaves_last_row(y, dispatch, topk_weights, *, empty=torch.empty):
    full = PRODUCTION.gather(y, dispatch, topk_weights, empty=empty)
    out = empty(full.shape, dtype=full.dtype, device=full.device)
    out[:-1] = full[:-1]
    return out


def _gather_jitter(y, dispatch, topk_weights, *, empty=torch.empty):
    """An unseeded, order-dependent reduction: each run may round one element differently."""
    out = PRODUCTION.gather(y, dispatch, topk_weights, empty=empty)
    if out.numel():
        flat = out.view(-1)
        at = int(torch.randint(0, flat.numel(), (1,)))
        flat[at] = flat[at] * (1 + 2**-7)
    return out


def _strict_threshold(counts, num_tokens, hidden, inter, alignment, masked_max_tokens):
    if masked_max_tokens is not None:
        # `<` where the contract says `<=`
        return Layout.MASKED if num_tokens < masked_max_tokens else Layout.CONTIGUOUS
    return choose_layout(counts, num_tokens, hidden, inter, alignment, None)


MUTANTS: tuple[Mutant, ...] = (
    # count / local ids
    Mutant("global_ids_as_local", "count", "the rank's expert offset is never subtracted: only rank 0 is right",
           "vllm-gaudi#1796", _read_first(count=_count_global_as_local)),
    Mutant("minus_one_wraps", "count", "a -1 id indexes the last local expert (Python's a[-1])",
           "vllm#46408, vllm#42034", _read_first(count=_count_minus_one_wraps)),
    Mutant("previous_rank_expert_as_local", "count", "the local-range check is off by one: the previous rank's "
           "last expert is taken as this rank's expert 0 (only raw global ids show it)",
           "all-gather EP, where remote ids reach the expert stage", _read_first(count=_count_previous_rank_expert)),
    Mutant("empty_rank_crashes", "count", "a rank with nothing local divides by its zero active experts",
           "DeepGEMM#20, torchtitan#1166", _read_first(count=_count_crash_on_empty)),
    # scatter
    Mutant("slot_collision", "scatter", "two tokens of an expert share a row (a racy slot counter)",
           "vllm#34991, sgl-kernel's randperm tests", _with(after_scatter=_slot_collision)),
    Mutant("segment_start_off_by_one", "scatter", "contiguous rows of experts >= 1 start one row late",
           "off-by-one in the start-offset kernel", _with(after_scatter=_segment_start_off_by_one)),
    Mutant("wrong_alignment", "scatter", "segments aligned to 64, the GEMM needs 128",
           "a scatter built for another M alignment", _with(scatter_contiguous=_scatter_contiguous_aligned_64)),
    Mutant("drop_last_expert_row", "scatter", "the last row of the last local expert is lost",
           "an exclusive/inclusive prefix-sum mix-up", _with(after_scatter=_drop_last_expert_row)),
    Mutant("masked_drops_last_token", "scatter", "masked path: masked_m one short, the last token of every block "
           "is lost", "off-by-one on masked_m", _with(after_scatter=_masked_m_off_by_one)),
    # silu_and_mul
    Mutant("gate_up_swapped", "silu_and_mul", "gate and up halves swapped", "HF vs rtp-llm w13 conventions",
           _with(silu_and_mul=_silu_halves_swapped)),
    Mutant("silu_in_bf16", "silu_and_mul", "silu rounded to bf16 before the multiply (one extra rounding)",
           "subtle numeric", _with(silu_and_mul=_silu_in_bf16)),
    Mutant("silu_spills_into_next_block", "silu_and_mul", "masked: the row past masked_m[e] is written over row 0 "
           "of block e + 1", "masked bound checked per block, not per row",
           _with(silu_and_mul=_silu_spills_into_next_block)),
    # grouped GEMM
    Mutant("k_tail_dropped", "gemm", "the last 16 of K are never accumulated", "a K loop one tile short",
           _with(gemm=_BentGemm("k_tail_dropped", _drop_k_tail))),
    Mutant("wrong_expert_last_segment", "gemm", "the last active expert runs with the previous expert's weights",
           "a group index read one segment late",
           _with(gemm=_BentGemm("wrong_expert", _last_segment_uses_previous_weights))),
    # gather
    Mutant("ignore_router_weight", "gather", "the router weight is ignored (every local slot weighs 1)",
           "weights applied nowhere, or twice", _with(gather=_gather_with(change_weights=torch.ones_like))),
    Mutant("weight_of_slot_0_for_all", "gather", "every slot takes the weight of slot 0", "a broadcast slip",
           _with(gather=_gather_with(change_weights=lambda w: w[:, :1].expand_as(w)))),
    Mutant("index_of_next_slot", "gather", "slot k reads the row of slot k+1 (weights right, rows rotated)",
           "a transposed [k, M] / [M, k] index", _with(gather=_gather_with(
               change_index=lambda d: torch.roll(d.output_index, 1, dims=1)))),
    Mutant("skip_expert_0", "gather", "combine skips local expert 0", "sglang#26473",
           _with(gather=_gather_with(change_index=_skip_expert_0))),
    Mutant("gather_in_bf16", "gather", "the running sum over slots kept in bf16", "vllm#15045 (subtle numeric)",
           _with(gather=_gather_in_bf16)),
    Mutant("weight_in_bf16", "gather", "router weights rounded to bf16 before use", "subtle numeric",
           _with(gather=_gather_with(change_weights=lambda w: w.to(torch.bfloat16).float()))),
    Mutant("perturb_one_expert", "gather", "local expert 0's rows 2% off", "a per-expert scale applied twice",
           _with(gather=_gather_with(change_y=_scale_expert_0))),
    Mutant("dense_gather_reads_padding", "gather", "combine as a dense product over every row, padding included",
           "padding assumed zero", _with(gather=_dense_gather)),
    Mutant("last_row_unwritten", "gather", "the last output row is never written", "a grid one block short",
           _with(gather=_gather_leaves_last_row)),
    # executor
    Mutant("threshold_off_by_one", "executor", "auto takes the masked path only for M < masked_max_tokens",
           "`<` for `<=`", _with(choose_layout=_strict_threshold)),
    Mutant("input_mutated", "executor", "the executor zeroes x[0] after scattering it (disposes its input)",
           "rtp-llm's executor's in-place disposal", _read_first(scatter_contiguous=_scatter_then_scribble_on_x(
               PRODUCTION.scatter_contiguous), scatter_masked=_scatter_then_scribble_on_x(PRODUCTION.scatter_masked))),
    Mutant("nondeterministic", "executor", "an unseeded reduction: reruns differ in one element",
           "DeepEP's run-twice check", _with(gather=_gather_jitter)),
)
MUTANTS_BY_NAME = {m.name: m for m in MUTANTS}


def __getattr__(name: str):
    """`--impl verify.mutants:NAME` runs mutant NAME."""
    if name in MUTANTS_BY_NAME:
        return MUTANTS_BY_NAME[name].impl
    raise AttributeError(name)


def main(argv=None) -> int:
    """`python -m verify.mutants`: the hunt over every mutant and its kill matrix (verify/power/hunt.py)."""
    from verify.power.hunt import main as hunt

    return hunt(argv)


if __name__ == "__main__":
    raise SystemExit(main())
