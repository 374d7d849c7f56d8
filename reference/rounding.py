"""Rounding profiles: where a bf16 implementation of the expert stage rounds, as data.

Every honest bf16 implementation computes the same thing; they differ in where they round to bf16 and in which
order they add. The production points (docs/contract.md, "Rounding points") are one such choice; the public
implementations below make others, legitimately. The faithful reference (moe.py) follows a profile exactly, so an
implementation is compared with the rounding it actually does, and only its GEMM accumulation order is left to the
bands (verify/bands.py). A profile does not change the exact reference: against it, a less accurate convention shows.

Each field is one rounding point (or order) of the stage:
- silu: "fused", silu(gate) * up computed in fp32 and rounded once; "bf16", silu(gate) rounded to bf16 first, then
  multiplied by up and rounded again (`act_fn(gate) * up` on bf16 tensors);
- weights: the router weights used as given (fp32) or rounded to bf16 first;
- slot: the weighted slot weight * y kept in fp32 ("fp32"), rounded to bf16 ("bf16"), or formed on the down GEMM's fp32
  accumulator and rounded once, y itself never rounded ("epilogue", a GEMM that multiplies by the router weight);
- accumulator: the running sum over a token's slots kept in fp32 and rounded once, or in bf16 (rounded at every add);
- order: the slots added in slot order k = 0, 1, ... or expert by expert (ascending local id, then slot).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rounding:
    name: str
    seen_in: str  # where the convention comes from
    silu: str = "fused"  # "fused" | "bf16"
    weights: str = "fp32"  # "fp32" | "bf16"
    slot: str = "fp32"  # "fp32" | "bf16" | "epilogue"
    accumulator: str = "fp32"  # "fp32" | "bf16"
    order: str = "slot"  # "slot" | "expert"

    def __post_init__(self):
        for field, allowed in (("silu", ("fused", "bf16")), ("weights", ("fp32", "bf16")),
                               ("slot", ("fp32", "bf16", "epilogue")), ("accumulator", ("fp32", "bf16")),
                               ("order", ("slot", "expert"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"rounding {self.name!r}: {field} must be one of {allowed}, got "
                                 f"{getattr(self, field)!r}")

    def describe(self) -> str:
        return (f"{self.name}: silu {self.silu}, weights {self.weights}, slot {self.slot}, accumulator "
                f"{self.accumulator}, {self.order} order ({self.seen_in})")


PRODUCTION = Rounding("production", "this pipeline (docs/contract.md, \"Rounding points\"): a fused silu_and_mul, an "
                      "fp32 gather in slot order")
PROFILES: dict[str, Rounding] = {p.name: p for p in (
    PRODUCTION,
    Rounding("hf_grouped", "Hugging Face transformers' grouped_mm and batched_mm experts: act_fn(gate) * up on bf16, "
             "the router's weights cast to bf16, weighted slots in bf16, summed over k in fp32",
             silu="bf16", weights="bf16", slot="bf16"),
    Rounding("hf_eager", "transformers' eager experts classes: as hf_grouped, then index_add_ into the bf16 output, "
             "expert by expert", silu="bf16", weights="bf16", slot="bf16", accumulator="bf16", order="expert"),
    Rounding("vllm_fused_moe", "vLLM's fused_moe Triton path: the router weight multiplies the down GEMM's fp32 "
             "accumulator, the k rows summed in bf16 (moe_sum)", slot="epilogue", accumulator="bf16"),
    Rounding("sglang_fused_moe", "sglang's fused_moe Triton path: the router weight in the down GEMM's epilogue, the k "
             "rows summed in fp32 (moe_sum_reduce)", slot="epilogue"),
)}


def rounding_profile(rounding: Rounding | str) -> Rounding:
    """The profile named `rounding` (or `rounding` itself); ValueError naming the argument otherwise."""
    if isinstance(rounding, Rounding):
        return rounding
    if rounding not in PROFILES:
        raise ValueError(f"rounding must be one of {tuple(PROFILES)} or a Rounding, got {rounding!r}")
    return PROFILES[rounding]
