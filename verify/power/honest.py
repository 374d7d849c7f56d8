"""Honest implementations drawn at random: the population the error model is calibrated on (docs/error-model.md).

An `Honest` implementation computes the expert stage in plain torch with fp32 GEMMs (torch's own accumulation
order, not the reference's exact one) and rounds where its `Placement` says: any point of reference.rounding.SPACE,
and beyond it what no named convention describes: the router weight applied to a before the down GEMM, slots summed
as a tree or in reverse, and each expert rounding its own way. `planted` adds one structural bug, for the tests that
show the error model catching it: a local expert's output 1.5% off, the last top-k slot dropped, or the router
weight applied to the input before the experts.
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F

from reference.layouts import local_expert_ids
from reference.rounding import SPACE, Rounding
from reference.routing import ViewKind
from verify import errormodel
from verify.cases import CASES, make_problem

PLANTED = ("none", "expert_off", "last_slot_dropped", "weight_on_input")
SUMS = ("sequential", "reverse", "tree")

def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()

def _store(t: torch.Tensor, how: str) -> torch.Tensor:
    return _bf16(t) if how == "bf16" else t

@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an honest implementation rounds: a point of the space per expert, and what the space does not hold."""

    points: tuple[Rounding, ...]  # expert e rounds h, silu, a, y as points[e % len(points)]; the sum as points[0]
    weight_on_a: bool = False  # the router weight scales a (stored bf16) before the down GEMM
    sums: str = "sequential"  # "sequential" (the points' order), "reverse" or "tree" (pairwise)

    def describe(self) -> str:
        per_expert = "" if len(self.points) == 1 else f" ({len(self.points)} placements, expert by expert)"
        extra = ", weight applied to a" if self.weight_on_a else ""
        return f"{self.points[0].name}{per_expert}{extra}, {self.sums} sums"

    @classmethod
    def draw(cls, rng: random.Random) -> Placement:
        """A placement drawn from the whole space and beyond it (each extra one time in four)."""
        count = rng.choice((1, 1, 1, 2, 3))
        points = tuple(rng.choice(SPACE) for _ in range(count))
        return cls(points, weight_on_a=rng.random() < 0.25, sums=rng.choice(("sequential",) * 4 + SUMS[1:]))

@dataclasses.dataclass(frozen=True)
class Honest:
    """An implementation with the contract's signature (no layouts) that rounds as `placement` says."""

    placement: Placement
    planted: str = "none"  # one of PLANTED

    def __call__(self, x, topk_ids, topk_weights, w13, w2, *, ep_size=1, ep_rank=0, num_experts=None,
                 gate_up_order="gate_up"):
        num_local = w13.shape[0]
        num_experts = num_experts or num_local * ep_size
        local = local_expert_ids(topk_ids, ep_size, ep_rank, num_experts)
        if self.planted == "last_slot_dropped":
            local = local.clone()
            local[:, -1] = -1
        weights = torch.where(local >= 0, topk_weights, 0.0).float()
        terms = torch.zeros(*local.shape, x.shape[1], dtype=torch.float32, device=x.device)
        first = self.placement.points[0]
        for e in range(num_local):
            token, slot = (local == e).nonzero(as_tuple=True)
            if not token.numel():
                continue
            p = self.placement.points[e % len(self.placement.points)]
            w = _store(weights[token, slot], first.weights)[:, None]
            rows = x[token].float()
            if self.planted == "weight_on_input":
                rows = _bf16(rows * w)
            h = _store(rows @ w13[e].float().T, p.h)
            gate, up = h.chunk(2, dim=-1)
            if gate_up_order != "gate_up":
                gate, up = up, gate
            if p.silu == "logistic":
                silu = _bf16(gate * _bf16(torch.sigmoid(gate)))
            else:
                silu = _store(F.silu(gate), "bf16" if p.silu == "bf16" else "fp32")
            a = _store(silu * up, p.a)
            if self.placement.weight_on_a:
                a = _bf16(a * w)
            y = _store(a @ w2[e].float().T, p.y)
            if self.planted == "expert_off" and e == num_local // 2:
                y = y * 1.015
            term = y if self.placement.weight_on_a or self.planted == "weight_on_input" else w * y
            terms[token, slot] = _store(term, first.slot)
        return self._sum(terms, local, first).to(torch.bfloat16)

    def _sum(self, terms: torch.Tensor, local: torch.Tensor, first: Rounding) -> torch.Tensor:
        k = local.shape[1]
        order = torch.arange(k, device=local.device).expand_as(local)
        if first.order == "expert":
            order = torch.argsort(torch.where(local >= 0, local, 1 << 30) * k + order, dim=1)
        if self.placement.sums == "reverse":
            order = order.flip(1)
        terms = torch.gather(terms, 1, order[..., None].expand_as(terms))
        acc = first.accumulator
        if self.placement.sums == "tree":
            while terms.shape[1] > 1:
                if terms.shape[1] % 2:
                    terms = torch.cat([terms, torch.zeros_like(terms[:, :1])], dim=1)
                terms = _store(terms[:, 0::2] + terms[:, 1::2], acc)
            return terms[:, 0]
        total = torch.zeros_like(terms[:, 0])
        for i in range(k):
            total = _store(total + terms[:, i], acc)
        return total

def draw(seed: int, planted: str = "none") -> Honest:
    """The honest implementation of `seed` (with `planted`, one structural bug)."""
    return Honest(Placement.draw(random.Random(seed)), planted)


# ---- python -m verify.power.honest: the error model's calibration -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    """One honest (or planted) output judged by the error model alone."""

    case: str
    ep_size: int
    rank: int
    view: str
    seed: int
    placement: str
    planted: str
    fails: bool
    closest: dict  # the test nearest its bound (verify.errormodel.Test.as_dict)
    failing: list[dict]  # every failing test

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def calibrate(runs: int, device: str = "cpu", scale: str = "cpu", planted: str = "none", first_seed: int = 0):
    """Yield one Run per seed: catalogue case seed % 12, one of its ep sizes and ranks, the DeepEP or raw view, the
    honest implementation of that seed (with `planted`), judged by verify.errormodel against its budget."""
    for seed in range(first_seed, first_seed + runs):
        case = CASES[seed % len(CASES)]
        problem = make_problem(case, seed, device, scale)
        ep_sizes = case.sweep_ep_sizes(scale)
        ep = ep_sizes[(seed // len(CASES)) % len(ep_sizes)]
        rank = (seed // 7) % ep
        kind = ViewKind.RAW if ep > 1 and seed % 2 else ViewKind.DEEPEP
        view = problem.view(case, ep, rank, kind)
        w13, w2 = problem.rank_weights(ep, rank)
        budget = errormodel.budget_of_view(view, w13, w2)
        if not budget.token.numel():
            continue  # nothing routed to this rank: nothing for the model to judge
        impl = draw(seed, planted)
        out = impl(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=ep, ep_rank=rank,
                   num_experts=problem.sizes.num_experts)
        found = errormodel.tests(out, budget)
        failing = [t.as_dict() for t in found if t.fails]
        yield Run(case.name, ep, rank, str(kind), seed, impl.placement.describe(), planted, bool(failing),
                  max(found, key=lambda t: t.closeness).as_dict(), failing)


def main(argv=None) -> int:
    import argparse
    import json
    import sys
    import time

    from verify.errormodel import ALPHA
    from verify.perf.results import provenance

    p = argparse.ArgumentParser(prog="python -m verify.power.honest", description="The error model's false alarms "
                                "over random honest implementations, and what it catches of planted bugs")
    p.add_argument("--runs", type=int, default=1000, help="honest runs (default %(default)s)")
    p.add_argument("--planted-runs", type=int, default=120, help="runs per planted bug (default %(default)s)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ... (default 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scale", choices=("cpu", "gpu"), default=None, help="case sizes (default: the device's)")
    p.add_argument("--json", help="write the summary (with the closest honest runs and every miss) here, as a result "
                   "of baselines/results/ (verify/perf/results.py)")
    args = p.parse_args(argv)
    scale = args.scale or ("gpu" if args.device == "cuda" else "cpu")
    start = time.perf_counter()
    result = {**provenance("The error model's false alarms and catches (verify.power.honest)", "honest", args.device,
                           "python -m verify.power.honest", argv),
              "device": args.device, "scale": scale, "alpha": ALPHA, "planted": {}}
    for planted in PLANTED:
        count = args.runs if planted == "none" else args.planted_runs
        done = []
        for run in calibrate(count, args.device, scale, planted, args.first_seed):
            done.append(run.as_dict())
            if len(done) % 100 == 0:
                print(f"{planted:>18}: {len(done)} runs, {time.perf_counter() - start:.0f} s", file=sys.stderr,
                      flush=True)
        done.sort(key=lambda r: -r["closest"]["closeness"])
        flagged = [r for r in done if r["fails"]]
        result["planted"][planted] = dict(runs=len(done), flagged=len(flagged), closest=done[:5],
                                          missed=[] if planted == "none" else [r for r in done if not r["fails"]])
        what = "false alarms" if planted == "none" else "caught"
        print(f"{planted:>18}: {len(done)} runs, {what} {len(flagged)}; closest to failing: "
              f"{done[0]['closest']['closeness']:.3f} of its bound ({done[0]['case']}, {done[0]['closest']['kind']} "
              f"of {done[0]['closest']['part']})", flush=True)
    result["seconds"] = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if result["planted"]["none"]["flagged"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
