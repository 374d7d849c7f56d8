"""`loop`: one torch matmul per expert on its valid rows only (the CPU path, and the simplest one to trust).

On a CPU the product is accumulated in float64 and rounded once to the fp32 accumulator, then to bf16: a CPU fp32
matmul (MKL) gives a row a result that depends on its position in the batch, which would make the output depend on
the scatter's slot order (the suite's permutation check caught it). On a GPU it is a bf16 cuBLAS matmul."""

from __future__ import annotations

import torch

from kernels.gemm.base import GroupedGemm


def _matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_cuda:
        return a @ b.T
    return (a.double() @ b.double().T).float().to(torch.bfloat16)


class Loop(GroupedGemm):
    name = "loop"

    def availability(self, device):
        return True, "per-expert torch matmul runs everywhere"

    def m_grouped_gemm_nt_contiguous(self, a, b, dispatch, empty):
        d = empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        for e, (start, count) in enumerate(zip(dispatch.first_rows(), dispatch.counts_host, strict=True)):
            if count:
                d[start : start + count] = _matmul_nt(a[start : start + count], b[e])
        return d

    def m_grouped_gemm_nt_masked(self, a, b, dispatch, empty):
        d = empty((*a.shape[:2], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        # counts on the device only (sync="after" / "never"): whole blocks (rows are independent; reading masked_m
        # would be a sync)
        counts = dispatch.counts_host or (dispatch.block_rows,) * dispatch.num_local_experts
        for e, count in enumerate(counts):
            if count:
                d[e, :count] = _matmul_nt(a[e, :count], b[e])
        return d


BACKEND = Loop()
