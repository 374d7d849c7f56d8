"""Per-stage references: the arithmetic of each pipeline stage in plain torch, in "exact" or "faithful" form.

moe.py composes them into the whole expert stage; the kernel stage tests compare each Triton stage with its own.
faithful=True applies the production rounding points (docs/contract.md, "Rounding points"); faithful=False keeps
float64 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_bf16(t: torch.Tensor) -> torch.Tensor:
    """Store an accumulator as bf16: the exact value rounded to the fp32 accumulator, then to bf16 (RNE)."""
    return t.float().to(torch.bfloat16)


def gemm_nt(a: torch.Tensor, b: torch.Tensor, *, faithful: bool) -> torch.Tensor:
    """a [n, K] · b[N, K]ᵀ, float64. Faithful: accumulated exactly (the ideal fp32 accumulator), stored as bf16."""
    d = a.double() @ b.double().T
    return to_bf16(d).double() if faithful else d


def silu_and_mul(h: torch.Tensor, gate_up_order: str = "gate_up", *, faithful: bool) -> torch.Tensor:
    """h [n, 2I] -> silu(gate) * up [n, I]. Faithful: fp32 silu of the bf16 gate times the bf16 up, stored as bf16."""
    first, second = h.chunk(2, dim=-1)
    gate, up = (first, second) if gate_up_order == "gate_up" else (second, first)
    if faithful:
        return to_bf16(F.silu(gate.float()) * up.float()).double()
    return F.silu(gate.double()) * up.double()


def weighted_sum(y: torch.Tensor, weights: torch.Tensor, is_local: torch.Tensor, *, faithful: bool) -> torch.Tensor:
    """out[t] = sum over local slots k of weights[t, k] * y[t, k] (y [M, k, H]) -> float32 [M, H].

    Non-local slots contribute nothing, whatever their weight or y. Faithful: fp32 accumulation in slot order,
    stored as bf16."""
    if not faithful:
        w = torch.where(is_local, weights.double(), 0.0)
        y = torch.where(is_local.unsqueeze(-1), y.double(), 0.0)
        return (w.unsqueeze(-1) * y).sum(dim=1).float()
    acc = torch.zeros(y.shape[0], y.shape[2], dtype=torch.float32, device=y.device)
    for k in range(y.shape[1]):
        acc = torch.where(is_local[:, k, None], acc + weights[:, k, None].float() * y[:, k].float(), acc)
    return to_bf16(acc).float()
