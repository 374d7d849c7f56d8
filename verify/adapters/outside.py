"""Outside implementations written from the contract alone, each rounding as a kernel developer's honest code does:
`--impl verify.adapters.outside:NAME`.

They are plain torch (fp32 GEMMs in torch's own accumulation order, verify/power/honest.py) and round where the
implementations they stand for round:
- fused_epilogue: a gate+up GEMM with silu_and_mul fused in its epilogue (h kept in the fp32 accumulators, a rounded
  once to feed the down GEMM), the weighted sum in fp32;
- all_fp32: every intermediate kept in fp32, one rounding at the end;
- vllm_like: vLLM's fused_moe numerics as its code reads: silu rounded to bf16 before the multiply, the router weight
  on the down GEMM's fp32 accumulator, the k rows summed in bf16 for k = 2..4 and in fp32 otherwise (moe_sum);
- jax_logistic: a JAX-style bf16 silu (the logistic and gate * logistic each rounded), otherwise fused;
- torchtitan_like: silu rounded to bf16, router weights in fp32, the weighted rows summed in fp32 (a bmm combine);
- mixed: no convention at all: each expert rounds its own way (three placements in turn), the router weight scales a
  before the down GEMM, the slots are summed as a tree; honest, and judged by the error model.
Each has planted variants, NAME_expert_off (one local expert's output 1.5% off), NAME_last_slot_dropped and
NAME_weight_on_input (the router weight applied to the input before the experts): structural bugs the error model
must catch whatever convention an implementation follows.
"""

from __future__ import annotations

import dataclasses

import torch

from reference.rounding import rounding_profile
from verify.power.honest import PLANTED, Honest, Placement


def _placement(spec: str) -> Placement:
    return Placement((rounding_profile(spec),))


@dataclasses.dataclass(frozen=True)
class ByTopk:
    """An implementation whose sum rounds by k: `few` for k in `ks`, `other` otherwise (vLLM's moe_sum)."""

    few: Honest
    other: Honest
    ks: tuple[int, ...] = (2, 3, 4)

    def __call__(self, x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None,
                 gate_up_order="gate_up") -> torch.Tensor:
        impl = self.few if topk_ids.shape[1] in self.ks else self.other
        return impl(x, topk_ids, topk_weights, w13, w2, ep_size=ep_size, ep_rank=ep_rank, num_experts=num_experts,
                    gate_up_order=gate_up_order)


def _build(name: str, planted: str):
    if name == "mixed":
        points = tuple(rounding_profile(s) for s in ("h=fp32", "silu=bf16,a=fp32", "silu=logistic,y=fp32"))
        return Honest(Placement(points, weight_on_a=True, sums="tree"), planted)
    if name == "vllm_like":
        return ByTopk(Honest(_placement("vllm_fused_moe"), planted),
                      Honest(_placement("silu=bf16,y=fp32,slot=bf16"), planted))
    spec = {"fused_epilogue": "h=fp32", "all_fp32": "h=fp32,a=fp32,y=fp32", "jax_logistic": "silu=logistic",
            "torchtitan_like": "silu=bf16"}[name]
    return Honest(_placement(spec), planted)


NAMES = ("fused_epilogue", "all_fp32", "vllm_like", "jax_logistic", "torchtitan_like", "mixed")
ADAPTERS = {name if planted == "none" else f"{name}_{planted}": _build(name, planted)
            for name in NAMES for planted in PLANTED}
globals().update(ADAPTERS)  # --impl verify.adapters.outside:fused_epilogue, ...
