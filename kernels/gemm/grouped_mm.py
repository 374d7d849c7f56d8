"""`grouped_mm`: torch._grouped_mm (CUTLASS on SM90+, a reference implementation on the CPU).

Contiguous: A [rows, K] with int32 cumulative segment ends as offsets (padding rows ride along in their expert's
segment and are computed, harmlessly: rows are independent). Masked: the batched 3D x 3D form over whole blocks."""

from __future__ import annotations

import torch

from kernels.dispatch import align_up
from kernels.gemm.base import GroupedGemm


class GroupedMM(GroupedGemm):
    name = "grouped_mm"

    def availability(self, device):
        device = torch.device(device)
        if not hasattr(torch, "_grouped_mm"):
            return False, f"torch {torch.__version__} has no torch._grouped_mm"
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
            return False, "torch._grouped_mm's bf16 CUTLASS kernels need SM90 or newer"
        if device.type not in ("cuda", "cpu"):
            return False, f"no torch._grouped_mm on {device.type}"
        return True, f"torch._grouped_mm on {device.type}"

    def m_grouped_gemm_nt_contiguous(self, a, b, dispatch, empty):
        ends = torch.cumsum(align_up(dispatch.counts, self.m_alignment), 0, dtype=torch.int32)
        return torch._grouped_mm(a, b.transpose(1, 2), offs=ends)

    def m_grouped_gemm_nt_masked(self, a, b, dispatch, empty):
        return torch._grouped_mm(a, b.transpose(1, 2))


BACKEND = GroupedMM()
