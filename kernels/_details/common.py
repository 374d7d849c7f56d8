"""@triton.jit helpers shared by the kernels."""

import triton
import triton.language as tl

from kernels._device import interpreting

# The Triton interpreter converts fp32 -> bf16 by truncation (round toward zero, even with
# fp_downcast_rounding="rtne"), where a GPU rounds to nearest even. Under the interpreter the kernels round by hand.
ROUND_BY_HAND = tl.constexpr(interpreting())


@triton.jit
def to_bf16(x):
    """fp32 -> bf16, round to nearest even, on the GPU and under the interpreter alike."""
    if ROUND_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def silu_mul(gate, up):
    """silu(gate) * up in fp32 (both fp32): the activation's one formula, unfused (stage_kernels) and fused into the
    gate+up GEMM's epilogue (grouped_gemm_kernels) alike, so the two give the same bits."""
    return gate / (1.0 + tl.exp(-gate)) * up
