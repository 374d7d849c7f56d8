"""@triton.jit grouped GEMMs D = A · Bᵀ over expert segments (launcher: kernels/gemm/triton.py).

`grouped_gemm_nt_kernel`, both layouts: one program computes a BLOCK_M x BLOCK_N tile of D with an fp32 accumulator.
Segments (contiguous) and blocks (masked) are multiples of BLOCK_M rows, so a tile never straddles two experts:
- contiguous: the tile's expert is m_indices[first row]; a tile whose first row is padding (-1) does nothing;
- masked: the tile's expert is its block; a tile starting at or beyond masked_m[e] does nothing.
`masked_gemm_nt_skinny_kernel`, the masked layout with few rows per expert (decode): m_splits programs per (column
tile, expert), side by side in launch order, sweep the expert's filled rows in BLOCK_M tiles (split s takes tiles s,
s + m_splits, ...), so the grid is set by the weights and the rows expected, not by the block's rows (most of which
are empty at decode), and the splits of a column tile may share its weights through L2 (kernels/gemm/triton.py sets
their number and BLOCK_M); a split with no rows leaves at once. With SILU it is the gate+up GEMM with silu_and_mul
in its epilogue: the gate and up tiles of the same columns are accumulated side by side, each rounded to bf16 (what
the unfused GEMM stores), and `silu_mul` of them stored: the unfused pipeline's bits, without h.
Under the interpreter (CAST_FP32) operands are cast to fp32 before tl.dot: bf16 dots are wrong there.
"""

import triton
import triton.language as tl

from kernels._details.common import silu_mul, to_bf16


@triton.jit
def _dot(a, b, acc, CAST_FP32: tl.constexpr):
    """acc + a @ b with an fp32 accumulator (under the interpreter, in fp32 throughout)."""
    if CAST_FP32:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def grouped_gemm_nt_kernel(
    a_ptr, b_ptr, d_ptr, layout_ptr,  # layout_ptr: m_indices (contiguous) or masked_m (masked)
    num_rows, n, k, block_rows,
    MASKED: tl.constexpr, CAST_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each column sweep, so B tiles are reused from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(num_rows, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    row0 = pid_m.to(tl.int64) * BLOCK_M
    if MASKED:
        expert = row0 // block_rows
        active = row0 - expert * block_rows < tl.load(layout_ptr + expert)
    else:
        expert = tl.load(layout_ptr + row0).to(tl.int64)
        active = expert >= 0
    if active:
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_tile = a_ptr + rows[:, None] * k + offs_k[None, :]
        b_tile = b_ptr + expert * n * k + cols[None, :].to(tl.int64) * k + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            k_ok = offs_k + k0 < k
            a = tl.load(a_tile, mask=(rows[:, None] < num_rows) & k_ok[None, :], other=0.0)
            b = tl.load(b_tile, mask=k_ok[:, None] & (cols[None, :] < n), other=0.0)
            acc = _dot(a, b, acc, CAST_FP32)
            a_tile += BLOCK_K
            b_tile += BLOCK_K
        tl.store(d_ptr + rows[:, None] * n + cols[None, :], to_bf16(acc),
                 mask=(rows[:, None] < num_rows) & (cols[None, :] < n))


@triton.jit
def masked_gemm_nt_skinny_kernel(
    a_ptr, b_ptr, d_ptr, masked_m_ptr,  # a [E, block_rows, K]; b [E, N, K] (SILU: [E, 2N, K]); d [E, block_rows, N]
    n, k, block_rows, m_splits,
    SILU: tl.constexpr, GATE_FIRST: tl.constexpr, CAST_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(1).to(tl.int64)
    count = tl.minimum(tl.load(masked_m_ptr + expert), block_rows)
    split = tl.program_id(0) % m_splits
    cols = (tl.program_id(0) // m_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    offs_k = tl.arange(0, BLOCK_K)
    b_row = expert * (2 * n if SILU else n) + cols[None, :]  # int64; with SILU a row of w13's first half
    first = b_ptr + b_row * k + offs_k[:, None]
    second = b_ptr + (b_row + n) * k + offs_k[:, None]  # with SILU: the same columns of the second half
    for m0 in range(split * BLOCK_M, count, m_splits * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < count
        flat = expert * block_rows + rows
        a_tile = a_ptr + flat[:, None] * k + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            k_ok = offs_k + k0 < k
            a = tl.load(a_tile + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_mask = k_ok[:, None] & col_ok[None, :]
            acc = _dot(a, tl.load(first + k0, mask=b_mask, other=0.0), acc, CAST_FP32)
            if SILU:
                acc2 = _dot(a, tl.load(second + k0, mask=b_mask, other=0.0), acc2, CAST_FP32)
        if SILU:
            h1 = to_bf16(acc).to(tl.float32)
            h2 = to_bf16(acc2).to(tl.float32)
            acc = silu_mul(h1, h2) if GATE_FIRST else silu_mul(h2, h1)
        tl.store(d_ptr + flat[:, None] * n + cols[None, :], to_bf16(acc), mask=row_ok[:, None] & col_ok[None, :])
