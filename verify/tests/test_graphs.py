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
