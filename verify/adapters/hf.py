"""Hugging Face transformers' experts classes as implementations of the contract: `--impl verify.adapters.hf:NAME`.

NAME is `{family}_{implementation}`: family in FAMILIES (Qwen3-MoE, Mixtral, DeepSeek-V3, Aria), implementation in
IMPLEMENTATIONS (the class's own `eager` forward, and transformers' `grouped_mm` and `batched_mm` experts
functions); `python -c "import verify.adapters.hf as h; print(h.ADAPTERS)"` lists them. Each one builds the family's
experts module for the rank's local experts, loads w13 / w2 into it (gate_up_proj / down_proj, transposed where the
class stores them so), and calls it as transformers' own expert parallelism does (`AllReduceEP`): every id that is
not on this rank (-1 included) becomes the sentinel `num_local_experts` with weight 0, the module is marked
expert-parallel, the ids are int64 and the router weights are cast to the hidden dtype, as Qwen3-MoE's router gives
them (`NAME_fp32_weights`: left in fp32, as the Mixtral and DeepSeek-V3 routers hand them over). What the module
raises is raised (the tester reports it as a failing row). Modules are cached per weights, so the bench times the
forward, not the load.
"""

from __future__ import annotations

import dataclasses
import importlib
import types

import torch

from verify.impls import guard_hub_kernels

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


@dataclasses.dataclass(frozen=True)
class Family:
    module: str  # transformers.models.<this>.modeling_<this>
    experts: str  # the experts class
    transposed: bool = False  # weights stored [E, in, out] (Aria)


FAMILIES = {
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeExperts"),
    "mixtral": Family("mixtral", "MixtralExperts"),
    "deepseek_v3": Family("deepseek_v3", "DeepseekV3Experts"),
    "aria": Family("aria", "AriaExperts", transposed=True),
}
_MODULES: dict[tuple, torch.nn.Module] = {}


def _experts(family: Family, implementation: str, w13: torch.Tensor, w2: torch.Tensor, gate_up_order: str):
    key = (family.experts, implementation, gate_up_order, w13.data_ptr(), w2.data_ptr(), tuple(w13.shape),
           w13.device, w13._version, w2._version)
    if key not in _MODULES:
        guard_hub_kernels()
        modeling = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
        num_local_experts, two_inter, hidden = w13.shape
        # every name these classes read their sizes under, across transformers versions
        config = types.SimpleNamespace(
            hidden_size=hidden, intermediate_size=two_inter // 2, moe_intermediate_size=two_inter // 2,
            num_experts=num_local_experts, num_local_experts=num_local_experts, n_routed_experts=num_local_experts,
            moe_num_experts=num_local_experts, hidden_act="silu", _experts_implementation=implementation)
        with torch.device("meta"):
            module = getattr(modeling, family.experts)(config)
        gate_up = w13 if gate_up_order == "gate_up" else torch.cat(w13.chunk(2, dim=1)[::-1], dim=1)
        weights = (gate_up.transpose(1, 2), w2.transpose(1, 2)) if family.transposed else (gate_up, w2)
        module.gate_up_proj = torch.nn.Parameter(weights[0], requires_grad=False)
        module.down_proj = torch.nn.Parameter(weights[1], requires_grad=False)
        module._is_expert_parallel = True  # sentinel ids reach it (transformers' MoEParamShard sets the same)
        _MODULES.clear()  # one module at a time: weights of a finished case are not kept alive
        _MODULES[key] = module
    return _MODULES[key]


def _adapter(name: str, family: Family, implementation: str, weights_dtype: torch.dtype | None = None):
    def forward(x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None,
                gate_up_order="gate_up"):
        experts = _experts(family, implementation, w13, w2, gate_up_order)
        num_local_experts = w13.shape[0]
        # transformers' AllReduceEP: routes to other ranks' experts (and -1) -> the sentinel, weight 0
        ids = topk_ids.long()  # as transformers' routers give them (torch.topk's indices)
        off_rank = (ids // num_local_experts) != ep_rank
        local = torch.where(off_rank, num_local_experts, ids % num_local_experts)
        weights = topk_weights.masked_fill(off_rank, 0.0).to(weights_dtype or x.dtype)
        with torch.no_grad():
            return experts(x, local, weights)

    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = f"transformers' {family.experts} with the {implementation!r} experts implementation."
    return forward


ADAPTERS = {f"{f}_{i}": _adapter(f"{f}_{i}", family, i) for f, family in FAMILIES.items() for i in IMPLEMENTATIONS}
ADAPTERS.update({f"{f}_{i}_fp32_weights": _adapter(f"{f}_{i}_fp32_weights", family, i, torch.float32)
                 for f, family in FAMILIES.items() for i in IMPLEMENTATIONS})
globals().update(ADAPTERS)  # --impl verify.adapters.hf:qwen3_moe_grouped_mm, ...
