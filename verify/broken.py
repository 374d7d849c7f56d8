"""Hand-made broken implementations (and the reference wrapped as a correct one): fixtures that prove the tester
fails what it must. Each has the signature of kernels.moe_expert_forward, so `--impl verify.broken:NAME` works.

Each bug is injected through kernels.Stages (no production file is edited), the way a real bug would sit in one stage.
"""

from __future__ import annotations

import dataclasses

import torch

from kernels import PRODUCTION, Dispatch, moe_expert_forward
from kernels.scatter import LocalRouting
from reference import moe_reference


def _with(stages_change: dict, **call_change):
    """An implementation: moe_expert_forward with some stages replaced and some arguments overridden."""
    stages = dataclasses.replace(PRODUCTION, **stages_change)

    def impl(x, topk_ids, topk_weights, w13, w2, **kwargs):
        kwargs.update({k: f(kwargs) for k, f in call_change.items()})
        return moe_expert_forward(x, topk_ids, topk_weights, w13, w2, stages=stages, **kwargs)

    return impl


def _drop_slot(dispatch: Dispatch, expert: int, row_in_segment) -> Dispatch:
    """Forget the (token, slot) that holds row `row_in_segment(count)` of `expert`'s segment."""
    count = dispatch.counts_host[expert]
    if count == 0:
        return dispatch
    start = (expert * dispatch.block_rows if dispatch.layout == "masked" else dispatch.segment_starts()[expert])
    index = dispatch.output_index.clone()
    index[index == start + row_in_segment(count)] = -1
    return dataclasses.replace(dispatch, output_index=index)


def _drop_last_expert_row(dispatch: Dispatch) -> Dispatch:
    return _drop_slot(dispatch, dispatch.num_experts - 1, lambda count: count - 1)


def _drop_last_token_of_each_expert(dispatch: Dispatch) -> Dispatch:
    if dispatch.layout != "masked":
        return dispatch
    for e in range(dispatch.num_experts):
        dispatch = _drop_slot(dispatch, e, lambda count: count - 1)
    return dispatch


def _count_with_minus_one_wrapping(topk_ids, *, ep_rank, experts_per_rank, num_experts) -> LocalRouting:
    """Local ids by Python indexing habits: a -1 (skipped or remote) id lands on the last local expert."""
    local = topk_ids.long() - ep_rank * experts_per_rank
    local = torch.where(local < 0, torch.full_like(local, experts_per_rank - 1), local)
    local = torch.where(local >= experts_per_rank, torch.full_like(local, -1), local).to(torch.int32)
    counts = torch.bincount(local[local >= 0].long(), minlength=experts_per_rank).to(torch.int32)
    return LocalRouting(local.contiguous(), counts, tuple(counts.tolist()))


def _scale_one_expert(y, dispatch: Dispatch, topk_weights, *, empty=torch.empty, expert=0, factor=1.02):
    """Gather after scaling expert `expert`'s output rows by `factor` (a 2% error on one expert only)."""
    y = y.clone()
    flat = y.view(-1, y.shape[-1])
    if dispatch.layout == "masked":
        flat[expert * dispatch.block_rows:][: dispatch.counts_host[expert]] *= factor
    else:
        start = dispatch.segment_starts()[expert]
        flat[start : start + dispatch.counts_host[expert]] *= factor
    return PRODUCTION.gather(y, dispatch, topk_weights, empty=empty)


# A row dropped on the last local expert (one token loses that expert's contribution).
drop_last_expert_row = _with({"after_scatter": _drop_last_expert_row})
# Global ids used where local ids are expected: the rank offset is never subtracted (only rank 0 is right).
global_ids_as_local = _with({}, ep_rank=lambda kw: 0)
# -1 wraps to the last local expert (Python's a[-1]).
minus_one_wraps = _with({"count": _count_with_minus_one_wrapping})
# The router weight is ignored (every local slot weighs 1).
ignore_router_weight = _with({"gather": lambda y, d, w, **kw: PRODUCTION.gather(y, d, torch.ones_like(w), **kw)})
# Gate and up halves swapped.
gate_up_swapped = _with({}, gate_up_order=lambda kw: "up_gate" if kw.get("gate_up_order", "gate_up") == "gate_up"
                        else "gate_up")
# The masked path loses the last token of each expert's block (an off-by-one on masked_m).
masked_drops_last_token = _with({"after_scatter": _drop_last_token_of_each_expert})
# Output rows of one expert (local expert 0 of every rank) perturbed by 2%.
perturb_one_expert = _with({"gather": _scale_one_expert})


def reference_impl(x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None,
                   gate_up_order="gate_up", **_layout_and_backend):
    """The faithful reference, rounded to bf16, as an implementation: must pass every row."""
    return moe_reference(x, topk_ids, topk_weights, w13, w2, ep_size=ep_size, ep_rank=ep_rank,
                         num_experts=num_experts, gate_up_order=gate_up_order, mode="faithful").to(torch.bfloat16)


BROKEN = {
    "drop_last_expert_row": drop_last_expert_row,
    "global_ids_as_local": global_ids_as_local,
    "minus_one_wraps": minus_one_wraps,
    "ignore_router_weight": ignore_router_weight,
    "gate_up_swapped": gate_up_swapped,
    "masked_drops_last_token": masked_drops_last_token,
    "perturb_one_expert": perturb_one_expert,
}
