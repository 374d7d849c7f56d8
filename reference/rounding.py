"""Rounding placements: where a bf16 implementation of the expert stage rounds, as data.

Every honest bf16 implementation computes the same function; they differ in which intermediates they store in bf16
and which they keep wider, and in the order they add the slots. One placement is one point of a space of eight
fields; the faithful reference (moe.py) follows any point exactly, so an implementation can be compared with the
rounding it actually does. The production points (docs/contract.md, "Rounding points") are one point; the public
implementations named in PROFILES are others. A placement does not change the exact reference: against it, a less
accurate placement shows.

The fields, in the stage's order:
- h: the gate+up GEMM's output stored bf16, or kept in the fp32 accumulators (silu_and_mul fused in the epilogue);
- silu: "fused", silu(gate) in fp32 (one rounding, of a); "bf16", silu(gate) rounded to bf16 before the multiply
  (`act_fn(gate) * up` on bf16 tensors); "logistic", JAX's bf16 silu: the logistic rounded, gate * logistic rounded,
  then the multiply by up;
- a: silu(gate) * up stored bf16 for the down GEMM, or kept fp32 (a down GEMM on fp32 inputs);
- y: the down GEMM's output stored bf16, or kept fp32 (the router weight multiplies the GEMM's accumulator);
- weights: the router weights used as given (fp32) or rounded to bf16 first;
- slot: each weighted slot, weight * y, kept fp32 or rounded to bf16;
- accumulator: the running sum over a token's slots kept in fp32 and rounded once, or in bf16 (rounded every add);
- order: the slots added in slot order k = 0, 1, ... or expert by expert (ascending local id, then slot).
`SPACE` holds every point (named profiles first); `rounding_profile` takes a name or "field=value,..." text.
"""

from __future__ import annotations

import dataclasses
import itertools

FIELDS: dict[str, tuple[str, ...]] = {  # each field's values, the production value first
    "h": ("bf16", "fp32"),
    "silu": ("fused", "bf16", "logistic"),
    "a": ("bf16", "fp32"),
    "y": ("bf16", "fp32"),
    "weights": ("fp32", "bf16"),
    "slot": ("fp32", "bf16"),
    "accumulator": ("fp32", "bf16"),
    "order": ("slot", "expert"),
}


@dataclasses.dataclass(frozen=True)
class Rounding:
    name: str
    seen_in: str  # where the convention comes from ("" for an unnamed point of the space)
    h: str = "bf16"
    silu: str = "fused"
    a: str = "bf16"
    y: str = "bf16"
    weights: str = "fp32"
    slot: str = "fp32"
    accumulator: str = "fp32"
    order: str = "slot"

    def __post_init__(self):
        for field, allowed in FIELDS.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"rounding {self.name!r}: {field} must be one of {allowed}, got "
                                 f"{getattr(self, field)!r}")

    @property
    def point(self) -> tuple[str, ...]:
        """The field values alone: two placements with the same point round the same way."""
        return tuple(getattr(self, field) for field in FIELDS)

    def words(self) -> str:
        """The placement in words."""
        silu = {"fused": "silu(gate)*up in fp32", "bf16": "silu rounded before the multiply",
                "logistic": "the logistic and silu each rounded before the multiply"}[self.silu]
        return (f"h {self.h}, {silu}, a {self.a}, y {self.y}, router weights {self.weights}, weighted slots "
                f"{self.slot}, sum in {self.accumulator} in {self.order} order")

    def describe(self) -> str:
        where = f" ({self.seen_in})" if self.seen_in else ""
        return f"{self.name}: {self.words()}{where}"


def point_name(**fields: str) -> str:
    """The canonical name of an unnamed point: its fields that differ from production, as field=value."""
    changed = [f"{field}={fields[field]}" for field, values in FIELDS.items() if fields[field] != values[0]]
    return ",".join(changed) or "production"


PRODUCTION = Rounding("production", "this pipeline (docs/contract.md, \"Rounding points\"): a fused silu_and_mul, an "
                      "fp32 gather in slot order")
PROFILES: dict[str, Rounding] = {p.name: p for p in (
    PRODUCTION,
    Rounding("hf_grouped", "Hugging Face transformers' grouped_mm and batched_mm experts: act_fn(gate) * up on bf16, "
             "the router's weights cast to bf16, weighted slots in bf16, summed over k in fp32",
             silu="bf16", weights="bf16", slot="bf16"),
    Rounding("hf_eager", "transformers' eager experts classes: as hf_grouped, then index_add_ into the bf16 output, "
             "expert by expert", silu="bf16", weights="bf16", slot="bf16", accumulator="bf16", order="expert"),
    Rounding("vllm_fused_moe", "vLLM's fused_moe Triton path: silu rounded to bf16 before the multiply (its "
             "silu_and_mul), the router weight on the down GEMM's fp32 accumulator, the k rows summed in bf16 "
             "(moe_sum, k = 2..4)", silu="bf16", y="fp32", slot="bf16", accumulator="bf16"),
    Rounding("sglang_fused_moe", "sglang's fused_moe Triton path: the router weight in the down GEMM's epilogue, the k "
             "rows summed in fp32 (moe_sum_reduce)", y="fp32", slot="bf16"),
)}


def _space() -> tuple[Rounding, ...]:
    named = {p.point: p for p in PROFILES.values()}
    points = list(PROFILES.values())
    for values in itertools.product(*FIELDS.values()):
        if values not in named:
            fields = dict(zip(FIELDS, values, strict=True))
            points.append(Rounding(point_name(**fields), "", **fields))
    return tuple(points)


SPACE: tuple[Rounding, ...] = _space()  # every placement, the named profiles first
_BY_NAME = {p.name: p for p in SPACE}
_BY_POINT = {p.point: p for p in SPACE}


def rounding_profile(rounding: Rounding | str) -> Rounding:
    """The placement `rounding` names: a PROFILES name, or "field=value,..." (the fields that differ from
    production; `point_name`), or a Rounding itself; ValueError naming the argument otherwise."""
    if isinstance(rounding, Rounding):
        return rounding
    if rounding in _BY_NAME:
        return _BY_NAME[rounding]
    try:
        fields = dict(PRODUCTION.__dict__, **dict(part.split("=", 1) for part in rounding.split(",")))
        fields.pop("name"), fields.pop("seen_in")
        point = Rounding(point_name(**fields), "", **fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"rounding must be one of {tuple(PROFILES)}, field=value pairs of {dict(FIELDS)}, or a "
                         f"Rounding; got {rounding!r} ({exc})") from None
    return _BY_POINT[point.point]
