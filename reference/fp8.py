"""FP8 block scaling as the golden model does it, and the fp8 expert stage's reference.

The recipe (DeepGEMM's and DeepEP's, SM90 and SM100): values in float8 e4m3fn (max 448, 3 mantissa bits, no inf),
each group of GROUP consecutive values of an activation row (1 x 128) and each GROUP x GROUP block of a weight
matrix sharing one scale:
    amax  = max |v| over the group, at least AMAX_FLOOR (an all-zero group gets a finite scale, never 0 or NaN)
    scale = amax / 448 in fp32 ("fp32"), or that rounded UP to a power of two ("ue8m0": an 8-bit exponent, SM100)
    q     = e4m3(v * (1 / scale)), the product in fp32, rounded to nearest even, saturated at +-448
    v    ~= q * scale
A last group shorter than GROUP (K not a multiple of 128) is a group of its own. The rounding to e4m3 is written
here from its definition (float64 arithmetic on the exponent), sharing nothing with kernels/ nor with torch's cast.

The stage (`moe_reference_fp8`), for one token t routed to local expert e, with x, w13, w2 as the recipe gives them
(x either bf16, quantized here per token, or already fp8 with its scales, as DeepEP's dispatch hands it over):
    h = dq(w13[e]) . dq(x_t)                 exactly accumulated, stored bf16 (the fp8 GEMM's output)
    a = silu(gate) * up in fp32, quantized per token and 1 x 128 group (the fused silu + quantization)
    y = dq(w2[e]) . dq(a)                     exactly accumulated, stored bf16
    out[t] += topk_weights[t, k] * y          as the bf16 stage's gather: fp32 sum in slot order, stored bf16
"exact" is float64 from the dequantized inputs on, with a not quantized and nothing rounded; "faithful" follows the
quantization and rounding points above. Both return float32 [M, H].
"""

from __future__ import annotations

import torch

from reference import stages
from reference.layouts import local_expert_ids
from reference.moe import _Slots, _validate
from reference.rounding import rounding_profile

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MANTISSA_BITS = 3
GROUP = 128
AMAX_FLOOR = 1e-4  # DeepGEMM's per_token_cast_to_fp8 / per_block_cast_to_fp8 clamp
SCALES = ("fp32", "ue8m0")
_STAGE_ROUNDING = rounding_profile("a=fp32")  # silu fused, a kept in fp32 until it is quantized


def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """The float8 e4m3fn value nearest to v (ties to even), saturated at +-448; float64 in, float64 out. NaN stays
    NaN. Normal values (|v| >= 2^-6) keep 3 mantissa bits; below, the subnormal step 2^-9."""
    v = v.double()
    magnitude = v.abs()
    _, exponent = torch.frexp(magnitude)  # magnitude = m 2^exponent, 0.5 <= m < 1
    step = torch.where(magnitude >= E4M3_MIN_NORMAL, torch.ldexp(torch.ones_like(v), exponent - 1 - E4M3_MANTISSA_BITS),
                       2.0 ** (-6 - E4M3_MANTISSA_BITS))
    rounded = torch.round(magnitude / step) * step  # torch.round: half to even; the quotient is exact (a power of 2)
    return torch.copysign(rounded.clamp(max=E4M3_MAX), v)


def group_scales(amax: torch.Tensor, scale: str) -> torch.Tensor:
    """fp32 scales of groups whose max |value| is `amax` (float32): amax / 448, or that rounded up to a power of 2."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    s = amax.float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    if scale == "ue8m0":
        mantissa, exponent = torch.frexp(s)  # s = m 2^e, 0.5 <= m < 1: the next power of two is 2^e, or s itself
        s = torch.ldexp(torch.ones_like(s), torch.where(mantissa == 0.5, exponent - 1, exponent))
    return s


def _groups(n: int) -> int:
    return -(-n // GROUP)


def quantize_per_token(x: torch.Tensor, scale: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K], the e4m3 values as float64; scales fp32 [M, ceil(K / 128)]): one scale per token and
    group of 128 columns."""
    rows, cols = x.shape
    padded = torch.zeros(rows, _groups(cols) * GROUP, dtype=torch.float32, device=x.device)
    padded[:, :cols] = x.float()
    grouped = padded.view(rows, -1, GROUP)
    s = group_scales(grouped.abs().amax(dim=-1), scale)
    q = round_e4m3(grouped * (1.0 / s)[..., None])  # the product in fp32, as the recipe computes it
    return q.view(rows, -1)[:, :cols], s


def quantize_per_block(w: torch.Tensor, scale: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] -> (q [E, N, K] as float64; scales fp32 [E, ceil(N / 128), ceil(K / 128)]): one scale per
    128 x 128 block."""
    experts, n, k = w.shape
    bn, bk = _groups(n), _groups(k)
    padded = torch.zeros(experts, bn * GROUP, bk * GROUP, dtype=torch.float32, device=w.device)
    padded[:, :n, :k] = w.float()
    blocks = padded.view(experts, bn, GROUP, bk, GROUP)
    s = group_scales(blocks.abs().amax(dim=(2, 4)), scale)
    q = round_e4m3(blocks * (1.0 / s)[:, :, None, :, None])
    return q.view(experts, bn * GROUP, bk * GROUP)[:, :n, :k], s


def dequantize_per_token(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 [M, K] values of per-token-group fp8 `q` (any float dtype) with scales `s` [M, ceil(K / 128)]."""
    return q.double() * s.double().repeat_interleave(GROUP, dim=1)[:, : q.shape[1]]


def dequantize_per_block(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 [E, N, K] values of per-block fp8 `q` with scales `s` [E, ceil(N / 128), ceil(K / 128)]."""
    n, k = q.shape[1:]
    expanded = s.double().repeat_interleave(GROUP, dim=1).repeat_interleave(GROUP, dim=2)
    return q.double() * expanded[:, :n, :k]


def moe_reference_fp8(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_scales: torch.Tensor,
    w2: torch.Tensor,
    w2_scales: torch.Tensor,
    *,
    x_scales: torch.Tensor | None = None,
    ep_size: int = 1,
    ep_rank: int = 0,
    num_experts: int | None = None,
    gate_up_order: str = "gate_up",
    mode: str = "exact",
    scale: str = "fp32",
) -> torch.Tensor:
    """Reference output (float32 [M, H]) of rank `ep_rank`'s fp8 expert stage; see the module docstring.

    x bf16 [M, H] (quantized here per token, `scale` recipe) or float8_e4m3fn [M, H] with `x_scales` fp32
    [M, ceil(H / 128)]; w13 float8_e4m3fn [E_local, 2I, H] with w13_scales [E_local, ceil(2I / 128), ceil(H / 128)];
    w2 float8_e4m3fn [E_local, H, I] with w2_scales [E_local, ceil(H / 128), ceil(I / 128)]. `scale` is also the
    recipe of a's quantization."""
    num_experts = _validate(x, topk_ids, topk_weights, w13, w2, ep_size, ep_rank, num_experts, gate_up_order, mode,
                            x_dtypes=(torch.bfloat16,) if x_scales is None else (torch.float8_e4m3fn,),
                            weight_dtypes=(torch.float8_e4m3fn,))
    _check_scales("w13", w13, w13_scales)
    _check_scales("w2", w2, w2_scales)
    if x_scales is None:
        x_values = dequantize_per_token(*quantize_per_token(x, scale))
    else:
        _check_scales("x", x, x_scales)
        x_values = dequantize_per_token(x, x_scales)
    faithful = mode == "faithful"
    local_ids = local_expert_ids(topk_ids, ep_size, ep_rank, num_experts)
    w13_values, w2_values = dequantize_per_block(w13, w13_scales), dequantize_per_block(w2, w2_scales)
    slots = _Slots(x_values, local_ids, w13_values)
    h = slots.gate_up(w13_values, faithful, "bf16")
    a = stages.silu_and_mul(h, gate_up_order, faithful=faithful, rounding=_STAGE_ROUNDING)
    if faithful:
        a = dequantize_per_token(*quantize_per_token(a.float(), scale))
    y = slots.down(a, w2_values, faithful, "bf16")
    return stages.weighted_sum(slots.per_slot(y), topk_weights, local_ids, faithful=faithful)


def _check_scales(name: str, values: torch.Tensor, scales: torch.Tensor) -> None:
    """`scales` as `values` (a checked fp8 tensor) needs them: float32, one per group or block, finite, positive."""
    want = (*values.shape[:-2], _groups(values.shape[-2]), _groups(values.shape[-1])) if values.dim() == 3 else (
        values.shape[0], _groups(values.shape[1]))
    if scales.dtype != torch.float32 or tuple(scales.shape) != want:
        raise ValueError(f"{name}'s scales must be float32 {want}, got {scales.dtype} {tuple(scales.shape)}")
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise ValueError(f"{name}'s scales must be finite and positive")
