"""The expert stage captured in a CUDA graph for one M, replayed with new inputs: how serving engines run decode.

    stage = GraphedExpertStage(x, topk_ids, topk_weights, w13, w2, ep_size=8, ep_rank=r, num_experts=256)
    out = stage(x2, topk_ids2, topk_weights2)   # same shapes and dtypes; `out` is overwritten by the next call

The constructor copies the example inputs into buffers it owns, runs the stage once eagerly on a side stream (every
Triton kernel and DeepGEMM's JIT compile before the capture, as torch.cuda.graphs asks), then captures one call of
`moe_expert_forward(..., sync="never")` on those buffers. A call copies the new inputs into them and replays: no
Python, no allocation, no host sync. What capture costs (kernels/executor.py, docs/contract.md "Entry points"):
- the masked block is sized from M (`unsynced_block_rows`): every expert has M rows, whatever the counts;
- nothing is read back, so nothing raises: ids must lie in [-1, num_experts) and each row's ids must be distinct
  (a router's top-k); otherwise the offending slots are skipped (never written out of bounds), unreported. Check the
  ids upstream, or run the eager `sync="after"`, which raises;
- w13 and w2 are captured by address: update them in place, never rebind them;
- `pool=torch.cuda.graph_pool_handle()`, one handle for several stages (one per M, as serving engines capture), lets
  their intermediates share memory: the largest stage's, not the sum. Stages that share a pool must never replay at
  once (on two streams); each keeps its own inputs and output;
- the stage owns the input buffers its graph reads: keep the stage, not only `stage.graph`, for as long as you replay
  (a graph replayed after its stage was freed reads memory the allocator has reused or, after the next capture's
  `empty_cache`, given back: an illegal memory access).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from kernels.executor import moe_expert_forward

T = TypeVar("T")


def capture(fn: Callable[[], T], pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """fn called once on a side stream (every kernel it launches compiled and warm), then captured: the graph, and
    what the captured call returned (buffers of the graph's memory pool, rewritten by every replay). `pool`: a memory
    pool shared with other captures (torch.cuda.graph_pool_handle()), else the graph's own."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        result = fn()
    return graph, result


class GraphedExpertStage:
    def __init__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor, *, pool=None, **options):
        if not x.is_cuda:
            raise ValueError(f"x is on {x.device}: CUDA graphs need a CUDA device")
        if options.setdefault("sync", "never") != "never":
            raise ValueError(f"sync={options['sync']!r}: a captured stage cannot read the device; use sync='never'")
        self.inputs = (x.clone(), topk_ids.clone(), topk_weights.clone())
        self.weights = (w13, w2)
        self.options = options
        self.graph, self.out = capture(lambda: moe_expert_forward(*self.inputs, *self.weights, **options), pool)

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        for name, new, captured in zip(("x", "topk_ids", "topk_weights"), (x, topk_ids, topk_weights), self.inputs,
                                       strict=True):
            if new.shape != captured.shape or new.dtype != captured.dtype or new.device != captured.device:
                raise ValueError(f"{name}: {new.dtype} {tuple(new.shape)} on {new.device}, but the stage was captured "
                                 f"for {captured.dtype} {tuple(captured.shape)} on {captured.device}")
            captured.copy_(new)
        self.graph.replay()
        return self.out
