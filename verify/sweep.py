"""The sweep: case -> global routing -> ep x rank views -> implementation -> compare -> combine -> compare.

For each ep_size of the case and each rank, the implementation runs on the rank view (DeepEP normal dispatch) in
each layout; its output is judged against the faithful and exact references of that view (bands.py). Then the
ranks' outputs are combined and judged against the ep_size = 1 references of the global batch ("all" rows).

Skipped slots (id -1) carry NaN weights: the contract says they contribute nothing whatever their weight.
Every implementation is also checked for leaving its inputs untouched and for bitwise-identical reruns. An
implementation that exposes its stages (a `stages=` keyword, like kernels.moe_expert_forward) is run again with its
own stages plus the tester's hooks: with poisoned buffers and its layout contract checked, and with a legal
permutation of the slots inside every expert segment (both must reproduce the plain run bit for bit); and, on its
masked rows, with layout="auto" and masked_max_tokens = M and M - 1, which must take the masked and the contiguous
path as the contract's threshold rule says. Every failure names the check that raised it (Row.checks).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator

import torch

from kernels import Stages
from kernels.gemm import M_ALIGNMENT
from reference import moe_reference
from reference.routing import RankView, combine, pad_view, rank_view
from verify import bands, checks
from verify.cases import Case, Problem, make_problem
from verify.metrics import Metrics, compare

LAYOUTS = ("masked", "contiguous")
RERUNS = {"cuda": 3, "cpu": 1}  # plain reruns that must reproduce the output bit for bit


@dataclasses.dataclass
class Row:
    case: str
    ep_size: int
    rank: int | None  # None: the combine of all ranks
    layout: str
    num_tokens: int
    verdict: str = bands.PASS
    notes: list[str] = dataclasses.field(default_factory=list)
    metrics: Metrics | None = None
    worst: str = ""  # where the worst row is: token, expert(s), rank, layout
    checks: list[str] = dataclasses.field(default_factory=list)  # the checks that failed, first first

    @property
    def test_id(self) -> str:
        rank = "all" if self.rank is None else f"rank{self.rank}"
        return f"{self.case}-ep{self.ep_size}-{rank}-{self.layout}"

    def fail(self, note: str, check: str) -> None:
        self.verdict = bands.FAIL
        self.notes.append(note)
        self.checks.append(check)


@dataclasses.dataclass(frozen=True)
class Target:
    """One row to run: ep_size, rank (None: combine), layout."""

    ep_size: int
    rank: int | None
    layout: str


def default_scale(device: str) -> str:
    """Case sizes to use on a device: realistic on a GPU, small for the CPU interpreter."""
    return "gpu" if torch.device(device).type == "cuda" else "cpu"


def targets(case: Case, scale: str, ep_sizes=None, ranks=None, layouts=LAYOUTS) -> list[Target]:
    """The rows of a case: every (ep_size, rank, layout), then per (ep_size, layout) the combine when ep_size > 1."""
    out = []
    for ep in case.sweep_ep_sizes(scale) if ep_sizes is None else ep_sizes:
        for layout in layouts:
            for rank in range(ep):
                if ranks is None or rank in ranks:
                    out.append(Target(ep, rank, layout))
            if ep > 1 and ranks is None:
                out.append(Target(ep, None, layout))
    return out


def own_stages(impl: Callable) -> Stages | None:
    """The stages an implementation runs by default, if it exposes them (a `stages=` keyword with a default)."""
    try:
        parameter = inspect.signature(impl).parameters.get("stages")
    except (TypeError, ValueError):
        return None
    return parameter.default if parameter is not None and isinstance(parameter.default, Stages) else None


class Sweep:
    """Runs rows of one case for one implementation; rank views and references are built once and shared."""

    def __init__(self, case: Case, impl: Callable, *, seed: int = 0, device: str = "cpu", scale: str | None = None):
        self.case, self.impl, self.seed, self.device = case, impl, seed, device
        self.problem: Problem = make_problem(case, seed, device, scale or default_scale(device))
        self._views: dict[tuple[int, int], RankView] = {}
        self._refs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._outputs: dict[tuple[int, int, str], torch.Tensor] = {}

    def view(self, ep_size: int, rank: int) -> RankView:
        key = (ep_size, rank)
        if key not in self._views:
            view = rank_view(self.problem.x, self.problem.routing, ep_size, rank)
            if self.case.pad_views:
                view = pad_view(view, self.problem.routing.num_tokens)
            weights = checks.nan_weights_on_skipped_slots(view.topk_ids, view.topk_weights)
            self._views[key] = dataclasses.replace(view, topk_weights=weights)
        return self._views[key]

    def references(self, ep_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(faithful, exact) references of one rank view."""
        key = (ep_size, rank)
        if key not in self._refs:
            view = self.view(ep_size, rank)
            w13, w2 = self.problem.rank_weights(ep_size, rank)
            self._refs[key] = tuple(
                moe_reference(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=ep_size, ep_rank=rank,
                              num_experts=self.problem.sizes.num_experts, mode=mode)
                for mode in ("faithful", "exact"))
        return self._refs[key]

    def run(self, target: Target) -> Row:
        if target.rank is None:
            return self._run_combine(target)
        return self._run_rank(target)

    def _call(self, view: RankView, ep_size: int, rank: int, **options) -> torch.Tensor:
        """The implementation on one rank view; `options`: layout, and stages / masked_max_tokens where used."""
        w13, w2 = self.problem.rank_weights(ep_size, rank)
        return self.impl(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=ep_size, ep_rank=rank,
                         num_experts=self.problem.sizes.num_experts, **options)

    def _run_rank(self, target: Target) -> Row:
        view = self.view(target.ep_size, target.rank)
        w13, w2 = self.problem.rank_weights(target.ep_size, target.rank)
        inputs = (view.x, view.topk_ids, view.topk_weights, w13, w2)
        before = [t.clone() for t in inputs]
        try:
            return self._judge_rank(target, inputs, before)
        finally:  # later rows share these tensors: undo whatever an implementation wrote into them
            checks.restore(inputs, before)

    def _judge_rank(self, target: Target, inputs, before) -> Row:
        ep, rank, layout = target.ep_size, target.rank, target.layout
        view = self.view(ep, rank)
        row = Row(self.case.name, ep, rank, layout, view.num_tokens)
        faithful, exact = self.references(ep, rank)  # before the implementation can touch the inputs
        try:
            out = self._call(view, ep, rank, layout=layout)
        except Exception as exc:  # a crash is a verdict, not an abort of the sweep
            row.fail(f"raised {type(exc).__name__}: {exc}", "crash")
            return row
        if not all(checks.bitwise_equal(a, b) for a, b in zip(inputs, before, strict=True)):
            row.fail("an input was modified", "inputs")
            checks.restore(inputs, before)  # the row's other runs start from the caller's inputs
        if not isinstance(out, torch.Tensor) or out.shape != view.x.shape or out.dtype != torch.bfloat16:
            row.fail(f"output must be bf16 {tuple(view.x.shape)}, got "
                     f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}", "output")
            return row
        self._outputs[(ep, rank, layout)] = out
        local_ids = view.local_ids()
        row.metrics = compare(out.float(), faithful, exact, local_ids)
        self._judge(row, bands.bands_for(*self._hidden_inter()), local_ids, view.token_index, view.topk_ids,
                    expert_offset=rank * view.num_local_experts)
        for _ in range(RERUNS[torch.device(self.device).type]):
            if not checks.bitwise_equal(self._call(view, ep, rank, layout=layout), out):
                row.fail("nondeterministic: a rerun on the same inputs differs", "rerun")
                break
        base = own_stages(self.impl)
        if base is not None:
            self._stage_checks(row, view, out, base)
        return row

    def _stage_checks(self, row: Row, view: RankView, out: torch.Tensor, base: Stages) -> None:
        problems: list[str] = []
        layouts_taken: list[str] = []
        local_ids = view.local_ids()

        def contract_then(transform):
            def after_scatter(dispatch):
                dispatch = base.after_scatter(dispatch)
                layouts_taken.append(dispatch.layout)
                problems.extend(checks.layout_problems(dispatch, view.x, local_ids, M_ALIGNMENT))
                return transform(checks.poison_padding(dispatch))
            return after_scatter

        generator = torch.Generator().manual_seed(self.seed)
        permute = lambda d: checks.permute_segments(d, generator)  # noqa: E731
        runs = [("poisoned", lambda d: d, {}), ("permuted", permute, {})]
        if row.layout == "masked" and view.num_tokens > 1:  # the threshold rule, on each side of M
            runs += [(f"auto at masked_max_tokens={m}", lambda d: d, dict(layout="auto", masked_max_tokens=m))
                     for m in (view.num_tokens, view.num_tokens - 1)]
        for name, transform, change in runs:
            stages = dataclasses.replace(base, after_scatter=contract_then(transform), empty=checks.poisoned_empty)
            layouts_taken.clear()
            try:
                again = self._call(view, row.ep_size, row.rank, stages=stages, **{"layout": row.layout, **change})
            except Exception as exc:
                row.fail(f"{name} run raised {type(exc).__name__}: {exc}", name.split(" ")[0])
                continue
            if name.startswith("auto"):
                want = "masked" if change["masked_max_tokens"] >= view.num_tokens else "contiguous"
                if layouts_taken and layouts_taken[-1] != want:  # (nothing scattered: no layout to check)
                    row.fail(f"layout='auto' with {name.split(' at ')[1]} and M={view.num_tokens} took the "
                             f"{layouts_taken[-1]} path, the contract says {want}", "layout-choice")
                continue
            if not checks.bitwise_equal(again, out):
                what = ("a legal slot permutation changed the output (order-dependent)" if name == "permuted" else
                        "poisoned buffers changed the output (a stage reads memory nobody wrote)")
                row.fail(what, name)
        for problem in dict.fromkeys(problems):
            row.fail(f"layout: {problem}", "layout")

    def _run_combine(self, target: Target) -> Row:
        ep, layout = target.ep_size, target.layout
        row = Row(self.case.name, ep, None, layout, self.problem.routing.num_tokens)
        views = [self.view(ep, r) for r in range(ep)]
        missing = [r for r in range(ep) if (ep, r, layout) not in self._outputs]
        for r in missing:
            self._run_rank(Target(ep, r, layout))
        if any((ep, r, layout) not in self._outputs for r in range(ep)):
            row.fail("a rank's run failed: nothing to combine", "crash")
            return row
        total = self.problem.routing.num_tokens
        out = combine(views, [self._outputs[(ep, r, layout)] for r in range(ep)], total)
        faithful = combine(views, [self.references(ep, r)[0] for r in range(ep)], total)
        exact = moe_reference(self.problem.x, self.problem.routing.topk_ids, self.problem.routing.topk_weights,
                              self.problem.w13, self.problem.w2, mode="exact")
        ids = self.problem.routing.topk_ids.to(out.device)
        row.metrics = compare(out, faithful, exact, ids)
        self._judge(row, bands.combine_bands(*self._hidden_inter()), ids, torch.arange(total), ids, expert_offset=0)
        return row

    def _hidden_inter(self) -> tuple[int, int]:
        return self.problem.sizes.hidden, self.problem.sizes.inter

    def _judge(self, row: Row, table, local_ids, token_index, global_ids, expert_offset: int) -> None:
        m = row.metrics
        verdict, notes = bands.judge(m, table, rows=int((local_ids >= 0).any(dim=1).sum()))
        for note in notes:
            if note.endswith("(FAIL)"):
                row.fail(note, f"band:{note.split('=')[0]}")
            else:
                row.notes.append(note)
        if verdict == bands.WARN and row.verdict == bands.PASS:
            row.verdict = bands.WARN
        if m.worst_row >= 0:
            experts = global_ids[m.worst_row]
            rank = "all" if row.rank is None else row.rank
            row.worst = (f"token {int(token_index[m.worst_row])} experts {experts[experts >= 0].tolist()} "
                         f"rank {rank} {row.layout}; worst expert {m.worst_expert + expert_offset}")


def sweep(case: Case, impl: Callable, *, seed: int = 0, device: str = "cpu", scale: str | None = None, ep_sizes=None,
          ranks=None, layouts=LAYOUTS) -> Iterator[Row]:
    """Run every row of `case` (optionally restricted) for `impl`; yields rows as they finish."""
    scale = scale or default_scale(device)
    runner = Sweep(case, impl, seed=seed, device=device, scale=scale)
    for target in targets(case, scale, ep_sizes, ranks, layouts):
        yield runner.run(target)
