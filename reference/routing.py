"""Global routings for named cases, the rank view of DeepEP normal-mode dispatch, and combine.

A routing is what the router hands to dispatch for the whole (global) batch: for each token, `topk` DISTINCT global
expert ids and their fp32 weights. Every generator takes an explicit seed and is deterministic on the CPU.

Two views of the global batch, as two kinds of dispatcher hand it to one rank (docs/contract.md, "Rank view"):
- `rank_view` (ViewKind.DEEPEP) is what DeepEP normal dispatch delivers: the tokens with at least one expert on that
  rank, in global token order, with ids of experts on other ranks replaced by -1 (weight 0), int64 ids;
- `raw_view` (ViewKind.RAW) is what an all-gather dispatcher, or a caller that forwards the router's output, hands
  over: every token, its GLOBAL ids and weights as the router chose them (experts of other ranks included), int32
  ids; the expert stage itself must leave the remote ones out.
Both carry the index of each row in the global batch and int32 counts per local expert. `pad_view` appends rows with
all ids -1, as DeepEP pads a receive buffer to a worst-case size. `combine` adds every rank's rows back at their
token index.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence

import torch

from reference.layouts import expert_counts, local_expert_ids


@dataclasses.dataclass(frozen=True)
class Routing:
    """Router output for the global batch: int64 [T, k] distinct global expert ids, fp32 [T, k] weights."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    num_experts: int

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def topk(self) -> int:
        return self.topk_ids.shape[1]

    def counts(self) -> torch.Tensor:
        """Tokens per global expert (int64 [num_experts])."""
        return torch.bincount(self.topk_ids.flatten(), minlength=self.num_experts)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _router_weights(num_tokens: int, topk: int, gen: torch.Generator) -> torch.Tensor:
    """Softmax over the chosen experts' random logits: positive, summing to 1 per token (DeepSeek/Qwen style)."""
    return torch.softmax(torch.randn(num_tokens, topk, generator=gen), dim=-1)


def _sample(probs: torch.Tensor, num_tokens: int, topk: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct experts per token, drawn without replacement from `probs` (an expert with p = 0 is never drawn)."""
    if num_tokens == 0:
        return torch.empty(0, topk, dtype=torch.int64)
    return torch.multinomial(probs.expand(num_tokens, -1), topk, replacement=False, generator=gen)


def _routing(ids: torch.Tensor, num_experts: int, gen: torch.Generator) -> Routing:
    return Routing(ids.to(torch.int64), _router_weights(ids.shape[0], ids.shape[1], gen), num_experts)


def _check_sizes(num_tokens: int, num_experts: int, topk: int, available: int | None = None) -> None:
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if not 1 <= topk <= (num_experts if available is None else available):
        raise ValueError(f"topk={topk} needs at least that many selectable experts (num_experts={num_experts})")


def uniform(num_tokens: int, num_experts: int, topk: int, *, seed: int) -> Routing:
    """Every expert equally likely."""
    _check_sizes(num_tokens, num_experts, topk)
    gen = _generator(seed)
    return _routing(_sample(torch.ones(num_experts), num_tokens, topk, gen), num_experts, gen)


def skewed(num_tokens: int, num_experts: int, topk: int, *, seed: int, exponent: float = 1.2) -> Routing:
    """Zipf popularity over experts: the expert of popularity rank r is drawn with weight 1 / r**exponent.
    Popularity ranks are a random permutation of the experts, so the hot ones land on any rank."""
    _check_sizes(num_tokens, num_experts, topk)
    gen = _generator(seed)
    popularity = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -exponent
    probs = popularity[torch.randperm(num_experts, generator=gen)]
    return _routing(_sample(probs, num_tokens, topk, gen), num_experts, gen)


def hot_expert(
    num_tokens: int, num_experts: int, topk: int, *, seed: int, share: float = 0.5, expert: int = 0
) -> Routing:
    """Expert `expert` is in a fraction `share` of the tokens; the other slots are uniform over the rest."""
    _check_sizes(num_tokens, num_experts, topk, available=num_experts - 1)
    if not 0.0 <= share <= 1.0 or not 0 <= expert < num_experts:
        raise ValueError(f"share must be in [0, 1] and expert in [0, {num_experts}), got {share}, {expert}")
    gen = _generator(seed)
    others = torch.ones(num_experts)
    others[expert] = 0.0
    ids = _sample(others, num_tokens, topk, gen)
    takes_hot = torch.rand(num_tokens, generator=gen) < share
    slot = torch.randint(0, topk, (num_tokens,), generator=gen)
    ids[takes_hot, slot[takes_hot]] = expert
    return _routing(ids, num_experts, gen)


def empty_experts(num_tokens: int, num_experts: int, topk: int, *, seed: int, fraction: float = 0.5) -> Routing:
    """A random `fraction` of the experts receives no token at all; the rest are uniform."""
    num_empty = int(num_experts * fraction)
    _check_sizes(num_tokens, num_experts, topk, available=num_experts - num_empty)
    gen = _generator(seed)
    probs = torch.ones(num_experts)
    probs[torch.randperm(num_experts, generator=gen)[:num_empty]] = 0.0
    return _routing(_sample(probs, num_tokens, topk, gen), num_experts, gen)


def empty_rank(
    num_tokens: int, num_experts: int, topk: int, *, seed: int, ep_size: int = 4, rank: int | None = None
) -> Routing:
    """No token goes to any expert of `rank` (default: the last) at `ep_size`: that rank receives zero tokens."""
    rank = ep_size - 1 if rank is None else rank
    if num_experts % ep_size or not 0 <= rank < ep_size:
        raise ValueError(f"empty_rank needs num_experts % ep_size == 0 and 0 <= rank < ep_size ({rank}, {ep_size})")
    num_local_experts = num_experts // ep_size
    _check_sizes(num_tokens, num_experts, topk, available=num_experts - num_local_experts)
    gen = _generator(seed)
    probs = torch.ones(num_experts)
    probs[rank * num_local_experts : (rank + 1) * num_local_experts] = 0.0
    return _routing(_sample(probs, num_tokens, topk, gen), num_experts, gen)


def duplicates(num_tokens: int, num_experts: int, topk: int, *, seed: int, share: float = 0.25) -> Routing:
    """Uniform, except that a fraction `share` of the tokens names one expert twice (its slots 0 and 1): the contract
    sums duplicate slots, and a scatter must give each its own row."""
    _check_sizes(num_tokens, num_experts, topk)
    if topk < 2:
        raise ValueError(f"duplicates needs topk >= 2, got {topk}")
    gen = _generator(seed)
    ids = _sample(torch.ones(num_experts), num_tokens, topk, gen)
    twice = torch.rand(num_tokens, generator=gen) < share
    ids[twice, 1] = ids[twice, 0]
    return _routing(ids, num_experts, gen)


def single_token(num_tokens: int, num_experts: int, topk: int, *, seed: int) -> Routing:
    """One token (num_tokens is ignored): the smallest batch that launches anything."""
    return uniform(1, num_experts, topk, seed=seed)


def boundary(
    num_tokens: int, num_experts: int, topk: int, *, seed: int, counts: Sequence[int] = (127, 128, 129)
) -> Routing:
    """Chosen experts get exactly `counts` tokens (by default one below, at and one above the alignment 128); the
    other experts share the remaining slots as evenly as possible. The chosen experts are spread over the id range
    (first, middle, last, ...) so that every rank of an EP sweep meets one, the last local expert included."""
    num_tokens = max(num_tokens, max(counts))
    _check_sizes(num_tokens, num_experts, topk)
    chosen = torch.linspace(0, num_experts - 1, len(counts)).round().long().tolist()
    if len(set(chosen)) != len(counts) or num_experts == len(counts):
        raise ValueError(f"boundary needs more than {len(counts)} experts, got {num_experts}")
    target = torch.zeros(num_experts, dtype=torch.int64)
    target[chosen] = torch.tensor(list(counts))
    rest = [e for e in range(num_experts) if e not in chosen]
    remaining = num_tokens * topk - sum(counts)
    if remaining < 0 or remaining > len(rest) * num_tokens:
        raise ValueError(f"boundary counts {tuple(counts)} do not fit {num_tokens} tokens x topk={topk}")
    target[rest] = remaining // len(rest)
    target[rest[: remaining % len(rest)]] += 1
    # Lay the slots out expert after expert, token-major: slot i goes to token i % T. No expert has more than T
    # slots, so no token gets an expert twice. Then shuffle tokens and the slot order inside each token.
    gen = _generator(seed)
    flat = torch.repeat_interleave(torch.arange(num_experts), target)
    ids = flat.view(topk, num_tokens).T.contiguous()
    ids = ids[torch.randperm(num_tokens, generator=gen)]
    ids = torch.gather(ids, 1, torch.argsort(torch.rand(num_tokens, topk, generator=gen), dim=1))
    return _routing(ids, num_experts, gen)


ROUTINGS: dict[str, Callable[..., Routing]] = {
    "uniform": uniform,
    "skewed": skewed,
    "hot_expert": hot_expert,
    "empty_experts": empty_experts,
    "empty_rank": empty_rank,
    "duplicates": duplicates,
    "single_token": single_token,
    "boundary": boundary,
}


def make_routing(name: str, num_tokens: int, num_experts: int, topk: int, *, seed: int, **params) -> Routing:
    """Build the named routing (one of ROUTINGS)."""
    if name not in ROUTINGS:
        raise ValueError(f"unknown routing {name!r}; known: {', '.join(ROUTINGS)}")
    return ROUTINGS[name](num_tokens, num_experts, topk, seed=seed, **params)


class ViewKind(str, enum.Enum):
    """Which dispatcher a rank view models (see the module docstring)."""

    DEEPEP = "deepep"
    RAW = "raw"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class RankView:
    """What a dispatcher delivers to rank `rank` of `ep_size` (see the module docstring).

    token_index is -1 on padding rows (`pad_view`); counts are int32 per local expert."""

    ep_size: int
    rank: int
    num_experts: int
    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    token_index: torch.Tensor
    counts: torch.Tensor
    kind: ViewKind = ViewKind.DEEPEP

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def local_ids(self) -> torch.Tensor:
        """LOCAL expert ids of this rank's rows (int64, -1 where not local)."""
        return local_expert_ids(self.topk_ids, self.ep_size, self.rank, self.num_experts)


def rank_view(x: torch.Tensor, routing: Routing, ep_size: int, rank: int) -> RankView:
    """The rank view of the global batch (x [T, H], routing) for rank `rank` of `ep_size`."""
    if routing.num_experts % ep_size or not 0 <= rank < ep_size:
        raise ValueError(f"rank {rank} of ep_size {ep_size} does not split {routing.num_experts} experts")
    ids = routing.topk_ids.to(x.device)
    local = local_expert_ids(ids, ep_size, rank, routing.num_experts)
    is_local = local >= 0
    token_index = is_local.any(dim=1).nonzero().flatten()
    keep = is_local[token_index]
    return RankView(
        ep_size=ep_size,
        rank=rank,
        num_experts=routing.num_experts,
        x=x[token_index],
        topk_ids=torch.where(keep, ids[token_index], torch.full_like(ids[token_index], -1)),
        topk_weights=torch.where(keep, routing.topk_weights.to(x.device)[token_index], 0.0),
        token_index=token_index,
        counts=expert_counts(local[token_index], routing.num_experts // ep_size).to(torch.int32),
    )


def raw_view(x: torch.Tensor, routing: Routing, ep_size: int, rank: int) -> RankView:
    """The raw view of the global batch for rank `rank` of `ep_size`: every token, the router's GLOBAL ids (int32)
    and weights, untouched."""
    if routing.num_experts % ep_size or not 0 <= rank < ep_size:
        raise ValueError(f"rank {rank} of ep_size {ep_size} does not split {routing.num_experts} experts")
    ids = routing.topk_ids.to(x.device)
    local = local_expert_ids(ids, ep_size, rank, routing.num_experts)
    return RankView(
        ep_size=ep_size,
        rank=rank,
        num_experts=routing.num_experts,
        x=x,
        topk_ids=ids.to(torch.int32),
        topk_weights=routing.topk_weights.to(x.device),
        token_index=torch.arange(x.shape[0], device=x.device),
        counts=expert_counts(local, routing.num_experts // ep_size).to(torch.int32),
        kind=ViewKind.RAW,
    )


VIEWS: dict[ViewKind, Callable[..., RankView]] = {ViewKind.DEEPEP: rank_view, ViewKind.RAW: raw_view}


def pad_view(view: RankView, num_rows: int, fill: float = float("nan")) -> RankView:
    """Append rows up to `num_rows` whose ids are all -1 (weight 0, token_index -1), as DeepEP pads a receive buffer
    to a worst-case size. Their x rows hold `fill` (NaN by default: a padding row must never be read)."""
    extra = num_rows - view.num_tokens
    if extra < 0:
        raise ValueError(f"num_rows={num_rows} is smaller than the view's {view.num_tokens} rows")

    def grow(t: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([t, torch.full((extra, *t.shape[1:]), value, dtype=t.dtype, device=t.device)])

    return dataclasses.replace(
        view,
        x=grow(view.x, fill),
        topk_ids=grow(view.topk_ids, -1),
        topk_weights=grow(view.topk_weights, 0.0),
        token_index=grow(view.token_index, -1),
    )


def combine(views: Sequence[RankView], outputs: Sequence[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Global output (float32 [T, H]): each rank's output rows added at their token index, ranks in order.
    Padding rows (token_index -1) are dropped."""
    hidden = outputs[0].shape[1]
    total = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=outputs[0].device)
    for view, out in zip(views, outputs, strict=True):
        real = view.token_index >= 0
        total.index_add_(0, view.token_index[real], out[real].float())
    return total
