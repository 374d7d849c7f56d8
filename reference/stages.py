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


def gemm_nt(a: torch.Tensor, b: torch.Tensor, *, faithful: bool) -> torch.Tensor:
    """a [n, K] · b[N, K]ᵀ, float64. Faithful: accumulated exactly (the ideal fp32 accumulator), stored as bf16."""
    d = a.double() @ b.double().T
    return to_bf16(d).double() if faithful else d


def silu_and_mul(h: torch.Tensor, gate_up_order: str = "gate_up", *, faithful: bool,
                 rounding: Rounding = PRODUCTION) -> torch.Tensor:
    """h [n, 2I] -> silu(gate) * up [n, I]. Faithful: fp32 silu of the bf16 gate times the bf16 up, stored as bf16
    (rounding.silu == "fused"), or the silu rounded to bf16 before the multiply ("bf16")."""
    first, second = h.chunk(2, dim=-1)
    gate, up = (first, second) if gate_up_order == "gate_up" else (second, first)
    if not faithful:
        return F.silu(gate.double()) * up.double()
    silu = F.silu(gate.float())
    if rounding.silu == "bf16":
        silu = to_bf16(silu).float()
    return to_bf16(silu * up.float()).double()


def weighted_sum(y: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor, *, faithful: bool,
                 rounding: Rounding = PRODUCTION) -> torch.Tensor:
    """out[t] = sum over local slots k of weights[t, k] * y[t, k] (y [M, k, H]) -> float32 [M, H].

    local_ids [M, k]: the slot's local expert, -1 where not local: such slots contribute nothing, whatever their
    weight or y. Faithful: as `rounding` says (reference/rounding.py): y is the bf16 output of the down GEMM, or
    for slot == "epilogue" its exact value (the GEMM's accumulator); production adds weight * y in fp32 in slot order
    and stores bf16."""
    is_local = local_ids >= 0
    if not faithful:
        w = torch.where(is_local, weights.double(), 0.0)
        y = torch.where(is_local.unsqueeze(-1), y.double(), 0.0)
        return (w.unsqueeze(-1) * y).sum(dim=1).float()
    w = weights.float()
    if rounding.weights == "bf16":
        w = to_bf16(w).float()
    terms = w.unsqueeze(-1) * y.float()  # fp32 products (of the fp32 accumulator, for "epilogue")
    if rounding.slot != "fp32":
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
