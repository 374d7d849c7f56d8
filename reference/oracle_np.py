"""Independent NumPy oracles of the whole expert stage, used to check `reference.moe_reference` (bf16) and
`reference.fp8.moe_reference_fp8` (fp8 block-scaled) themselves.

Written on purpose in another style than moe.py and fp8.py: NumPy instead of torch, one token and one slot at a time,
its own local-id rule, its own bf16 rounding (bit manipulation, round to nearest even) and its own e4m3 rounding (the
nearest value of a table decoded from the format). A bug shared by both would have to be made twice, in two ways.
"""

from __future__ import annotations

import numpy as np
import torch

from reference.rounding import Rounding, rounding_profile


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bf16 value (ties to even), returned as float32. NaN/Inf are not expected here."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def moe_oracle(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    ep_size: int = 1,
    ep_rank: int = 0,
    num_experts: int | None = None,
    gate_up_order: str = "gate_up",
    mode: str = "exact",
    rounding: Rounding | str = "production",
) -> np.ndarray:
    """Same contract as reference.moe_reference, returns a float64 ndarray [M, H]; slow (a Python loop per slot).
    Only the profile's field values come from reference/rounding.py; what each one means is written out here again."""
    profile = rounding_profile(rounding)
    xs = x.float().cpu().numpy().astype(np.float64)
    ids = topk_ids.cpu().numpy()
    weights = topk_weights.cpu().numpy().astype(np.float32)
    gate_up = w13.float().cpu().numpy().astype(np.float64)
    down = w2.float().cpu().numpy().astype(np.float64)
    num_local_experts = gate_up.shape[0]
    inter = gate_up.shape[1] // 2
    first_expert = ep_rank * num_local_experts
    faithful = mode == "faithful"

    out = np.zeros((xs.shape[0], xs.shape[1]), dtype=np.float64)
    for t in range(xs.shape[0]):
        terms = []  # (local expert, slot, this slot's weighted output)
        for k in range(ids.shape[1]):
            global_id = int(ids[t, k])
            if global_id < first_expert or global_id >= first_expert + num_local_experts:
                continue  # -1, or an expert of another rank
            e = global_id - first_expert
            h = gate_up[e] @ xs[t]
            if faithful:  # the fp32 accumulator, stored bf16 or kept
                h = h.astype(np.float32)
                h = round_to_bf16(h) if profile.h == "bf16" else h
            gate, up = (h[:inter], h[inter:]) if gate_up_order == "gate_up" else (h[inter:], h[:inter])
            if not faithful:
                terms.append((e, k, float(weights[t, k]) * (down[e] @ (gate / (1.0 + np.exp(-gate)) * up))))
                continue
            gate32, up32 = gate.astype(np.float32), up.astype(np.float32)
            if profile.silu == "logistic":  # JAX's bf16 silu: gate * logistic(gate), each product rounded
                logistic = round_to_bf16(np.float32(1.0) / (np.float32(1.0) + np.exp(-gate32)))
                silu = round_to_bf16(gate32 * logistic)
            else:
                silu = gate32 / (np.float32(1.0) + np.exp(-gate32))
                if profile.silu == "bf16":  # `act_fn(gate) * up` on bf16 tensors: two roundings
                    silu = round_to_bf16(silu)
            act = silu * up32
            act = (round_to_bf16(act) if profile.a == "bf16" else act).astype(np.float64)
            y = (down[e] @ act).astype(np.float32)  # the down GEMM's fp32 accumulator
            if profile.y == "bf16":
                y = round_to_bf16(y)
            weight = weights[t, k] if profile.weights == "fp32" else round_to_bf16(weights[t, k])
            term = np.float32(weight) * y
            if profile.slot == "bf16":
                term = round_to_bf16(term)
            terms.append((e, k, term))
        if profile.order == "expert":
            terms.sort(key=lambda term: (term[0], term[1]))
        acc = np.zeros(xs.shape[1], dtype=np.float32 if faithful else np.float64)
        for _, _, term in terms:
            acc = acc + term
            if faithful:
                acc = round_to_bf16(acc) if profile.accumulator == "bf16" else acc.astype(np.float32)
        out[t] = round_to_bf16(acc) if faithful else acc
    return out


# ---- the fp8 stage (reference/fp8.py) --------------------------------------------------------------------------------

def _e4m3_table() -> tuple[np.ndarray, np.ndarray]:
    """Every non-negative finite float8 e4m3fn value, ascending, and its 7-bit code: decoded from the format itself
    (4 exponent bits with bias 7, 3 mantissa bits, exponent 0 subnormal, 0x7F NaN)."""
    codes = np.arange(0x7F)
    exponent, mantissa = codes >> 3, codes & 7
    values = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7.0))
    return values, codes


def round_to_e4m3(values: np.ndarray) -> np.ndarray:
    """float64 -> the nearest e4m3fn value (ties to the even code), saturated at the largest, as float64."""
    table, codes = _e4m3_table()
    magnitude = np.minimum(np.abs(values), table[-1])
    above = np.clip(np.searchsorted(table, magnitude), 1, len(table) - 1)
    low, high = table[above - 1], table[above]
    take_high = (high - magnitude < magnitude - low) | ((high - magnitude == magnitude - low) & (codes[above] % 2 == 0))
    return np.copysign(np.where(take_high, high, low), values)


def _scale(amax: float, scale: str) -> np.float32:
    s = np.float32(max(np.float32(amax), np.float32(1e-4))) / np.float32(448.0)
    return np.float32(2.0 ** np.ceil(np.log2(np.float64(s)))) if scale == "ue8m0" else s


def _quantized_row(row: np.ndarray, scale: str) -> np.ndarray:
    """One activation row quantized per 128 columns and dequantized again (float64)."""
    out = np.empty(row.shape[0], dtype=np.float64)
    for start in range(0, row.shape[0], 128):
        group = row[start:start + 128].astype(np.float32)
        s = _scale(np.abs(group).max(), scale)
        out[start:start + 128] = round_to_e4m3((group * (np.float32(1.0) / s)).astype(np.float64)) * np.float64(s)
    return out


def moe_oracle_fp8(x, topk_ids, topk_weights, w13, w13_scales, w2, w2_scales, *, x_scales=None, ep_size: int = 1,
                   ep_rank: int = 0, gate_up_order: str = "gate_up", mode: str = "exact",
                   scale: str = "fp32") -> np.ndarray:
    """Same contract as reference.fp8.moe_reference_fp8, float64 ndarray [M, H], one token and slot at a time."""
    def block_values(q, s):  # element (e, n, k) times the scale of its 128 x 128 block
        q = q.float().cpu().numpy().astype(np.float64)
        n, k = np.arange(q.shape[1]) // 128, np.arange(q.shape[2]) // 128
        return q * s.cpu().numpy().astype(np.float64)[:, n[:, None], k[None, :]]

    gate_up, down = block_values(w13, w13_scales), block_values(w2, w2_scales)
    if x_scales is None:
        xs = np.stack([_quantized_row(row, scale) for row in x.float().cpu().numpy()])
    else:
        xs = x.float().cpu().numpy().astype(np.float64) * np.repeat(x_scales.cpu().numpy().astype(np.float64), 128,
                                                                      axis=1)[:, :x.shape[1]]
    ids, weights = topk_ids.cpu().numpy(), topk_weights.cpu().numpy().astype(np.float32)
    num_local_experts, inter = gate_up.shape[0], gate_up.shape[1] // 2
    first_expert, faithful = ep_rank * num_local_experts, mode == "faithful"
    out = np.zeros(xs.shape, dtype=np.float64)
    for t in range(xs.shape[0]):
        acc = np.zeros(xs.shape[1], dtype=np.float32 if faithful else np.float64)
        for k in range(ids.shape[1]):
            e = int(ids[t, k]) - first_expert
            if not 0 <= e < num_local_experts or int(ids[t, k]) < 0:
                continue
            h = gate_up[e] @ xs[t]
            if faithful:
                h = round_to_bf16(h.astype(np.float32)).astype(np.float64)
            gate, up = (h[:inter], h[inter:]) if gate_up_order == "gate_up" else (h[inter:], h[:inter])
            if faithful:
                gate32 = gate.astype(np.float32)
                act = _quantized_row(gate32 / (np.float32(1.0) + np.exp(-gate32)) * up.astype(np.float32), scale)
                y = round_to_bf16((down[e] @ act).astype(np.float32))
                acc = (acc + np.float32(weights[t, k]) * y).astype(np.float32)
            else:
                acc = acc + float(weights[t, k]) * (down[e] @ (gate / (1.0 + np.exp(-gate)) * up))
        out[t] = round_to_bf16(acc) if faithful else acc
    return out
