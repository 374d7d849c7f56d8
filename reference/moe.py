"""The golden model of the bf16 MoE expert stage: plain torch, one readable pass over the local slots, expert by expert.

For one token t routed (slot k) to local expert e:
    h = w13[e] · x_t                  [2I]   gate and up projections
    g, u = split(h)                          rows [0, I) are the gate for gate_up_order="gate_up"
    a = silu(g) * u                   [I]
    y = w2[e] · a                     [H]
    out[t] += topk_weights[t, k] · y
Ids of -1 and of experts on other ranks contribute nothing; a row with no local expert is exactly 0.

Two modes:
- "exact":    float64 all the way on the bf16 inputs; no intermediate rounding.
- "faithful": the rounding points of a placement (reference/rounding.py); by default the production points
              (docs/contract.md, "Rounding points"): each GEMM accumulates exactly (modelled in float64, the ideal
              fp32 accumulator) and is stored as bf16; silu is computed in fp32 from the bf16 gate and multiplied by
              the bf16 up value in fp32, the product stored as bf16; the gather accumulates weight · bf16 row in fp32
              in fixed slot order and stores bf16.
The result is float32 [M, H] in both modes. `faithful_space` gives the faithful reference of many placements at once;
`exact_trace` the exact one with its intermediates, for the error model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from reference import stages
from reference.layouts import local_expert_ids
from reference.rounding import FIELDS, PRODUCTION, SPACE, Rounding, rounding_profile

MODES = ("exact", "faithful")
GATE_UP_ORDERS = ("gate_up", "up_gate")


def moe_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    ep_size: int = 1,
    ep_rank: int = 0,
    num_experts: int | None = None,
    gate_up_order: str = "gate_up",
    mode: str = "exact",
    rounding: Rounding | str = PRODUCTION,
) -> torch.Tensor:
    """Reference output (float32 [M, H]) of rank `ep_rank`'s expert stage; see the module docstring. `rounding`: the
    placement (reference/rounding.py: a Rounding, a profile's name or "field=value,...") a faithful reference
    follows; the exact one rounds nowhere."""
    num_experts = _validate(x, topk_ids, topk_weights, w13, w2, ep_size, ep_rank, num_experts, gate_up_order, mode)
    rounding = rounding_profile(rounding)
    faithful = mode == "faithful"
    local_ids = local_expert_ids(topk_ids, ep_size, ep_rank, num_experts)
    trace = _Slots(x, local_ids, w13)
    h = trace.gate_up(w13, faithful, rounding.h)
    a = stages.silu_and_mul(h, gate_up_order, faithful=faithful, rounding=rounding)
    y = trace.down(a, w2, faithful, rounding.y)
    return stages.weighted_sum(trace.per_slot(y), topk_weights, local_ids, faithful=faithful, rounding=rounding)


def faithful_space(x, topk_ids, topk_weights, w13, w2, *, ep_size: int = 1, ep_rank: int = 0,
                   num_experts: int | None = None, gate_up_order: str = "gate_up",
                   points: tuple[Rounding, ...] = SPACE) -> Iterator[tuple[Rounding, torch.Tensor]]:
    """(placement, faithful reference) for every placement of `points`: what `moe_reference(..., mode="faithful",
    rounding=point)` gives. The GEMMs are shared between the points that round h, a and y alike (one gate+up GEMM,
    one down GEMM per way of forming a), so the points come group by group, not in the order of `points`, and only
    one group's intermediates are held at a time."""
    num_experts = _validate(x, topk_ids, topk_weights, w13, w2, ep_size, ep_rank, num_experts, gate_up_order,
                            "faithful")
    local_ids = local_expert_ids(topk_ids, ep_size, ep_rank, num_experts)
    trace = _Slots(x, local_ids, w13)
    exact_h = trace.gate_up(w13, False, "fp32")
    by_stage: dict[tuple[str, str, str], list[Rounding]] = {}
    for point in points:
        by_stage.setdefault((point.h, point.silu, point.a), []).append(point)
    for (h_store, _, _), group in by_stage.items():
        a = stages.silu_and_mul(stages.stored(exact_h, h_store), gate_up_order, faithful=True, rounding=group[0])
        exact_y = trace.down(a, w2, False, "fp32")
        ys = {store: trace.per_slot(stages.stored(exact_y, store)) for store in FIELDS["y"]}
        for point in group:
            yield point, stages.weighted_sum(ys[point.y], topk_weights, local_ids, faithful=True, rounding=point)


@dataclasses.dataclass(frozen=True)
class Trace:
    """The exact (float64) intermediates of every local (token, slot), in (token, slot) order: what the error model
    (verify/errormodel.py) weighs each rounding by. Rows of a slot that is not local appear nowhere."""

    token: torch.Tensor  # int64 [n]: the slot's row
    slot: torch.Tensor  # int64 [n]: its position k
    expert: torch.Tensor  # int64 [n]: its LOCAL expert
    weight: torch.Tensor  # float64 [n]: its router weight
    gate: torch.Tensor  # float64 [n, I]
    up: torch.Tensor  # float64 [n, I]
    y: torch.Tensor  # float64 [n, H]: the expert's output, before the router weight
    out: torch.Tensor  # float64 [M, H]: the exact reference
    local_ids: torch.Tensor  # int64 [M, k], -1 where not local


def exact_trace(x, topk_ids, topk_weights, w13, w2, *, ep_size: int = 1, ep_rank: int = 0,
                num_experts: int | None = None, gate_up_order: str = "gate_up") -> Trace:
    """The exact reference with its intermediates (`Trace`)."""
    num_experts = _validate(x, topk_ids, topk_weights, w13, w2, ep_size, ep_rank, num_experts, gate_up_order, "exact")
    local_ids = local_expert_ids(topk_ids, ep_size, ep_rank, num_experts)
    trace = _Slots(x, local_ids, w13)
    first, second = trace.gate_up(w13, False, "fp32").chunk(2, dim=-1)
    gate, up = (first, second) if gate_up_order == "gate_up" else (second, first)
    y = trace.down(stages.silu_and_mul(torch.cat([gate, up], -1), faithful=False), w2, False, "fp32")
    weight = topk_weights.double()[trace.token, trace.slot]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device).index_add_(0, trace.token, weight[:, None] * y)
    return Trace(trace.token, trace.slot, trace.expert, weight, gate, up, y, out, local_ids)


class _Slots:
    """Every local (token, slot) of a batch, in (token, slot) order, with the expert-by-expert GEMMs over them."""

    def __init__(self, x: torch.Tensor, local_ids: torch.Tensor, w13: torch.Tensor):
        self.x, self.local_ids, self.num_local_experts = x, local_ids, w13.shape[0]
        self.token, self.slot = (local_ids >= 0).nonzero(as_tuple=True)
        self.expert = local_ids[self.token, self.slot]

    def _per_expert(self, rows: torch.Tensor, w: torch.Tensor, faithful: bool, store: str) -> torch.Tensor:
        out = torch.zeros(rows.shape[0], w.shape[1], dtype=torch.float64, device=rows.device)
        for e in range(self.num_local_experts):
            mine = (self.expert == e).nonzero(as_tuple=True)[0]
            if mine.numel():
                out[mine] = stages.gemm_nt(rows[mine], w[e], faithful=faithful, store=store)
        return out

    def gate_up(self, w13: torch.Tensor, faithful: bool, store: str) -> torch.Tensor:
        """h [n, 2I] of every slot."""
        return self._per_expert(self.x[self.token], w13, faithful, store)

    def down(self, a: torch.Tensor, w2: torch.Tensor, faithful: bool, store: str) -> torch.Tensor:
        """y [n, H] of every slot, from its a [n, I]."""
        return self._per_expert(a, w2, faithful, store)

    def per_slot(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [M, k, H], zero where a slot is not local."""
        out = torch.zeros(*self.local_ids.shape, rows.shape[1], dtype=torch.float64, device=rows.device)
        out[self.token, self.slot] = rows
        return out


def _validate(x, topk_ids, topk_weights, w13, w2, ep_size, ep_rank, num_experts, gate_up_order, mode,
              x_dtypes=(torch.bfloat16,), weight_dtypes=(torch.bfloat16,)) -> int:
    """Check the arguments as docs/contract.md, "Bad input" states them; returns num_experts. Errors name the
    argument. `x_dtypes` / `weight_dtypes`: what x and w13 / w2 may be (bf16; the fp8 reference passes its own)."""
    for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights), ("w13", w13), ("w2", w2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    expect = (
        ("x", x, x_dtypes, 2),
        ("topk_ids", topk_ids, (torch.int32, torch.int64), 2),
        ("topk_weights", topk_weights, (torch.float32,), 2),
        ("w13", w13, weight_dtypes, 3),
        ("w2", w2, weight_dtypes, 3),
    )
    for name, t, dtypes, ndim in expect:
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    num_tokens, hidden = x.shape
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows but x has {num_tokens}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights shape {tuple(topk_weights.shape)} != topk_ids shape {tuple(topk_ids.shape)}")
    num_local_experts, two_inter, hidden_w13 = w13.shape
    if hidden_w13 != hidden or two_inter % 2:
        raise ValueError(f"w13 must be [E_local, 2*I, H={hidden}], got {tuple(w13.shape)}")
    if tuple(w2.shape) != (num_local_experts, hidden, two_inter // 2):
        raise ValueError(f"w2 must be [E_local={num_local_experts}, H={hidden}, I={two_inter // 2}], got "
                         f"{tuple(w2.shape)}")
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
    if gate_up_order not in GATE_UP_ORDERS:
        raise ValueError(f"gate_up_order must be one of {GATE_UP_ORDERS}, got {gate_up_order!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if topk_ids.numel() and (int(topk_ids.min()) < -1 or int(topk_ids.max()) >= num_experts):
        raise ValueError(f"topk_ids must lie in [-1, num_experts={num_experts})")
    return num_experts
