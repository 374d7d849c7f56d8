"""Per-stage references: the arithmetic of each pipeline stage in plain torch, in "exact" or "faithful" form.

moe.py composes them into the whole expert stage; the kernel stage tests compare each Triton stage with its own.
faithful=True applies the rounding points of a profile (reference/rounding.py; production by default, the points of
docs/contract.md, "Rounding points"); faithful=False keeps float64 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.rounding import PRODUCTION, Rounding


def to_bf16(t: torch.Tensor) -> torch.Tensor:
    """Store an accumulator as bf16: the exact value rounded to the fp32 accumulator, then to bf16 (RNE)."""
    return t.float().to(torch.bfloat16)


def to_fp32(t: torch.Tensor) -> torch.Tensor:
    """Keep an accumulator in fp32: the exact value rounded to fp32 (RNE), as a float64 tensor."""
    return t.float().double()


def stored(t: torch.Tensor, store: str) -> torch.Tensor:
    """An exact accumulator as an implementation keeps it, as float64: stored bf16 (store="bf16") or kept fp32."""
    return to_bf16(t).double() if store == "bf16" else to_fp32(t)


def gemm_nt(a: torch.Tensor, b: torch.Tensor, *, faithful: bool, store: str = "bf16") -> torch.Tensor:
    """a [n, K] · b[N, K]ᵀ, float64. Faithful: accumulated exactly (the ideal fp32 accumulator), then `stored`."""
    d = a.double() @ b.double().T
    return stored(d, store) if faithful else d


def silu_and_mul(h: torch.Tensor, gate_up_order: str = "gate_up", *, faithful: bool,
                 rounding: Rounding = PRODUCTION) -> torch.Tensor:
    """h [n, 2I] -> silu(gate) * up [n, I]. Faithful: from the h given (bf16 or fp32 values), silu in fp32 as
    rounding.silu says ("fused": not rounded; "bf16": rounded before the multiply; "logistic": the logistic rounded,
    then gate * logistic rounded), times up in fp32, stored as rounding.a says (bf16, or kept fp32)."""
    first, second = h.chunk(2, dim=-1)
    gate, up = (first, second) if gate_up_order == "gate_up" else (second, first)
    if not faithful:
        return F.silu(gate.double()) * up.double()
    gate = gate.float()
    if rounding.silu == "logistic":
        silu = to_bf16(gate * to_bf16(torch.sigmoid(gate)).float()).float()
    else:
        silu = F.silu(gate)
        if rounding.silu == "bf16":
            silu = to_bf16(silu).float()
    a = silu * up.float()
    return to_bf16(a).double() if rounding.a == "bf16" else a.double()


def weighted_sum(y: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor, *, faithful: bool,
                 rounding: Rounding = PRODUCTION) -> torch.Tensor:
    """out[t] = sum over local slots k of weights[t, k] * y[t, k] (y [M, k, H]) -> float32 [M, H].

    local_ids [M, k]: the slot's local expert, -1 where not local: such slots contribute nothing, whatever their
    weight or y. Faithful: as `rounding` says (reference/rounding.py), y being the down GEMM's output as stored
    (bf16, or its fp32 accumulator); production adds weight * y in fp32 in slot order and stores bf16."""
    is_local = local_ids >= 0
    if not faithful:
        w = torch.where(is_local, weights.double(), 0.0)
        y = torch.where(is_local.unsqueeze(-1), y.double(), 0.0)
        return (w.unsqueeze(-1) * y).sum(dim=1).float()
    w = weights.float()
    if rounding.weights == "bf16":
        w = to_bf16(w).float()
    terms = w.unsqueeze(-1) * y.float()  # fp32 products
    if rounding.slot == "bf16":
        terms = to_bf16(terms).float()
    if rounding.order == "expert":  # expert by expert (ascending local id, then slot), remote slots last
        expert = torch.where(is_local, local_ids.long(), 1 << 40)
        order = torch.argsort(expert * y.shape[1] + torch.arange(y.shape[1], device=y.device), dim=1)
        terms = torch.gather(terms, 1, order.unsqueeze(-1).expand_as(terms))
        is_local = torch.gather(is_local, 1, order)
    acc = torch.zeros(y.shape[0], y.shape[2], dtype=torch.float32, device=y.device)
    for k in range(y.shape[1]):
        total = acc + terms[:, k]
        if rounding.accumulator == "bf16":
            total = to_bf16(total).float()
        acc = torch.where(is_local[:, k, None], total, acc)
    return to_bf16(acc).float()
