"""Peer implementations the bench measures ours against, each callable like kernels.moe_expert_forward.

`torch_native_forward` is the pipeline a PyTorch user writes without custom kernels (the issue's "torch-native
pipeline"): argsort the local slots by expert, index_select their rows, torch._grouped_mm for both GEMMs over the
unpadded segments, silu(gate)*up in fp32, and a weighted index_add into an fp32 output. It is a peer for speed, and
`python -m verify.diff --impl verify.perf.peers:torch_native_forward` checks it like any implementation.
"""

from __future__ import annotations

import torch


def torch_native_forward(x, topk_ids, topk_weights, w13, w2, *, ep_size: int = 1, ep_rank: int = 0,
                         num_experts: int | None = None, gate_up_order: str = "gate_up", **_options) -> torch.Tensor:
    """bf16 [M, H]; layout / gemm options are ignored (there is one layout: sorted, unpadded segments)."""
    num_tokens, topk = topk_ids.shape
    num_local_experts = w13.shape[0]
    local = topk_ids.long() - ep_rank * num_local_experts
    is_local = (topk_ids >= 0) & (local >= 0) & (local < num_local_experts)
    flat = torch.where(is_local, local, num_local_experts).flatten()  # non-local slots sort last, past every expert
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_local_experts + 1)[:num_local_experts]
    order = order[: int(counts.sum())]  # the host sync
    if order.numel() == 0:
        return torch.zeros(num_tokens, x.shape[1], dtype=torch.bfloat16, device=x.device)
    token = order // topk
    rows = x.index_select(0, token)
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch._grouped_mm(rows, w13.transpose(1, 2), offs=ends)
    first, second = h.float().chunk(2, dim=-1)
    gate, up = (first, second) if gate_up_order == "gate_up" else (second, first)
    a = (torch.nn.functional.silu(gate) * up).bfloat16()
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=ends)
    weights = topk_weights.flatten().index_select(0, order)
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token, y.float() * weights[:, None])
    return out.bfloat16()
