"""vLLM's fused_moe Triton path, rebuilt from its public design as an implementation of the contract:
`--impl verify.adapters.vllm_fused_moe:fused_moe` (Triton; on a CPU through the interpreter).

The steps, as vLLM's fused_moe runs them for bf16 experts under expert parallelism (an `expert_map` from global ids
to local ones, -1 for experts of other ranks):
1. align: every (token, slot) sorted by its local expert, each expert's run padded to a multiple of BLOCK_M with a
   sentinel id (M * k), one expert id per BLOCK_M block (-1 for the blocks of slots that are not local);
2. the gate+up GEMM over those blocks: a block reads its tokens' rows of x (slot id // k), accumulates in fp32 and
   stores bf16 into h [M * k, 2I]; a block of expert -1 writes zeros;
3. silu_and_mul as vLLM's CUDA kernel computes it: silu(gate) in fp32 rounded to bf16, times up, rounded again;
4. the down GEMM over the same blocks, the router weight multiplying the fp32 accumulator (MUL_ROUTED_WEIGHT) before
   the bf16 store into y [M * k, H];
5. moe_sum: the k rows of a token added in bf16 for k = 2..4, in fp32 otherwise.
`fused_moe_slot_dropped` leaves out the last top-k slot in the align step (a planted bug).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._device import interpreting

# vLLM's small-batch tiles on a GPU; whole rows under the interpreter, which pays per program
BLOCK_M, BLOCK_N, BLOCK_K = (16, 256, 256) if interpreting() else (16, 64, 32)


@triton.jit
def _grouped_gemm(a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, N, K, num_valid, a_row_div,
                  stride_am, stride_be, stride_bn, stride_cm, MUL_ROUTED_WEIGHT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[id] = A[id // a_row_div] · B[expert]ᵀ for the BLOCK_M sorted slot ids of this block (times the slot's router
    weight when MUL_ROUTED_WEIGHT), fp32 accumulation, one store; zeros for a block of expert -1."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = ids < num_valid
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + ids[:, None] * stride_cm + cols[None, :]
    c_mask = valid[:, None] & (cols[None, :] < N)
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=c_mask)
        return
    rows = ids // a_row_div
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :], mask=valid[:, None] & (ks[None, :] < K),
                    other=0.0)
        b = tl.load(b_ptr + expert * stride_be + cols[None, :] * stride_bn + ks[:, None],
                    mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)
        acc += tl.dot(a, b)
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(weights_ptr + ids, mask=valid, other=0.0)[:, None]
    tl.store(c_ptrs, acc, mask=c_mask)


def align(local_ids: torch.Tensor, num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted slot ids padded per expert to BLOCK_M with the sentinel M * k, the local expert of each block; -1
    for the blocks of slots that are not local)."""
    flat = local_ids.flatten()
    sentinel = flat.numel()
    ids, experts = [], []
    for e in [*range(num_local_experts), -1]:
        mine = (flat == e).nonzero().flatten() if e >= 0 else (flat < 0).nonzero().flatten()
        if not mine.numel():
            continue
        blocks = -(-mine.numel() // BLOCK_M)
        padded = torch.full((blocks * BLOCK_M,), sentinel, dtype=torch.int32, device=flat.device)
        padded[: mine.numel()] = mine.to(torch.int32)
        ids.append(padded)
        experts.append(torch.full((blocks,), e, dtype=torch.int32, device=flat.device))
    if not ids:
        return torch.empty(0, dtype=torch.int32, device=flat.device), torch.empty(0, dtype=torch.int32)
    return torch.cat(ids), torch.cat(experts)


def _gemm(a, w, out, weights, sorted_ids, expert_ids, num_valid, a_row_div, mul_routed_weight):
    n, k = w.shape[1], w.shape[2]
    grid = (expert_ids.numel(), triton.cdiv(n, BLOCK_N))
    _grouped_gemm[grid](a, w, out, weights, sorted_ids, expert_ids, n, k, num_valid, a_row_div, a.stride(0),
                        w.stride(0), w.stride(1), out.stride(0), MUL_ROUTED_WEIGHT=mul_routed_weight,
                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def _fused_moe(x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None,
               gate_up_order="gate_up", drop_last_slot=False) -> torch.Tensor:
    num_tokens, topk = topk_ids.shape
    num_local = w13.shape[0]
    num_experts = num_experts or num_local * ep_size
    expert_map = torch.full((num_experts + 1,), -1, dtype=torch.int64, device=x.device)  # [-1] maps -1 to -1
    expert_map[ep_rank * num_local: (ep_rank + 1) * num_local] = torch.arange(num_local, device=x.device)
    local = expert_map[topk_ids.long()]
    if drop_last_slot:
        local = local.clone()
        local[:, -1] = -1
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    weights = topk_weights.float().contiguous().flatten()
    sorted_ids, expert_ids = align(local, num_local)
    inter = w2.shape[2]
    h = torch.empty(num_tokens * topk, 2 * inter, dtype=torch.bfloat16, device=x.device)
    if expert_ids.numel():
        _gemm(x, w13, h, weights, sorted_ids, expert_ids, num_tokens * topk, topk, False)
    first, second = h.float().chunk(2, dim=-1)
    gate, up = (first, second) if gate_up_order == "gate_up" else (second, first)
    a = (F.silu(gate).to(torch.bfloat16).float() * up).to(torch.bfloat16)
    y = torch.empty(num_tokens * topk, x.shape[1], dtype=torch.bfloat16, device=x.device)
    if expert_ids.numel():
        _gemm(a, w2, y, weights, sorted_ids, expert_ids, num_tokens * topk, 1, True)
    y = y.view(num_tokens, topk, x.shape[1])
    if topk in (2, 3, 4):
        out = y[:, 0]
        for k in range(1, topk):
            out = out + y[:, k]  # bf16 + bf16: rounded at every add
        return out
    return y.float().sum(dim=1).to(torch.bfloat16) if topk else torch.zeros_like(x)


def fused_moe(x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None,
              gate_up_order="gate_up"):
    """vLLM's fused_moe path (see the module docstring)."""
    return _fused_moe(x, topk_ids, topk_weights, w13, w2, ep_size=ep_size, ep_rank=ep_rank, num_experts=num_experts,
                      gate_up_order=gate_up_order)


def fused_moe_slot_dropped(x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None,
                           gate_up_order="gate_up"):
    """fused_moe with the last top-k slot left out of the align step: a planted bug."""
    return _fused_moe(x, topk_ids, topk_weights, w13, w2, ep_size=ep_size, ep_rank=ep_rank, num_experts=num_experts,
                      gate_up_order=gate_up_order, drop_last_slot=True)
