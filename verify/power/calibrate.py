"""python -m verify.power.calibrate: the measurements behind verify/bands.py.

An honest implementation that accumulates its GEMMs in fp32 in 64-wide K chunks (the order of a tensor-core K loop,
unlike the reference's exact accumulation) is compared with the faithful and exact references over several K; so
are the mutants (verify/mutants.py) that only a tight band can see. Every number is raw, as verify/metrics.py
measures it; the per-expert error is also shown as the band sees it (divided by its few-rows widening,
verify/bands.py). The printed table is docs/bands.md, with the GPU calibration, where tensor cores add their own
accumulation noise. `tensor_core_order` also serves as a peer implementation:
`--impl verify.power.calibrate:tensor_core_order` must pass.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from reference import moe_reference
from reference.layouts import local_expert_ids
from reference.routing import rank_view
from verify import bands
from verify.cases import Sizes, random_problem
from verify.metrics import compare
from verify.mutants import MUTANTS_BY_NAME


def _chunked_gemm_nt(a: torch.Tensor, b: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for k0 in range(0, a.shape[1], chunk):
        acc = acc + a[:, k0 : k0 + chunk].float() @ b[:, k0 : k0 + chunk].float().T
    return acc.to(torch.bfloat16)


def tensor_core_order(x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None,
                      gate_up_order="gate_up", **_layout_and_backend):
    """An honest peer: the contract's arithmetic with fp32 K-chunked GEMM accumulation (plain torch)."""
    num_local_experts = w13.shape[0]
    local = local_expert_ids(topk_ids, ep_size, ep_rank, num_experts or num_local_experts * ep_size)
    y = torch.zeros(*topk_ids.shape, x.shape[1], dtype=torch.bfloat16, device=x.device)
    for e in range(num_local_experts):
        token, slot = (local == e).nonzero(as_tuple=True)
        if token.numel():
            first, second = _chunked_gemm_nt(x[token], w13[e]).float().chunk(2, dim=-1)
            gate, up = (first, second) if gate_up_order == "gate_up" else (second, first)
            y[token, slot] = _chunked_gemm_nt((F.silu(gate) * up).to(torch.bfloat16), w2[e])
    acc = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for k in range(topk_ids.shape[1]):
        acc = torch.where((local[:, k] >= 0)[:, None], acc + topk_weights[:, k, None] * y[:, k].float(), acc)
    return acc.to(torch.bfloat16)


# The honest peer, and the subtle bugs of the mutant catalogue that only a tight band can see.
VARIANTS = {"honest": tensor_core_order, **{name: MUTANTS_BY_NAME[name].impl for name in (
    "silu_in_bf16", "gather_in_bf16", "weight_in_bf16", "perturb_one_expert")}}


def measure(sizes: Sizes, variant: str, seeds: int = 3, ep_size: int = 2) -> dict[str, float]:
    """Worst value of each metric over seeds x ranks, in units of u."""
    impl, worst = VARIANTS[variant], {}
    for seed in range(seeds):
        problem = random_problem(sizes, "uniform", seed)
        for rank in range(ep_size):
            view = rank_view(problem.x, problem.routing, ep_size, rank)
            w13, w2 = problem.rank_weights(ep_size, rank)
            args = (view.x, view.topk_ids, view.topk_weights, w13, w2)
            refs = [moe_reference(*args, ep_size=ep_size, ep_rank=rank, mode=m) for m in ("faithful", "exact")]
            m = compare(impl(*args, ep_size=ep_size, ep_rank=rank).float(), *refs, view.local_ids())
            values = {name: getattr(m, name) for name in ("row_err", "rel_l2", "exact_row_err", "exact_rel_l2")}
            values["expert_err"] = max(e.rel_l2 for e in m.experts)
            values["expert_banded"] = max(e.rel_l2 / bands.small_sample(e.rows) for e in m.experts)
            for name, value in values.items():
                worst[name] = max(worst.get(name, 0.0), value / bands.U_BF16)
            worst["calc_diff"] = max(worst.get("calc_diff", 0.0), m.calc_diff)
    return worst


def few_samples(seeds: int = 60) -> list[tuple[int, int, int, float, float]]:
    """(rows, H, I, worst exact L2 / u, worst exact row / u) of the faithful reference (an honest implementation)
    against the exact one, for tiny shapes where few independent roundings feed each output (one expert, k = 1)."""
    out = []
    for inter in (1, 2, 16, 256):
        for rows in (1, 4, 64):
            for hidden in (16, 256):
                worst_l2 = worst_row = 0.0
                for seed in range(seeds):
                    p = random_problem(Sizes(rows, hidden, inter, 4, 1), "uniform", seed)
                    args = (p.x, p.routing.topk_ids, p.routing.topk_weights, p.w13, p.w2)
                    faithful = moe_reference(*args, mode="faithful")
                    m = compare(faithful, faithful, moe_reference(*args, mode="exact"), p.routing.topk_ids)
                    worst_l2, worst_row = max(worst_l2, m.exact_rel_l2), max(worst_row, m.exact_row_err)
                out.append((rows, hidden, inter, worst_l2 / bands.U_BF16, worst_row / bands.U_BF16))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m verify.power.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    shapes = [Sizes(64, 256, 128, 16, 4), Sizes(64, 1024, 512, 16, 4), Sizes(32, 4096, 1024, 16, 4),
              Sizes(16, 7168, 2048, 16, 4)]
    print("| H | I | variant | row/u | expert/u | expert/u / widening | l2/u | exact row/u | exact l2/u | calc_diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sizes in shapes:
        for variant in VARIANTS:
            w = measure(sizes, variant, args.seeds)
            print(f"| {sizes.hidden} | {sizes.inter} | {variant} | {w['row_err']:.2f} | {w['expert_err']:.3f} | "
                  f"{w['expert_banded']:.3f} | {w['rel_l2']:.3f} | {w['exact_row_err']:.2f} | "
                  f"{w['exact_rel_l2']:.3f} | {w['calc_diff']:.1e} |", flush=True)
    print("\n| rows | H | I | rows x min(H, I) | worst exact l2/u | its band's FAIL bound | worst exact row/u |")
    print("|---|---|---|---|---|---|---|")
    for rows, hidden, inter, l2, row in few_samples(args.seeds * 20):
        band = next(b for b in bands.bands_for(hidden, inter) if b.metric == "exact_rel_l2")
        print(f"| {rows} | {hidden} | {inter} | {rows * min(hidden, inter)} | {l2:.2f} | "
              f"{band.bounds(rows)[1] / bands.U_BF16:.2f} | {row:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
