"""`triton`: Triton grouped GEMMs (fp32 accumulation) for GPUs without DeepGEMM, under the interpreter, and for decode.

Two kernels (kernels/_details/grouped_gemm_kernels.py): the tiled one over every row of the layout, and, for a masked
block whose fullest expert is expected to hold at most SKINNY_MAX_ROWS rows (`Dispatch.rows_hint`: decode), the skinny
kernel, whose grid follows the weights and the rows expected rather than the block's mostly empty rows. The skinny
kernel also fuses silu_and_mul into the gate+up GEMM (`gate_up_silu`): one launch, no h buffer, the unfused
pipeline's bits.
"""

from __future__ import annotations

import torch

from kernels._details.grouped_gemm_kernels import grouped_gemm_nt_kernel, masked_gemm_nt_skinny_kernel
from kernels._details.launch import Launcher, cdiv
from kernels._device import interpreting
from kernels.dispatch import Dispatch, Layout
from kernels.gemm.base import GroupedGemm

_GROUPED_GEMM = Launcher(grouped_gemm_nt_kernel)
_SKINNY = Launcher(masked_gemm_nt_skinny_kernel)

# The skinny kernel serves masked blocks whose fullest expert is expected to hold at most SKINNY_MAX_ROWS rows
# (`Dispatch.rows_hint`), in tiles of SKINNY_TILE_ROWS[0] rows while that expert fits one such tile, else of
# SKINNY_TILE_ROWS[1]: each tile size where it beat the other against DeepGEMM's GEMMs + silu, and no skinny kernel
# from ~60 rows up, where it was slower than DeepGEMM (docs/design.md, "Decode-sized masked blocks run on a skinny
# Triton GEMM").
SKINNY_MAX_ROWS = 40
SKINNY_TILE_ROWS = (16, 32)
# Splits per (column tile, expert) when the counts stay on the device (decode): the estimate is a hint, and skewed
# routing puts many more rows on a hot expert, which more splits sweep side by side; a split with no rows leaves at
# once. Graphed, skewed Qwen3-like M = 256 (68 rows on the hottest expert): 0.89x DeepGEMM with four 32-row splits,
# 1.05x with two; at uniform routing four and two are within 1%.
SKINNY_SPLITS_UNSEEN = 4


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

    @staticmethod
    def runs_skinny(dispatch: Dispatch) -> bool:
        """True when this Dispatch's GEMMs run on the skinny kernel: a masked block with few rows per expert."""
        return dispatch.layout is Layout.MASKED and dispatch.rows_hint <= SKINNY_MAX_ROWS

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

    def _skinny(self, a, b, d, dispatch, gate_up_order: str | None):
        """d = a · bᵀ on each expert's filled rows; with a gate_up_order, d = silu_and_mul of it (b is w13)."""
        n, k = d.shape[-1], a.shape[-1]
        small, large = SKINNY_TILE_ROWS
        block_m = small if dispatch.rows_hint <= small else large
        if interpreting():
            cfg = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64)
        else:
            cfg = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
        block_rows = dispatch.block_rows
        wanted = SKINNY_SPLITS_UNSEEN if dispatch.counts_host is None else cdiv(dispatch.rows_hint, block_m)
        m_splits = max(1, min(wanted, block_rows // block_m))
        _SKINNY[(cdiv(n, cfg["BLOCK_N"]) * m_splits, dispatch.num_local_experts)](
            a, b, d, dispatch.counts, n, k, block_rows, m_splits,
            SILU=gate_up_order is not None, GATE_FIRST=gate_up_order == "gate_up", CAST_FP32=interpreting(), **cfg,
        )
        return d

    def m_grouped_gemm_nt_contiguous(self, a, b, dispatch, empty):
        d = empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        return self._run(a, b, d, dispatch, masked=False)

    def m_grouped_gemm_nt_masked(self, a, b, dispatch, empty):
        d = empty((*a.shape[:2], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        if self.runs_skinny(dispatch):
            return self._skinny(a, b, d, dispatch, None)
        return self._run(a, b, d, dispatch, masked=True)

    def gate_up_silu(self, rows, w13, dispatch, gate_up_order, empty):
        if not self.runs_skinny(dispatch):
            return None
        a = empty((*rows.shape[:2], w13.shape[1] // 2), dtype=torch.bfloat16, device=rows.device)
        return self._skinny(rows, w13, a, dispatch, gate_up_order)


BACKEND = TritonGroupedGemm()
