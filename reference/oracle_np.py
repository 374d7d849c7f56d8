"""An independent NumPy oracle of the whole expert stage, used to check `reference.moe_reference` itself.

Written on purpose in another style than moe.py: NumPy instead of torch, one token and one slot at a time, its own
local-id rule and its own bf16 rounding (bit manipulation, round to nearest even). A bug shared by both would have
to be made twice, in two different ways.
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
