"""Hand-made broken implementations (and the reference wrapped as a correct one): fixtures that prove the tester
fails what it must. Each has the signature of kernels.moe_expert_forward, so `--impl verify.power.broken:NAME`
works. They are entries of the mutant catalogue (verify/mutants.py), where each bug is described and
injected."""

from __future__ import annotations

import torch

from reference import moe_reference
from verify.mutants import MUTANTS_BY_NAME

BROKEN = {name: MUTANTS_BY_NAME[name].impl for name in (
    "drop_last_expert_row",  # a row dropped on the last local expert
    "global_ids_as_local",  # only rank 0 right
    "minus_one_wraps",  # -1 wraps to the last expert
    "ignore_router_weight",
    "gate_up_swapped",
    "masked_drops_last_token",  # the masked path loses the last token of each expert
    "perturb_one_expert",  # output rows 2% off on one expert only
)}


def __getattr__(name: str):
    if name in BROKEN:
        return BROKEN[name]
    raise AttributeError(name)


def reference_impl(x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None,
                   gate_up_order="gate_up", **_layout_and_backend):
    """The faithful reference, rounded to bf16, as an implementation: must pass every row."""
    return moe_reference(x, topk_ids, topk_weights, w13, w2, ep_size=ep_size, ep_rank=ep_rank,
                         num_experts=num_experts, gate_up_order=gate_up_order, mode="faithful").to(torch.bfloat16)
