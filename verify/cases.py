"""The catalogue: every shape, case and speed point the suite uses, as data, in one place.

- `Shape`: a model's expert layer (H, I, E, k): DeepSeek-V3-like, Qwen3-30B-A3B-like, gpt-oss-like, and a tiny one.
- `Case`: a correctness case of the differential tester: a routing generator (reference.routing), its sizes on a
  CPU (small: the Triton interpreter is slow) and on a GPU (realistic), the ep_size values it sweeps.
- `BenchCase`: a speed case of verify.bench (a shape at one ep_size and routing, timed at several M received per
  rank); `GATE_POINTS`: the (bench case, M) points verify.gate times.
`random_problem` draws the inputs of every one of them from a seed.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from reference.routing import VIEWS, RankView, Routing, ViewKind, make_routing, pad_view, rank_view


@dataclasses.dataclass(frozen=True)
class Sizes:
    num_tokens: int  # T, the global batch
    hidden: int  # H
    inter: int  # I
    num_experts: int  # E, global
    topk: int  # k

    def describe(self) -> str:
        return f"T={self.num_tokens} H={self.hidden} I={self.inter} E={self.num_experts} k={self.topk}"


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model's MoE expert layer, global: hidden size, intermediate size, experts, experts per token."""

    name: str
    hidden: int
    inter: int
    num_experts: int
    topk: int

    def sizes(self, num_tokens: int, **change) -> Sizes:
        """Sizes of a global batch of `num_tokens` tokens of this shape (`change`: e.g. num_experts=64)."""
        return dataclasses.replace(Sizes(num_tokens, self.hidden, self.inter, self.num_experts, self.topk), **change)

    def describe(self) -> str:
        return f"{self.name}: E={self.num_experts}, k={self.topk}, H={self.hidden}, I={self.inter}"


DEEPSEEK_V3 = Shape("deepseek", 7168, 2048, 256, 8)
QWEN3_30B = Shape("qwen3", 2048, 768, 128, 8)  # Qwen3-30B-A3B
GPT_OSS = Shape("gpt_oss", 2880, 2880, 128, 4)  # gpt-oss-120b
TINY = Shape("tiny", 256, 128, 16, 4)  # CPU-sized: the Triton interpreter pays per program

CPU_DEFAULT = TINY.sizes(128)
GPU_DEFAULT = QWEN3_30B.sizes(4096)


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
    Case("duplicate_ids", "a quarter of the tokens name one expert twice: each slot its own row, summed",
         "duplicates", (("share", 0.25),)),
    Case("single_token", "one token: most ranks receive nothing, the rest one row", "single_token"),
    Case("boundary", "experts with exactly 127, 128 and 129 tokens around the 128-row alignment", "boundary",
         (("counts", (127, 128, 129)),), cpu=Sizes(160, 128, 64, 16, 4), gpu=QWEN3_30B.sizes(1024, num_experts=64)),
    Case("large_k", "large hidden size (DeepSeek-V3 H=7168 on GPU): long K in the gate+up GEMM", "uniform",
         cpu=Sizes(64, 1024, 256, 8, 2), gpu=DEEPSEEK_V3.sizes(1024, num_experts=64), ep_sizes=(1, 2)),
    Case("odd_hidden", "H not a multiple of 512 (gpt-oss H=2880 on GPU, 5*64 on CPU)", "uniform",
         cpu=Sizes(96, 320, 192, 8, 2), gpu=GPT_OSS.sizes(2048)),
    Case("many_experts", "256 experts, top-8 (DeepSeek routing width)", "uniform",
         cpu=Sizes(64, 128, 64, 256, 8), gpu=QWEN3_30B.sizes(4096, num_experts=256), ep_sizes=(4, 8),
         gpu_ep_sizes=(8, 32)),
)
CASES_BY_NAME = {case.name: case for case in CASES}


# ---- speed: verify.bench and verify.gate ------------------------------------------------------------------------

GPU_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
FIT_TOKENS = (1, 4, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)  # the layout rule is fitted on these


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """A speed case: rank 0 of `shape` at `ep_size` under `routing`, timed at each M (tokens it receives)."""

    name: str
    shape: Shape
    ep_size: int
    routing: str  # a reference.routing.ROUTINGS name
    tokens: tuple[int, ...] = GPU_TOKENS
    device: str = "cuda"

    @property
    def num_local_experts(self) -> int:
        return self.shape.num_experts // self.ep_size

    def describe(self) -> str:
        return (f"{self.name}: {self.shape.describe()}, ep {self.ep_size} (E_local={self.num_local_experts}), "
                f"{self.routing} routing, M in {list(self.tokens)}")

    def draw_weights(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 weights of rank 0's experts (`expert_weights`), drawn on the case's device."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return expert_weights(self.num_local_experts, self.shape.hidden, self.shape.inter, gen, self.device)

    def received(self, tokens: int, weights, seed: int = 0) -> BenchInputs:
        """The first `tokens` rows that rank 0 receives from a global batch of the case's routing."""
        s = self.shape
        # kernels.dispatch.receive_share, written out: the gate runs this verify/ against older kernels/ without it
        share = 1 - math.comb(s.num_experts - self.num_local_experts, s.topk) / math.comb(s.num_experts, s.topk)
        num_global = int(tokens / share * 1.3) + 16
        while True:
            routing = make_routing(self.routing, num_global, s.num_experts, s.topk, seed=seed)
            view = rank_view(torch.empty(num_global, 0), routing, self.ep_size, 0)
            if view.num_tokens >= tokens:
                break
            num_global *= 2
        x = normal(tokens, s.hidden, generator=torch.Generator(device=self.device).manual_seed(seed + 1),
                   device=self.device)
        ids, w = view.topk_ids[:tokens].to(self.device), view.topk_weights[:tokens].to(self.device)
        return BenchInputs(x, ids, w, *weights, view.local_ids()[:tokens].to(self.device))


@dataclasses.dataclass
class BenchInputs:
    """Rank 0's view of M received tokens and its experts' weights."""

    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    local_ids: torch.Tensor  # int64 [M, k], -1 where not local

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return self.x, self.topk_ids, self.topk_weights, self.w13, self.w2


DEEPSEEK_EP8 = BenchCase("deepseek-ep8", DEEPSEEK_V3, 8, "uniform", FIT_TOKENS)
DEEPSEEK_EP8_SKEWED = BenchCase("deepseek-ep8-skewed", DEEPSEEK_V3, 8, "skewed", FIT_TOKENS)
QWEN3_EP8 = BenchCase("qwen3-ep8", QWEN3_30B, 8, "uniform")
GPT_OSS_EP8 = BenchCase("gpt_oss-ep8", GPT_OSS, 8, "uniform")
TINY_EP2 = BenchCase("tiny", TINY, 2, "skewed", (1, 16, 64), device="cpu")  # the CPU plumbing check

BENCH_CASES: dict[str, BenchCase] = {c.name: c for c in (
    DEEPSEEK_EP8, DEEPSEEK_EP8_SKEWED,
    BenchCase("deepseek-ep16", DEEPSEEK_V3, 16, "uniform"),
    BenchCase("deepseek-ep32", DEEPSEEK_V3, 32, "uniform"),
    QWEN3_EP8,
    BenchCase("qwen3-ep8-skewed", QWEN3_30B, 8, "skewed"),
    GPT_OSS_EP8,
    TINY_EP2,
)}

# The whole-stage points verify.gate times, per device type: decode to prefill, uniform and skewed, three shapes.
GATE_POINTS: dict[str, tuple[tuple[BenchCase, int], ...]] = {
    "cuda": ((DEEPSEEK_EP8, 64), (DEEPSEEK_EP8, 1024), (DEEPSEEK_EP8, 4096), (DEEPSEEK_EP8, 16384),
             (DEEPSEEK_EP8_SKEWED, 4096), (QWEN3_EP8, 256), (QWEN3_EP8, 4096), (GPT_OSS_EP8, 1024)),
    "cpu": ((TINY_EP2, 16), (TINY_EP2, 64)),
}


# ---- inputs -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Problem:
    """Global inputs: x [T, H] bf16, the routing, and ALL experts' weights (ranks take slices)."""

    sizes: Sizes
    x: torch.Tensor
    routing: Routing
    w13: torch.Tensor  # bf16 [E, 2I, H]
    w2: torch.Tensor  # bf16 [E, H, I]

    def rank_weights(self, ep_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        num_local_experts = self.sizes.num_experts // ep_size
        experts = slice(rank * num_local_experts, (rank + 1) * num_local_experts)
        return self.w13[experts], self.w2[experts]

    def view(self, case: Case, ep_size: int, rank: int, kind: ViewKind = ViewKind.DEEPEP) -> RankView:
        """What the tester sends rank `rank`: the `kind` view of this batch (padded as a DeepEP receive buffer for a
        case with pad_views), NaN weights on its skipped slots."""
        view = VIEWS[kind](self.x, self.routing, ep_size, rank)
        if case.pad_views and kind is ViewKind.DEEPEP:
            view = pad_view(view, self.routing.num_tokens)
        weights = nan_weights_on_skipped_slots(view.topk_ids, view.topk_weights)
        return dataclasses.replace(view, topk_weights=weights)


def nan_weights_on_skipped_slots(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """The weights with NaN where the id is -1: the contract says a skipped slot contributes nothing whatever its
    weight (DeepEP sends 0), so an implementation that multiplies one shows it."""
    return torch.where(topk_ids >= 0, topk_weights, float("nan"))


def normal(*shape: int, generator: torch.Generator, device, scale: float = 1.0) -> torch.Tensor:
    """bf16 N(0, scale^2), drawn in bf16 (no fp32 copy of a large weight)."""
    return torch.randn(*shape, generator=generator, device=device, dtype=torch.bfloat16).mul_(scale)


def expert_weights(num_experts: int, hidden: int, inter: int, generator: torch.Generator, device):
    """w13 [E, 2I, H] ~ N(0, 1/H) and w2 [E, H, I] ~ N(0, 1/I): every stage's output is O(1) for x ~ N(0, 1)."""
    return (normal(num_experts, 2 * inter, hidden, generator=generator, device=device, scale=hidden**-0.5),
            normal(num_experts, hidden, inter, generator=generator, device=device, scale=inter**-0.5))


def random_problem(sizes: Sizes, routing: str, seed: int, device: str = "cpu", **routing_params) -> Problem:
    """Fresh random inputs (never zeros): x ~ N(0, 1), weights as `expert_weights`. The routing is drawn on the CPU
    (identical on every machine), then moved; the tensors are drawn on `device`."""
    r = make_routing(routing, sizes.num_tokens, sizes.num_experts, sizes.topk, seed=seed, **routing_params)
    r = dataclasses.replace(r, topk_ids=r.topk_ids.to(device), topk_weights=r.topk_weights.to(device))
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = normal(r.num_tokens, sizes.hidden, generator=gen, device=device)
    return Problem(sizes, x, r, *expert_weights(sizes.num_experts, sizes.hidden, sizes.inter, gen, device))


def make_problem(case: Case, seed: int, device: str, scale: str) -> Problem:
    """The case's inputs at its `scale` ("cpu" or "gpu" sizes), on `device`."""
    return random_problem(case.sizes(scale), case.routing, seed, device, **dict(case.routing_params))
