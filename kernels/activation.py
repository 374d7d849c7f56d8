"""silu_and_mul stage: a = silu(gate) * up on the valid rows of a Dispatch's gate+up GEMM output.

Only valid rows are computed and written: padding rows of the contiguous layout (m_indices == -1) and rows at or
beyond masked_m[e] of the masked layout are not touched (their contents are unspecified, and stay so).
fp32 math from the bf16 inputs, bf16 output. gate_up_order="gate_up": columns [0, I) are the gate (HF/vLLM);
"up_gate": columns [I, 2I) are (rtp-llm).
"""

from __future__ import annotations

import torch

from kernels._details import stage_kernels as K
from kernels._details.launch import Launcher, cdiv, next_power_of_2
from kernels._device import interpreting
from kernels.dispatch import Allocator, Dispatch, Layout

GATE_UP_ORDERS = ("gate_up", "up_gate")
_SILU_AND_MUL = Launcher(K.silu_and_mul_kernel)


def silu_and_mul(
    h: torch.Tensor, dispatch: Dispatch, *, gate_up_order: str = "gate_up", empty: Allocator = torch.empty
) -> torch.Tensor:
    """h: bf16 [rows, 2I] (contiguous) or [E_local, block_rows, 2I] (masked) -> a, same leading dims, [..., I]."""
    if gate_up_order not in GATE_UP_ORDERS:
        raise ValueError(f"gate_up_order must be one of {GATE_UP_ORDERS}, got {gate_up_order!r}")
    expected = (*dispatch.rows.shape[:-1], h.shape[-1])
    if h.dtype != torch.bfloat16 or tuple(h.shape) != expected or not h.is_contiguous():
        raise ValueError(f"h must be a contiguous bf16 tensor of shape {expected}, got {h.dtype} {tuple(h.shape)}")
    if h.shape[-1] % 2:
        raise ValueError(f"h's last dimension must be 2*I (even), got {h.shape[-1]}")
    inter = h.shape[-1] // 2
    a = empty((*h.shape[:-1], inter), dtype=torch.bfloat16, device=h.device)
    num_rows = h.numel() // h.shape[-1]  # the layout's rows (h's leading dims are the Dispatch's, checked above)
    masked = dispatch.layout is Layout.MASKED
    cfg = _config(dispatch, inter)
    grid = (cdiv(num_rows, cfg["BLOCK_R"]), cdiv(inter, cfg["BLOCK_I"]))
    _SILU_AND_MUL[grid](
        h, a, dispatch.layout_index, num_rows, inter,
        dispatch.block_rows if masked else 1,
        MASKED=masked, GATE_FIRST=gate_up_order == "gate_up", **cfg,
    )
    return a


# More programs than this that only read masked_m and leave (a masked block mostly padding) cost the one-row form
# more than it saves: 7360 at DeepSeek-like M = 256 (blocks sized by the counts: one row as fast or faster), 47600 at
# gpt-oss-like M = 1024 (the decode path's M-row block: the whole graphed stage 6% slower with one row).
_MAX_IDLE_PROGRAMS = 16384


def _config(dispatch: Dispatch, inter: int) -> dict:
    """Rows x columns per program. On a GPU one row per program in two warps, except where a masked block's padding
    rows would give more than _MAX_IDLE_PROGRAMS programs that only read masked_m and leave (the decode path's M-row
    blocks, skewed blocks): there four rows per program (docs/design.md, "The stage kernels' shapes and launches")."""
    columns = min(next_power_of_2(inter), 1024)
    if interpreting():  # few, large programs: the interpreter pays per program and per op, not per element
        return dict(BLOCK_R=1024, BLOCK_I=columns)
    if dispatch.layout is Layout.MASKED:
        padding_rows = dispatch.num_local_experts * (dispatch.block_rows - dispatch.expected_m)
        if padding_rows * cdiv(inter, columns) > _MAX_IDLE_PROGRAMS:
            return dict(BLOCK_R=4, BLOCK_I=columns, num_warps=4)
    return dict(BLOCK_R=1, BLOCK_I=columns, num_warps=2)
