"""kernels.GraphedExpertStage: the stage captured once in a CUDA graph and replayed with OTHER batches of the same shape
(new x, ids, weights, so new counts), each bit for bit the eager call on that batch, over the catalogue's GPU shapes
at decode sizes; a capture that would read the device fails clearly instead of hanging."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import GraphedExpertStage, moe_expert_forward
from verify import checks
from verify.cases import CASES, random_problem

pytestmark = pytest.mark.gpu
DECODE_TOKENS = 256  # at most: an M-row block per expert must fit the masked budget


def _decode_sizes(case):
    sizes = case.sizes("gpu")
    return dataclasses.replace(sizes, num_tokens=min(sizes.num_tokens, DECODE_TOKENS))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_captured_stage_replays_other_batches_bit_for_bit(case, seed):
    sizes = _decode_sizes(case)
    ep_size = case.sweep_ep_sizes("gpu")[-1]
    rank = ep_size - 1
    batches = [random_problem(sizes, case.routing, seed + i, "cuda", **dict(case.routing_params)) for i in range(4)]
    w13, w2 = batches[0].rank_weights(ep_size, rank)
    kw = dict(ep_size=ep_size, ep_rank=rank, num_experts=sizes.num_experts)

    def inputs(p):  # the raw view: every token of the batch, other ranks' ids left in (M stays fixed)
        return p.x, p.routing.topk_ids, p.routing.topk_weights

    stage = GraphedExpertStage(*inputs(batches[0]), w13, w2, **kw)
    for i, batch in enumerate(batches[1:], start=1):
        graphed = stage(*inputs(batch)).clone()
        eager = moe_expert_forward(*inputs(batch), w13, w2, sync="never", **kw)
        assert checks.bitwise_equal(graphed, eager), f"batch {i}: replay != eager"
        synced = moe_expert_forward(*inputs(batch), w13, w2, sync="after", **kw)
        assert checks.bitwise_equal(synced, eager), f"batch {i}: sync='after' != sync='never'"


def test_a_stage_captured_with_host_counts_replays_them(seed):
    """host_counts (DeepEP's counts) captured: their copy to the device repeats at every replay, from memory that
    outlives the capture; replays of other batches with the same counts match the eager call bit for bit."""
    case = CASES[0]
    batches = [random_problem(_decode_sizes(case), case.routing, seed + i, "cuda", **dict(case.routing_params))
               for i in range(3)]
    for batch in batches:  # the same ids, new x and router weights: the counts stay those captured
        batch.routing.topk_ids.copy_(batches[0].routing.topk_ids)
    ids = batches[0].routing.topk_ids
    counts = torch.bincount(ids[ids >= 0].flatten(), minlength=batches[0].w13.shape[0]).tolist()
    args = lambda p: (p.x, p.routing.topk_ids, p.routing.topk_weights)  # noqa: E731
    stage = GraphedExpertStage(*args(batches[0]), batches[0].w13, batches[0].w2, host_counts=counts)
    torch.empty(1 << 20, dtype=torch.int32).pin_memory()  # pinned memory reused, were the captured source freed
    for i, batch in enumerate(batches[1:], start=1):
        graphed = stage(*args(batch)).clone()
        eager = moe_expert_forward(*args(batch), batches[0].w13, batches[0].w2, sync="never", host_counts=counts)
        assert checks.bitwise_equal(graphed, eager), f"batch {i}: replay != eager"


def test_stages_sharing_a_memory_pool_replay_in_any_order_each_exact(seed):
    """Two stages of different M on one pool (as a serving engine captures its batch sizes): replayed alternately,
    each matches the eager call on its batch bit for bit, and one's replay leaves the other's output as it was."""
    case = CASES[0]
    sizes = _decode_sizes(case)
    small = dataclasses.replace(sizes, num_tokens=max(1, sizes.num_tokens // 2))
    problems = [random_problem(s, case.routing, seed + i, "cuda", **dict(case.routing_params))
                for i, s in enumerate((sizes, small))]
    w13, w2 = problems[0].w13, problems[0].w2
    args = lambda p: (p.x, p.routing.topk_ids, p.routing.topk_weights)  # noqa: E731
    pool = torch.cuda.graph_pool_handle()
    stages = [GraphedExpertStage(*args(p), w13, w2, pool=pool) for p in problems]
    eager = [moe_expert_forward(*args(p), w13, w2, sync="never") for p in problems]
    for order in ((0, 1), (1, 0), (0, 1)):
        outs = [stages[i](*args(problems[i])) for i in order]
        for i, out in zip(order, outs, strict=True):
            assert checks.bitwise_equal(out, eager[i]), f"stage {i} after replaying {order}"


@pytest.mark.parametrize("with_counts", [False, True], ids=["decode", "host_counts"])
def test_a_replay_of_bad_ids_writes_nothing_out_of_bounds_and_the_next_batch_is_exact(with_counts, seed):
    """The graph's promise for ids it cannot check (kernels/graphs.py): out-of-range ids, ids repeated in a row past
    an M-row block, ids that contradict the captured host_counts are skipped, never written out of bounds (the
    synchronize would raise an illegal memory access), and the stage stays sound for the next good batch."""
    case = CASES[0]
    good, other = (random_problem(_decode_sizes(case), case.routing, seed + i, "cuda", **dict(case.routing_params))
                   for i in range(2))
    ids = good.routing.topk_ids
    num_local, num_experts = good.w13.shape[0], good.sizes.num_experts
    counts = torch.bincount(ids[ids >= 0].flatten(), minlength=num_local).tolist()
    extra = dict(host_counts=counts) if with_counts else {}
    args = lambda p: (p.x, p.routing.topk_ids, p.routing.topk_weights)  # noqa: E731
    stage = GraphedExpertStage(*args(good), good.w13, good.w2, **extra)
    bad = torch.randint(-3 * num_experts, 3 * num_experts, ids.shape, device="cuda", dtype=ids.dtype)
    bad[: ids.shape[0] // 2] = 0  # half the rows all expert 0: past its block and its captured count
    stage(other.x, bad, other.routing.topk_weights)
    torch.cuda.synchronize()
    other.routing.topk_ids.copy_(ids)  # the captured counts hold again
    graphed = stage(*args(other)).clone()
    eager = moe_expert_forward(*args(other), good.w13, good.w2, sync="never", **extra)
    assert checks.bitwise_equal(graphed, eager)


@pytest.mark.parametrize("sync", ["before", "after"])
def test_a_capture_that_would_read_the_device_fails_clearly(sync):
    p = random_problem(_decode_sizes(CASES[0]), "uniform", 0, "cuda")
    args = (p.x, p.routing.topk_ids, p.routing.topk_weights, p.w13, p.w2)
    moe_expert_forward(*args, sync="never")  # compiled outside the capture
    with pytest.raises(ValueError, match="sync"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            moe_expert_forward(*args, sync=sync)
    with pytest.raises(ValueError, match="sync"):
        GraphedExpertStage(*args, sync=sync)
