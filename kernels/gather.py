"""Gather stage: out[t] = sum over slots k, in order, of topk_weights[t, k] * y[output_index[t, k]].

fp32 accumulation in fixed slot order (so the result does not depend on which rows the scatter's atomics chose),
bf16 output, any hidden size, every output row written (a row with no local slot is exactly 0).
"""

from __future__ import annotations

import torch

from kernels._details import stage_kernels as K
from kernels._details.launch import Launcher, cdiv, next_power_of_2
from kernels._device import interpreting
from kernels.dispatch import Allocator, Dispatch

_GATHER = Launcher(K.gather_kernel)


def gather(
    y: torch.Tensor, dispatch: Dispatch, topk_weights: torch.Tensor, *, empty: Allocator = torch.empty
) -> torch.Tensor:
    """y: bf16 rows of the down GEMM (the Dispatch's layout) -> bf16 [M, H]."""
    if y.dtype != torch.bfloat16 or y.shape[:-1] != dispatch.rows.shape[:-1] or not y.is_contiguous():
        raise ValueError(f"y must be a contiguous bf16 tensor with leading dims {tuple(dispatch.rows.shape[:-1])}, "
                         f"got {y.dtype} {tuple(y.shape)}")
    if topk_weights.dtype != torch.float32 or topk_weights.shape != dispatch.output_index.shape:
        raise ValueError(f"topk_weights must be float32 {tuple(dispatch.output_index.shape)}, got "
                         f"{topk_weights.dtype} {tuple(topk_weights.shape)}")
    topk_weights = topk_weights.contiguous()
    num_tokens, topk = dispatch.output_index.shape
    hidden = y.shape[-1]
    out = empty((num_tokens, hidden), dtype=torch.bfloat16, device=y.device)
    if interpreting():
        cfg = dict(BLOCK_T=min(next_power_of_2(num_tokens), 256), BLOCK_H=min(next_power_of_2(hidden), 1024))
    else:
        # one token per program (see gather_kernel) in two warps: twice the programs an SM holds, each waiting on its
        # own chain of loads (H200, kernel spans, M = 4096: Qwen3-like 14.3 -> 14.1 us, DeepSeek-like 41.6 -> 39.8 us,
        # gpt-oss-like 16.6 -> 16.1 us against four warps; Qwen3-like M = 256: 4.1 -> 4.3 us)
        cfg = dict(BLOCK_T=1, BLOCK_H=min(next_power_of_2(hidden), 1024), num_warps=2)
    grid = (cdiv(num_tokens, cfg["BLOCK_T"]), cdiv(hidden, cfg["BLOCK_H"]))
    _GATHER[grid](y, dispatch.output_index, topk_weights, out, num_tokens, hidden, TOPK=topk, **cfg)
    return out
