"""python -m verify.fuzz [--impl MODULE:CALLABLE | --mutants] [--max-examples N] [--seed S] [--device cpu|cuda]

Property-based search of the expert stage's input space. Where the catalogue (verify/cases.py) sends the inputs
someone imagined, `fuzz_cases` draws them: the rows a rank receives (0 to a few hundred), H and I (multiples of 16
and odd sizes), E_local, ep_size and rank, k, the per-expert counts (zeros, one hot expert, 127 / 128 / 129 around
the alignment), how many skipped slots are -1 rather than remote global ids, the view (DeepEP's or raw ids),
duplicated ids in a row, int32 or int64 ids, gate/up order, layout and the seed of every random choice (x, weights,
slot placement, the permuted probe's slot order). Every drawn case is one rank row, judged exactly as the sweep
judges a catalogue row (verify/sweep.py: the bands, then every probe).

On a failure, hypothesis shrinks the case to the smallest that still fails; the command prints it, its findings,
and `python -m verify.diff --replay TOKEN`, which reruns exactly that case anywhere (the token encodes every field of
the case; no file is needed). Exit 0 when no example fails, 1 when one does, 2 on a usage error. With --mutants it
searches every mutant of the catalogue instead (exit 0 when it finds them all). The CLI keeps no example database,
so a run depends on --seed alone (pytest's hypothesis database, .hypothesis/, stays out of git).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import random
import sys
import time
import zlib
from collections.abc import Callable

import torch
from hypothesis import HealthCheck, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from kernels._device import default_device
from kernels.dispatch import LAYOUTS, M_ALIGNMENT, Layout
from reference import moe_reference
from reference.layouts import expert_counts, local_expert_ids
from reference.rounding import PRODUCTION, Rounding, rounding_profile
from reference.routing import RankView, ViewKind
from verify import bands
from verify.cases import expert_weights, nan_weights_on_skipped_slots, normal
from verify.findings import Verdict
from verify.impls import Implementation, UsageError, implementation, load, no_verdict
from verify.perf.results import provenance
from verify.probes import Trial
from verify.report import DEFAULT_IMPL, format_table, rounding_option
from verify.sweep import RoundingChoice, Row, detect_rounding, judge_rank

GATE_UP_ORDERS = ("gate_up", "up_gate")


@dataclasses.dataclass(frozen=True)
class FuzzCase:
    """One rank's input to the expert stage, fully determined by these fields."""

    num_tokens: int  # M, the rows this rank receives
    hidden: int
    inter: int
    num_local_experts: int
    ep_size: int
    rank: int
    topk: int
    counts: tuple[int, ...]  # slots routed to each local expert
    drop: float  # share of the other slots that are -1 (the rest name experts of other ranks; raw view only)
    view: ViewKind = ViewKind.DEEPEP
    duplicates: bool = False  # may a row name one expert twice
    int32_ids: bool = False
    gate_up_order: str = "gate_up"
    layout: Layout = Layout.MASKED
    seed: int = 0

    def __post_init__(self):
        if self.hidden < bands.MIN_HIDDEN:
            raise ValueError(f"hidden={self.hidden}: the bands are stated for H >= {bands.MIN_HIDDEN} "
                             "(verify/bands.py)")
        if sum(self.counts) > self.num_tokens * self.topk or len(self.counts) != self.num_local_experts:
            raise ValueError(f"counts {list(self.counts)} do not fit {self.num_local_experts} experts and "
                             f"{self.num_tokens} x {self.topk} slots")

    @property
    def num_experts(self) -> int:
        return self.num_local_experts * self.ep_size

    def describe(self) -> str:
        return (f"M={self.num_tokens} H={self.hidden} I={self.inter} E_local={self.num_local_experts} "
                f"ep={self.ep_size} rank={self.rank} k={self.topk} counts={list(self.counts)} drop={self.drop:g} "
                f"{self.view} view, {'int32' if self.int32_ids else 'int64'} ids"
                f"{', duplicate ids allowed' if self.duplicates else ''}, {self.gate_up_order}, {self.layout}, "
                f"seed {self.seed}")

    def token(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update(view=str(self.view), layout=str(self.layout), counts=list(self.counts))
        raw = zlib.compress(json.dumps(fields, separators=(",", ":")).encode(), 9)
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def from_token(cls, token: str) -> FuzzCase:
        """The case a `token()` encodes; ValueError (naming the token) when it is not one."""
        try:
            fields = json.loads(zlib.decompress(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))))
            fields.update(view=ViewKind(fields["view"]), layout=Layout(fields["layout"]),
                          counts=tuple(fields["counts"]))
            return cls(**fields)
        except Exception as exc:
            raise ValueError(f"--replay {token!r} is not a verify.fuzz token ({type(exc).__name__}: {exc})") from None

    def build(self, device: str = "cpu") -> tuple[RankView, torch.Tensor, torch.Tensor]:
        """The rank view (NaN weights on -1 slots, as the sweep sends) and the rank's expert weights."""
        gen = torch.Generator().manual_seed(self.seed)
        num_slots = self.num_tokens * self.topk
        first = self.rank * self.num_local_experts
        # local slots, expert after expert; without duplicates, laid token-major (slot i -> token i % M) so that no
        # token meets an expert twice (each count <= M), with duplicates anywhere
        experts = torch.repeat_interleave(torch.arange(self.num_local_experts) + first, torch.tensor(self.counts))
        skipped = num_slots - experts.numel()
        remote = [e for e in range(self.num_experts) if not first <= e < first + self.num_local_experts]
        fill = torch.full((skipped,), -1, dtype=torch.int64)
        if self.view is ViewKind.RAW and remote:
            pick = torch.tensor(remote)[torch.randint(len(remote), (skipped,), generator=gen)]
            fill = torch.where(torch.rand(skipped, generator=gen) < self.drop, fill, pick)
        flat = torch.cat([experts, fill])
        if self.duplicates:
            flat = flat[torch.randperm(num_slots, generator=gen)]
        ids = flat.view(self.topk, self.num_tokens).T.contiguous()
        ids = ids[torch.randperm(self.num_tokens, generator=gen)]
        ids = torch.gather(ids, 1, torch.argsort(torch.rand(self.num_tokens, self.topk, generator=gen), dim=1))
        weights = torch.softmax(torch.randn(self.num_tokens, self.topk, generator=gen), dim=-1)
        weights = nan_weights_on_skipped_slots(ids, weights)
        local = local_expert_ids(ids, self.ep_size, self.rank, self.num_experts)
        values = torch.Generator(device=device).manual_seed(self.seed + 1)
        x = normal(self.num_tokens, self.hidden, generator=values, device=device)
        w13, w2 = expert_weights(self.num_local_experts, self.hidden, self.inter, values, device)
        view = RankView(self.ep_size, self.rank, self.num_experts, x,
                        ids.to(torch.int32 if self.int32_ids else torch.int64).to(device), weights.to(device),
                        torch.arange(self.num_tokens, device=device),
                        expert_counts(local, self.num_local_experts).to(torch.int32), self.view)
        return view, w13, w2


def trial_of(case: FuzzCase, impl: Implementation, device: str, rounding: Rounding, declared: bool = True) -> Trial:
    """The case as a sweep trial. An implementation that takes no layout or no gate_up_order gets the same
    computation without them (w13's halves swapped in place of gate_up_order="up_gate")."""
    view, w13, w2 = case.build(device)
    gate_up_order = case.gate_up_order
    if gate_up_order != "gate_up" and not impl.takes("gate_up_order"):
        w13, gate_up_order = torch.cat(w13.chunk(2, dim=1)[::-1], dim=1), "gate_up"
    references = tuple(moe_reference(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=case.ep_size,
                                     ep_rank=case.rank, num_experts=case.num_experts, gate_up_order=gate_up_order,
                                     mode=mode, rounding=rounding) for mode in ("faithful", "exact"))
    return Trial(impl, view, w13, w2, case.layout if impl.has_layouts else None, case.seed, references=references,
                 table=bands.bands_for(case.hidden, case.inter), gate_up_order=gate_up_order, rounding=rounding,
                 declared=declared)


def choose_rounding(case: FuzzCase, impl: Callable | Implementation, device: str = "cpu",
                    rounding: Rounding | str | RoundingChoice = PRODUCTION) -> RoundingChoice:
    """The profile the case is judged by: `rounding` declared, or for "auto" the one the case's own run matches (a
    choice already made is kept)."""
    if isinstance(rounding, RoundingChoice):
        return rounding
    impl = implementation(impl)
    if rounding == "auto":
        return detect_rounding(trial_of(case, impl, device, PRODUCTION))
    return RoundingChoice(rounding_profile(rounding), declared=True)


def run_case(case: FuzzCase, impl: Callable | Implementation, device: str = "cpu",
             rounding: Rounding | str | RoundingChoice = PRODUCTION, until_failure: bool = False) -> Row:
    """The case as one sweep row: the implementation judged by the bands (faithful reference under `rounding`, or the
    profile "auto" finds), then every probe (up to the first failure, with `until_failure`)."""
    impl = implementation(impl)
    choice = choose_rounding(case, impl, device, rounding)
    trial = trial_of(case, impl, device, choice.profile, choice.declared)
    row = Row("fuzz", case.ep_size, case.rank, trial.layout, case.num_tokens, case.view)
    row.add(choice.findings())
    judge_rank(row, trial, until_failure=until_failure)
    return row


def _sizes(smallest: int) -> st.SearchStrategy[int]:
    """Hidden / intermediate sizes: multiples of 16 (every backend), and odd sizes (what the CPU path takes)."""
    return st.one_of(st.sampled_from([16, 32, 64, 128, 256]), st.integers(smallest, 160))


@st.composite
def fuzz_cases(draw, max_tokens: int = 48) -> FuzzCase:
    """A strategy of FuzzCases; each field shrinks towards its simplest value (listed first)."""
    ep_size = draw(st.sampled_from([1, 2, 4, 3, 8]))
    rank = draw(st.integers(0, ep_size - 1))
    num_local_experts = draw(st.integers(1, 8))
    duplicates = draw(st.booleans())
    topk = draw(st.integers(1, 4 if duplicates else min(4, num_local_experts * ep_size)))
    boundary = [M_ALIGNMENT - 1, M_ALIGNMENT, M_ALIGNMENT + 1]
    num_tokens = draw(st.one_of(st.integers(0, max_tokens), st.sampled_from([*boundary, M_ALIGNMENT + 40])))
    cap = num_tokens * topk if duplicates else num_tokens  # without duplicates, one slot per token and expert
    left, counts = num_tokens * topk, []
    for _ in range(num_local_experts):  # zeros, one hot expert, alignment boundaries, anything in between
        most = min(cap, left)
        count = draw(st.one_of(st.integers(0, most), st.sampled_from([0, most, *[b for b in boundary if b <= most]])))
        counts.append(count)
        left -= count
    return FuzzCase(
        num_tokens=num_tokens, hidden=draw(_sizes(bands.MIN_HIDDEN)), inter=draw(_sizes(1)),
        num_local_experts=num_local_experts,
        ep_size=ep_size, rank=rank, topk=topk, counts=tuple(counts), drop=draw(st.sampled_from([0.0, 1.0, 0.5])),
        view=draw(st.sampled_from(list(ViewKind))), duplicates=duplicates, int32_ids=draw(st.booleans()),
        gate_up_order=draw(st.sampled_from(GATE_UP_ORDERS)), layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**16)))


def search(impl: Callable | Implementation, *, max_examples: int, seed: int, device: str,
           rounding: Rounding | str = PRODUCTION, on_example: Callable[[], None] = lambda: None) -> FuzzCase | None:
    """The smallest failing case hypothesis finds within `max_examples` (then shrunk), or None."""
    impl = implementation(impl)

    def fails(case: FuzzCase) -> bool:
        on_example()
        return run_case(case, impl, device, rounding, until_failure=True).verdict is Verdict.FAIL

    config = settings(max_examples=max_examples, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))
    try:
        return find(fuzz_cases(), fails, settings=config, random=random.Random(seed))
    except NoSuchExample:
        return None


def replay_command(case: FuzzCase, impl_spec: str | None, device: str, rounding: str | None = None) -> str:
    impl = f" --impl {impl_spec}" if impl_spec else ""
    rounding = f" --rounding {rounding}" if rounding else ""
    return f"python -m verify.diff --replay {case.token()}{impl}{rounding} --device {device}"


@dataclasses.dataclass
class Search:
    """One run of the fuzzer against one implementation."""

    impl: str
    cases_run: int
    seconds: float
    found: FuzzCase | None

    def as_dict(self) -> dict:
        found = None if self.found is None else dict(describe=self.found.describe(), token=self.found.token(),
                                                     num_tokens=self.found.num_tokens)
        return dict(impl=self.impl, cases_run=self.cases_run, seconds=self.seconds, found=found)


def run_search(spec: str, impl: Callable, args, rounding: str) -> Search:
    tried = [0]
    start = time.perf_counter()
    found = search(impl, max_examples=args.max_examples, seed=args.seed, device=args.device, rounding=rounding,
                   on_example=lambda: tried.__setitem__(0, tried[0] + 1))
    return Search(spec, tried[0], time.perf_counter() - start, found)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except torch.OutOfMemoryError as exc:
        return no_verdict("verify.fuzz", exc)


def _main(argv) -> int:
    from verify.mutants import MUTANTS

    p = argparse.ArgumentParser(prog="python -m verify.fuzz", description=__doc__.split("\n\n")[1].split(".")[0])
    p.add_argument("--impl", default=DEFAULT_IMPL, help="MODULE:CALLABLE (default: %(default)s)")
    p.add_argument("--mutants", action="store_true", help="search every mutant of verify/mutants.py instead, "
                   "and print which ones the fuzzer finds on its own, shrunk to what")
    p.add_argument("--max-examples", type=int, default=200, help="cases to try before shrinking (default 200)")
    p.add_argument("--seed", type=int, default=0, help="the search's seed: the same seed tries the same cases")
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    p.add_argument("--rounding", type=rounding_option, help="the faithful reference's rounding placement (a profile, "
                   "field=value,..., or auto); default: production for kernels.moe_expert_forward and the mutants, "
                   "auto (per case) otherwise")
    p.add_argument("--json", help="also write the result(s) here")
    args = p.parse_args(argv)
    try:
        impls = ({f"verify.mutants:{m.name}": m.impl for m in MUTANTS} if args.mutants else
                 {args.impl: load(args.impl)})
        if args.max_examples < 1:
            raise UsageError(f"--max-examples must be >= 1, got {args.max_examples}")
    except UsageError as exc:
        print(f"verify.fuzz: error: {exc}", file=sys.stderr)
        return 2
    searches = []
    rounding = args.rounding or ("production" if args.mutants or args.impl == DEFAULT_IMPL else "auto")
    for spec, impl in impls.items():
        result = run_search(spec, impl, args, rounding)
        searches.append(result)
        print(f"verify.fuzz: impl {spec} on {args.device}, seed {args.seed}: {result.cases_run} cases run in "
              f"{result.seconds:.0f} s", flush=True)
        if result.found is None:
            print(f"no failure in {args.max_examples} examples")
            continue
        row = run_case(result.found, impl, args.device, rounding)
        print(f"FAIL, shrunk to: {result.found.describe()}\n{format_table([row])}")
        for finding in row.problems:
            print(f"  {finding.verdict} {finding.kind}: {finding.message}")
        if row.locus:
            print(f"  worst: {row.locus.describe()}")
        print(f"replay: {replay_command(result.found, None if spec == DEFAULT_IMPL else spec, args.device, rounding)}",
              flush=True)
    if args.mutants:
        found = [s for s in searches if s.found]
        print(f"\nthe fuzzer found {len(found)}/{len(searches)} mutants on its own within {args.max_examples} "
              f"examples each; shrunk to M <= 4 for {sum(s.found.num_tokens <= 4 for s in found)} of them")
    if args.json:
        title = ("What the fuzzer finds of the mutants on its own (verify.fuzz --mutants)" if args.mutants else
                 f"A fuzz search of {args.impl} (verify.fuzz)")
        stamp = provenance(title, "fuzz", args.device, "python -m verify.fuzz", argv)  # before the file is opened
        with open(args.json, "w") as f:
            json.dump(dict(stamp,
                           device=args.device, seed=args.seed, max_examples=args.max_examples,
                           searches=[s.as_dict() for s in searches]), f, indent=1)
    if args.mutants:
        return 0 if all(s.found for s in searches) else 1
    return 1 if searches[0].found else 0


if __name__ == "__main__":
    sys.exit(main())
