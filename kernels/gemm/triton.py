"""`triton`: a Triton grouped GEMM (fp32 accumulation) for GPUs without DeepGEMM, and under the interpreter."""

from __future__ import annotations

import torch

from kernels._details.grouped_gemm_kernels import grouped_gemm_nt_kernel
from kernels._details.launch import Launcher, cdiv
from kernels._device import interpreting
from kernels.gemm.base import GroupedGemm

_GROUPED_GEMM = Launcher(grouped_gemm_nt_kernel)


class TritonGroupedGemm(GroupedGemm):
    name = "triton"

    def availability(self, device):
        device = torch.device(device)
        if device.type == "cuda":
            return True, "Triton compiled for this GPU"
        if interpreting():
            return True, "Triton interpreter on the CPU (slow: small shapes only)"
        return False, "Triton needs a GPU, or TRITON_INTERPRET=1 on a CPU"

    def shape_problem(self, hidden, inter):
        return None if hidden % 16 == 0 and inter % 16 == 0 else f"H={hidden} and I={inter} must be multiples of 16"

    def _run(self, a, b, d, dispatch, masked: bool):
        num_rows, k = a.reshape(-1, a.shape[-1]).shape
        n = b.shape[1]
        if interpreting():
            cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=1)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
        assert self.m_alignment % cfg["BLOCK_M"] == 0  # tiles never straddle two experts
        grid = (cdiv(num_rows, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
        _GROUPED_GEMM[grid](
            a, b, d, dispatch.layout_index,
            num_rows, n, k, dispatch.block_rows if masked else 1,
            MASKED=masked, CAST_FP32=interpreting(), **cfg,
        )
        return d

    def m_grouped_gemm_nt_contiguous(self, a, b, dispatch, empty):
        d = empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        return self._run(a, b, d, dispatch, masked=False)

    def m_grouped_gemm_nt_masked(self, a, b, dispatch, empty):
        d = empty((*a.shape[:2], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        return self._run(a, b, d, dispatch, masked=True)


BACKEND = TritonGroupedGemm()
