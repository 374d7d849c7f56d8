"""The golden model of the bf16 MoE expert stage: plain torch, one readable pass per local expert.

For one token t routed (slot k) to local expert e:
    h = w13[e] · x_t                  [2I]   gate and up projections
    g, u = split(h)                          rows [0, I) are the gate for gate_up_order="gate_up"
    a = silu(g) * u                   [I]
    y = w2[e] · a                     [H]
    out[t] += topk_weights[t, k] · y
Ids of -1 and of experts on other ranks contribute nothing; a row with no local expert is exactly 0.

Two modes:
- "exact":    float64 all the way on the bf16 inputs; no intermediate rounding.
- "faithful": the rounding points of a profile (reference/rounding.py); by default the production points
              (docs/contract.md, "Rounding points"): each GEMM accumulates exactly (modelled in float64, the ideal
              fp32 accumulator) and is stored as bf16; silu is computed in fp32 from the bf16 gate and multiplied by
              the bf16 up value in fp32, the product stored as bf16; the gather accumulates weight · bf16 row in fp32
              in fixed slot order and stores bf16.
The result is float32 [M, H] in both modes.
"""

from __future__ import annotations

import torch

from reference import stages
from reference.layouts import local_expert_ids
from reference.rounding import PRODUCTION, Rounding, rounding_profile

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
    profile (reference/rounding.py, or its name) a faithful reference follows; the exact one rounds nowhere."""
    num_experts = _validate(x, topk_ids, topk_weights, w13, w2, ep_size, ep_rank, num_experts, gate_up_order, mode)
    rounding = rounding_profile(rounding)
    faithful = mode == "faithful"
    local_ids = local_expert_ids(topk_ids, ep_size, ep_rank, num_experts)

    # y[t, k] = the (weight-free) output of the expert in slot k of token t; zero where the slot is not local.
    y = torch.zeros(*topk_ids.shape, x.shape[1], dtype=torch.float64, device=x.device)
    for e in range(w13.shape[0]):
        token, slot = (local_ids == e).nonzero(as_tuple=True)
        if token.numel():
            h = stages.gemm_nt(x[token], w13[e], faithful=faithful)
            a = stages.silu_and_mul(h, gate_up_order, faithful=faithful, rounding=rounding)
            # a GEMM that applies the router weight in its epilogue never rounds y itself
            y[token, slot] = stages.gemm_nt(a, w2[e], faithful=faithful and rounding.slot != "epilogue")
    return stages.weighted_sum(y, topk_weights, local_ids, faithful=faithful, rounding=rounding)


def _validate(x, topk_ids, topk_weights, w13, w2, ep_size, ep_rank, num_experts, gate_up_order, mode) -> int:
    """Check the arguments as docs/contract.md, "Bad input" states them; returns num_experts. Errors name the
    argument."""
    for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights), ("w13", w13), ("w2", w2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    expect = (
        ("x", x, (torch.bfloat16,), 2),
        ("topk_ids", topk_ids, (torch.int32, torch.int64), 2),
        ("topk_weights", topk_weights, (torch.float32,), 2),
        ("w13", w13, (torch.bfloat16,), 3),
        ("w2", w2, (torch.bfloat16,), 3),
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
