"""GPU reliability workloads (verify/tests/test_reliability.py runs them): a small run through every Triton kernel for
compute-sanitizer, the whole stage rerun for bitwise determinism, and a sweep over changing routings for memory growth.

`python -m verify.perf.reliability` runs the sanitizer workload: every Triton kernel of the pipeline (local ids and
histogram, both scatters, m_indices, silu_and_mul, our Triton grouped GEMMs: the tiled kernel in both layouts) on a
small skewed problem whose rank view is padded with NaN rows, checked against the reference; then the decode path
(sync="never" and "after": the route and the masked scatter as one kernel, M-row blocks, counts read on the device,
the stats published to pinned host memory; the skinny kernel in 32-row tiles with silu_and_mul fused), a hot expert
past the hint (16-row tiles, splits sweeping two tiles each), and a batch whose repeated ids overflow an M-row block,
so that the fused kernel's dropping branch runs too; then that batch with its counts read back, one expert past
SKINNY_MAX_ROWS rows: the tiled kernel and silu_and_mul in the masked layout. Run it under
`compute-sanitizer --tool memcheck|racecheck` with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that every buffer is its
own allocation and an out-of-bounds access cannot land inside a cached block.
"""

from __future__ import annotations

import dataclasses

import torch

from kernels import moe_expert_forward
from kernels._device import default_device
from kernels.dispatch import LAYOUTS
from reference import moe_reference
from reference.routing import pad_view, rank_view
from verify import bands
from verify.cases import Sizes, random_problem
from verify.findings import Verdict, worst
from verify.metrics import compare

SANITIZER_SIZES = Sizes(num_tokens=96, hidden=320, inter=192, num_experts=16, topk=4)  # H, I not powers of 2


def rank_inputs(sizes: Sizes, routing: str, seed: int, device: str, ep_size: int = 2, rank: int = 1, pad: int = 0):
    """(args, kwargs) of moe_expert_forward for one rank view, padded with `pad` NaN rows of -1 ids, and the view's
    local ids."""
    problem = random_problem(sizes, routing, seed, device)
    view = rank_view(problem.x, problem.routing, ep_size, rank)
    if pad:
        view = pad_view(view, view.num_tokens + pad)
    w13, w2 = problem.rank_weights(ep_size, rank)
    args = (view.x, view.topk_ids, view.topk_weights, w13, w2)
    return args, dict(ep_size=ep_size, ep_rank=rank, num_experts=sizes.num_experts), view.local_ids()


def sanitizer_workload(device: str = "cuda", seed: int = 0) -> None:
    """Every Triton kernel once per layout (the GEMMs' tiled and skinny kernels both); raises AssertionError if an
    output leaves its band."""
    args, kw, local_ids = rank_inputs(SANITIZER_SIZES, "skewed", seed, device, pad=8)
    refs = [moe_reference(*args, **kw, mode=m).float() for m in ("faithful", "exact")]
    runs = {f"{layout} layout": dict(layout=layout) for layout in map(str, LAYOUTS)}
    runs["sync=never"] = dict(sync="never")
    runs["sync=after"] = dict(sync="after")  # the scatter's last program publishes the stats to pinned host memory
    for name, options in runs.items():
        out = moe_expert_forward(*args, **kw, gemm="triton", **options)
        findings = bands.judge(compare(out.float(), *refs, local_ids),
                               bands.bands_for(SANITIZER_SIZES.hidden, SANITIZER_SIZES.inter))
        if worst(findings) is Verdict.FAIL:
            raise AssertionError(f"sanitizer workload, {name}: {[f.message for f in findings]}")
    x, ids, weights, w13, w2 = args
    first = kw["ep_rank"] * w13.shape[0]  # the rank's first expert
    # 30 rows whose 4 ids all name it: 120 rows on one expert where the hint expects ~8 per expert, so the skinny
    # kernel runs in 16-row tiles and its four splits sweep two tiles each
    hot = (x[:30], torch.full_like(ids[:30], first), weights[:30], w13, w2)
    moe_expert_forward(*hot, **kw, gemm="triton", sync="never")
    repeated = torch.zeros_like(ids[:, :2]).clamp_min(first)  # 2 slots per row, one expert
    many = x.repeat(2, 1)[: 2 * x.shape[0] - 8]  # > 128 rows' worth of slots: the M-row block overflows
    overflow = (many, repeated.repeat(2, 1)[: many.shape[0]], weights[:, :2].repeat(2, 1)[: many.shape[0]], w13, w2)
    moe_expert_forward(*overflow, **kw, gemm="triton", sync="never")  # the fused kernel drops what finds no room
    moe_expert_forward(*overflow, **kw, gemm="triton", layout="masked")  # one expert past SKINNY_MAX_ROWS: the tiled


def memory_sweep(device: str, iterations: int, sizes: Sizes, seed: int = 0) -> list[int]:
    """torch.cuda.memory_allocated() after each of `iterations` runs over routings of changing size and skew, both
    layouts (inputs built once up front and kept)."""
    problems = [rank_inputs(dataclasses.replace(sizes, num_tokens=t), routing, seed + i, device)
                for i, (t, routing) in enumerate([(64, "uniform"), (1024, "skewed"), (256, "hot_expert"),
                                                  (2048, "uniform")])]
    allocated = []
    for i in range(iterations):
        args, kw, _ = problems[i % len(problems)]
        out = moe_expert_forward(*args, **kw, layout=LAYOUTS[i // len(problems) % 2])
        del out
        allocated.append(torch.cuda.memory_allocated(device))
    return allocated


if __name__ == "__main__":
    sanitizer_workload(default_device())
    print("sanitizer workload: done")
