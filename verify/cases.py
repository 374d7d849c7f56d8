"""The case catalogue: every named case the tester sweeps, as data (one place, one Case per line of intent).

A Case names its routing generator (reference.routing), its sizes on a CPU (small: the Triton interpreter is slow)
and on a GPU (realistic), and the ep_size values it sweeps. `make_problem` builds its inputs from a seed.
"""

from __future__ import annotations

import dataclasses

import torch

from reference.routing import Routing, make_routing


@dataclasses.dataclass(frozen=True)
class Sizes:
    num_tokens: int  # T, the global batch
    hidden: int  # H
    inter: int  # I
    num_experts: int  # E, global
    topk: int  # k

    def describe(self) -> str:
        return f"T={self.num_tokens} H={self.hidden} I={self.inter} E={self.num_experts} k={self.topk}"


CPU_DEFAULT = Sizes(num_tokens=128, hidden=256, inter=128, num_experts=16, topk=4)
GPU_DEFAULT = Sizes(num_tokens=4096, hidden=2048, inter=768, num_experts=128, topk=8)  # Qwen3-30B-A3B-like


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    summary: str
    routing: str  # a reference.routing.ROUTINGS name
    routing_params: tuple[tuple[str, object], ...] = ()
    cpu: Sizes = CPU_DEFAULT
    gpu: Sizes = GPU_DEFAULT
    ep_sizes: tuple[int, ...] = (1, 2, 4)
    gpu_ep_sizes: tuple[int, ...] | None = None  # default: ep_sizes
    pad_views: bool = False  # pad every rank view to T rows (all ids -1, x = NaN), as DeepEP pads its receive buffer

    def sizes(self, scale: str) -> Sizes:
        """scale "cpu" (small, for the interpreter) or "gpu" (realistic)."""
        return self.gpu if scale == "gpu" else self.cpu

    def sweep_ep_sizes(self, scale: str) -> tuple[int, ...]:
        return (self.gpu_ep_sizes or self.ep_sizes) if scale == "gpu" else self.ep_sizes

    def describe(self, scale: str = "cpu") -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.routing_params)
        eps = "/".join(map(str, self.sweep_ep_sizes(scale)))
        return (f"{self.name}: {self.summary} [{self.routing}({params}), {self.sizes(scale).describe()}, "
                f"ep {eps}{', padded views' if self.pad_views else ''}]")


CASES: tuple[Case, ...] = (
    Case("uniform", "every expert equally likely", "uniform"),
    Case("skewed", "Zipf popularity over experts (exponent 1.2): hot and cold experts on every rank", "skewed",
         (("exponent", 1.2),)),
    Case("hot_expert", "one expert in 75% of the tokens: one segment far larger than the rest", "hot_expert",
         (("share", 0.75),)),
    Case("empty_experts", "half the experts receive no token (no rows, no GEMM work)", "empty_experts",
         (("fraction", 0.5),)),
    Case("empty_rank", "the last rank at ep_size 4 receives zero tokens", "empty_rank",
         (("ep_size", 4),), gpu_ep_sizes=(1, 4)),
    Case("padded", "rank views padded to T rows (all -1 ids, NaN x) as a DeepEP receive buffer; at ep 4 the last "
         "rank receives nothing but padding", "empty_rank", (("ep_size", 4),), pad_views=True),
    Case("single_token", "one token: most ranks receive nothing, the rest one row", "single_token"),
    Case("boundary", "experts with exactly 127, 128 and 129 tokens around the 128-row alignment", "boundary",
         (("counts", (127, 128, 129)),), cpu=Sizes(160, 128, 64, 16, 4), gpu=Sizes(1024, 2048, 768, 64, 8)),
    Case("large_k", "large hidden size (DeepSeek-V3 H=7168 on GPU): long K in the gate+up GEMM", "uniform",
         cpu=Sizes(64, 1024, 256, 8, 2), gpu=Sizes(1024, 7168, 2048, 64, 8), ep_sizes=(1, 2)),
    Case("odd_hidden", "H not a multiple of 512 (gpt-oss H=2880 on GPU, 5*64 on CPU)", "uniform",
         cpu=Sizes(96, 320, 192, 8, 2), gpu=Sizes(2048, 2880, 2880, 128, 4)),
    Case("many_experts", "256 experts, top-8 (DeepSeek routing width)", "uniform",
         cpu=Sizes(64, 128, 64, 256, 8), gpu=Sizes(4096, 2048, 768, 256, 8), ep_sizes=(4, 8),
         gpu_ep_sizes=(8, 32)),
)
CASES_BY_NAME = {case.name: case for case in CASES}


@dataclasses.dataclass(frozen=True)
class Problem:
    """Global inputs: x [T, H] bf16, the routing, and ALL experts' weights (ranks take slices)."""

    sizes: Sizes
    x: torch.Tensor
    routing: Routing
    w13: torch.Tensor  # bf16 [E, 2I, H]
    w2: torch.Tensor  # bf16 [E, H, I]

    def rank_weights(self, ep_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = self.sizes.num_experts // ep_size
        experts = slice(rank * per_rank, (rank + 1) * per_rank)
        return self.w13[experts], self.w2[experts]


def random_problem(sizes: Sizes, routing: str, seed: int, device: str = "cpu", **routing_params) -> Problem:
    """Fresh random inputs (never zeros): x ~ N(0, 1), weights ~ N(0, 1/K) so every stage is O(1).
    The routing is drawn on the CPU (identical on every machine), then moved; the tensors are drawn on `device`."""
    r = make_routing(routing, sizes.num_tokens, sizes.num_experts, sizes.topk, seed=seed, **routing_params)
    r = dataclasses.replace(r, topk_ids=r.topk_ids.to(device), topk_weights=r.topk_weights.to(device))
    gen = torch.Generator(device=device).manual_seed(seed + 1)

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:  # drawn in bf16: no fp32 copy of the weights
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(scale)

    return Problem(
        sizes,
        x=normal(r.num_tokens, sizes.hidden),
        routing=r,
        w13=normal(sizes.num_experts, 2 * sizes.inter, sizes.hidden, scale=sizes.hidden**-0.5),
        w2=normal(sizes.num_experts, sizes.hidden, sizes.inter, scale=sizes.inter**-0.5),
    )


def make_problem(case: Case, seed: int, device: str, scale: str) -> Problem:
    """The case's inputs at its `scale` ("cpu" or "gpu" sizes), on `device`."""
    return random_problem(case.sizes(scale), case.routing, seed, device, **dict(case.routing_params))
