"""@triton.jit grouped GEMM D = A · Bᵀ over expert segments (launcher: kernels/gemm/triton.py).

One program computes a BLOCK_M x BLOCK_N tile of D with an fp32 accumulator. Segments (contiguous) and blocks
(masked) are multiples of BLOCK_M rows, so a tile never straddles two experts:
- contiguous: the tile's expert is m_indices[first row]; a tile whose first row is padding (-1) does nothing;
- masked: the tile's expert is its block; a tile starting at or beyond masked_m[e] does nothing.
Under the interpreter (CAST_FP32) operands are cast to fp32 before tl.dot: bf16 dots are wrong there.
"""

import triton
import triton.language as tl

from kernels._details.common import to_bf16


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
            if CAST_FP32:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_tile += BLOCK_K
            b_tile += BLOCK_K
        tl.store(d_ptr + rows[:, None] * n + cols[None, :], to_bf16(acc),
                 mask=(rows[:, None] < num_rows) & (cols[None, :] < n))
