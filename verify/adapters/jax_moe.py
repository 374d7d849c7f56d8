"""The expert stage in JAX: `--impl verify.adapters.jax_moe:ragged` and `:masked` (and `:ragged_ignores_router_weight`,
a hand-broken twin that the tester must fail).

They take and return JAX arrays, with the contract's keyword arguments (docs/contract.md, "Entry points"); the
tester recognises them as JAX and moves tensors in and out through DLPack (verify/impls.py). Both follow the
production rounding points (bf16 GEMM outputs from fp32 accumulation, a fused silu(gate) * up rounded once, an fp32
sum over slots in slot order), so `--rounding auto` finds `production`.

- ragged: the token slots sorted by local expert (remote and -1 slots last), both GEMMs as one
  `jax.lax.ragged_dot_general` each over the sorted rows, un-sorted, weighted and summed per token.
- masked: the slots scattered into a [E_local, capacity, H] block (capacity: the largest count, read back once and
  rounded up to a power of two), both GEMMs as batched `dot_general`s over the block, gathered back.
Both are jit-compiled; M is padded to a power of two (rows of -1 ids) so that batches of similar size share one
compilation, as serving engines pad decode batches.
"""

from __future__ import annotations

import functools
import os

# JAX takes 75% of a GPU's memory at its first use unless told otherwise; torch shares this process and this GPU
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# XLA may skip a rounding to bf16 inside a fusion unless told otherwise (xla_allow_excess_precision defaults to true):
# on an H200 the ragged form at M = 1 then kept h in fp32 into silu_and_mul, matching no rounding profile (1.16u from
# production, 0.74u from the exact reference). The stage's rounding points are its contract: keep every one.
os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), "--xla_allow_excess_precision=false")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

_RAGGED = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
                                            rhs_group_dimensions=[0])


def _bucket(n: int, smallest: int = 64) -> int:
    return max(smallest, 1 << (max(n, 1) - 1).bit_length())


def _local_ids(topk_ids, ep_rank, num_local_experts):
    local = topk_ids - ep_rank * num_local_experts
    return jnp.where((topk_ids >= 0) & (local >= 0) & (local < num_local_experts), local, -1)


def _silu_and_mul(h, gate_up_order: str):
    """bf16 [..., 2I] -> bf16 [..., I]: silu(gate) * up in fp32, rounded once."""
    first, second = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    gate, up = (first, second) if gate_up_order == "gate_up" else (second, first)
    return (jax.nn.silu(gate) * up).astype(jnp.bfloat16)


def _combine(y_slots, topk_weights, local):
    """y_slots bf16 [M, k, H] -> bf16 [M, H]: weight * y summed in fp32 over the local slots, in slot order."""
    acc = jnp.zeros((y_slots.shape[0], y_slots.shape[2]), jnp.float32)
    for k in range(y_slots.shape[1]):
        term = topk_weights[:, k, None] * y_slots[:, k].astype(jnp.float32)
        acc = jnp.where(local[:, k, None] >= 0, acc + term, acc)
    return acc.astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("gate_up_order", "use_weights"))
def _ragged(x, topk_ids, topk_weights, w13, w2, ep_rank, *, gate_up_order: str, use_weights: bool = True):
    num_tokens, topk = topk_ids.shape
    num_local_experts = w13.shape[0]
    local = _local_ids(topk_ids, ep_rank, num_local_experts)
    flat = jnp.where(local >= 0, local, num_local_experts).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_local_experts + 1)[:num_local_experts].astype(jnp.int32)
    rows = x[order // topk]
    h = jax.lax.ragged_dot_general(rows, w13, group_sizes, _RAGGED, preferred_element_type=jnp.float32)
    a = _silu_and_mul(h.astype(jnp.bfloat16), gate_up_order)
    y = jax.lax.ragged_dot_general(a, w2, group_sizes, _RAGGED, preferred_element_type=jnp.float32)
    y_slots = jnp.zeros_like(y, dtype=jnp.bfloat16).at[order].set(y.astype(jnp.bfloat16))
    weights = topk_weights if use_weights else jnp.ones_like(topk_weights)
    return _combine(y_slots.reshape(num_tokens, topk, -1), weights, local)


@functools.partial(jax.jit, static_argnames=("gate_up_order", "capacity"))
def _masked(x, topk_ids, topk_weights, w13, w2, ep_rank, *, gate_up_order: str, capacity: int):
    num_tokens, topk = topk_ids.shape
    num_local_experts = w13.shape[0]
    local = _local_ids(topk_ids, ep_rank, num_local_experts)
    flat = local.reshape(-1)
    onehot = (flat[:, None] == jnp.arange(num_local_experts)[None, :]).astype(jnp.int32)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)  # the slot's row in its block
    expert = jnp.where(flat >= 0, flat, num_local_experts)  # out of range: dropped by the scatter
    block = jnp.zeros((num_local_experts, capacity, x.shape[1]), x.dtype)
    block = block.at[expert, position].set(x[jnp.arange(flat.shape[0]) // topk], mode="drop")
    h = jnp.einsum("ech,eih->eci", block, w13, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    a = _silu_and_mul(h, gate_up_order)
    y = jnp.einsum("eci,ehi->ech", a, w2, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    y_slots = y[jnp.minimum(expert, num_local_experts - 1), position]
    return _combine(y_slots.reshape(num_tokens, topk, -1), topk_weights, local)


def _padded(x, topk_ids, topk_weights):
    """The batch padded to a power-of-two number of rows with -1 ids (weight 0)."""
    extra = _bucket(x.shape[0]) - x.shape[0]
    return (jnp.pad(x, ((0, extra), (0, 0))), jnp.pad(topk_ids, ((0, extra), (0, 0)), constant_values=-1),
            jnp.pad(topk_weights, ((0, extra), (0, 0))))


def ragged(x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None, gate_up_order="gate_up"):
    """The expert stage through jax.lax.ragged_dot_general over tokens sorted by expert."""
    out = _ragged(*_padded(x, topk_ids, topk_weights), w13, w2, jnp.int32(ep_rank), gate_up_order=gate_up_order)
    return out[: x.shape[0]]


def ragged_ignores_router_weight(x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None,
                                 gate_up_order="gate_up"):
    """`ragged` with a bug: every local slot weighs 1 (the router weight is never applied)."""
    out = _ragged(*_padded(x, topk_ids, topk_weights), w13, w2, jnp.int32(ep_rank), gate_up_order=gate_up_order,
                  use_weights=False)
    return out[: x.shape[0]]


def masked(x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None, gate_up_order="gate_up"):
    """The expert stage through batched dot_generals over a [E_local, capacity, H] block."""
    num_local_experts = w13.shape[0]
    local = _local_ids(topk_ids, ep_rank, num_local_experts)
    counts = jnp.bincount(jnp.where(local >= 0, local, num_local_experts).reshape(-1), length=num_local_experts + 1)
    capacity = _bucket(int(counts[:num_local_experts].max()))  # the one read-back: the block's static size
    out = _masked(*_padded(x, topk_ids, topk_weights), w13, w2, jnp.int32(ep_rank), gate_up_order=gate_up_order,
                  capacity=capacity)
    return out[: x.shape[0]]
