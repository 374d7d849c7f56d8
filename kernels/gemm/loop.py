"""`loop`: one torch matmul per expert on its valid rows only (the CPU path, and the simplest one to trust).

On a CPU the product runs in fp32 on the bf16 inputs and is rounded once to bf16 (fp32 accumulation, like the GPU
backends); on a GPU it is a bf16 cuBLAS matmul (fp32 accumulation)."""

from __future__ import annotations

import torch

from kernels.gemm.base import GroupedGemm


def _matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_cuda:
        return a @ b.T
    return (a.float() @ b.float().T).to(torch.bfloat16)


class Loop(GroupedGemm):
    name = "loop"

    def availability(self, device):
        return True, "per-expert torch matmul runs everywhere"

    def m_grouped_gemm_nt_contiguous(self, a, b, dispatch, empty):
        d = empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        for e, (start, count) in enumerate(zip(dispatch.segment_starts(), dispatch.counts_host)):
            if count:
                d[start : start + count] = _matmul_nt(a[start : start + count], b[e])
        return d

    def m_grouped_gemm_nt_masked(self, a, b, dispatch, empty):
        d = empty((*a.shape[:2], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        for e, count in enumerate(dispatch.counts_host):
            if count:
                d[e, :count] = _matmul_nt(a[e, :count], b[e])
        return d


BACKEND = Loop()
