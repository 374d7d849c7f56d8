"""Bad input that both entry points must reject with a ValueError naming the argument, as (argument, spoil) pairs
over a good argument dict (docs/contract.md, "Bad input"). test_reference and test_executor add their own entries."""

from __future__ import annotations

from verify.cases import Sizes, random_problem


def good_arguments(device: str = "cpu") -> dict:
    """Valid arguments of a small expert stage (E_local = 4, k = 2, H = I = 64)."""
    p = random_problem(Sizes(8, 64, 64, 4, 2), "uniform", 0, device)
    return dict(x=p.x, topk_ids=p.routing.topk_ids, topk_weights=p.routing.topk_weights, w13=p.w13, w2=p.w2)


CONTRACT_BAD_INPUTS = [
    ("x", lambda a: a.update(x=a["x"].float())),  # dtype
    ("x", lambda a: a.update(x=a["x"][None])),  # rank
    ("topk_ids", lambda a: a.update(topk_ids=a["topk_ids"].float())),
    ("topk_ids", lambda a: a.update(topk_ids=a["topk_ids"][:4])),  # rows != M
    ("topk_ids", lambda a: a.update(topk_ids=a["topk_ids"] + 4)),  # ids >= num_experts
    ("topk_ids", lambda a: a.update(topk_ids=a["topk_ids"] - 3)),  # ids < -1
    ("topk_weights", lambda a: a.update(topk_weights=a["topk_weights"][:, :1])),
    ("topk_weights", lambda a: a.update(topk_weights=a["topk_weights"].double())),
    ("w13", lambda a: a.update(w13=a["w13"][:, :, :32])),
    ("w13", lambda a: a.update(w13=a["w13"].float())),
    ("w2", lambda a: a.update(w2=a["w2"][:, :, :16])),
    ("ep_rank", lambda a: a.update(ep_size=2, ep_rank=2)),
    ("ep_rank", lambda a: a.update(ep_rank=-1)),
    ("ep_size", lambda a: a.update(ep_size=0)),
    ("num_experts", lambda a: a.update(ep_size=3, num_experts=8)),  # not divisible by ep_size
    ("num_experts", lambda a: a.update(num_experts=6)),  # does not match w13
    ("gate_up_order", lambda a: a.update(gate_up_order="gate")),
]


def ids(cases) -> list[str]:
    return [f"{argument}-{i}" for i, (argument, _) in enumerate(cases)]
