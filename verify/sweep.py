"""The sweep: case -> global routing -> ep x rank views -> implementation -> compare -> combine -> compare.

For each ep_size of the case and each rank, the implementation runs on the rank's view in each layout: the DeepEP
view (remote ids -> -1, int64 ids) always, and for ep_size > 1 also the raw view (every token, the router's global
ids and weights, int32 ids; reference/routing.py). Its output is judged against the faithful and exact references of
that view (verify/bands.py), then every probe that applies runs it again (verify/probes.py). Then the ranks' outputs
are combined and judged against the ep_size = 1 references of the global batch ("all" rows). Every row is a list of
findings (verify/findings.py). `judge_rank` is the judgement of one rank's output, shared with verify.fuzz.

Skipped slots (id -1) carry NaN weights: the contract says they contribute nothing whatever their weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from kernels.dispatch import LAYOUTS, Layout
from reference import moe_reference
from reference.routing import VIEWS, RankView, ViewKind, combine, pad_view
from verify import bands, checks
from verify.cases import Case, Problem, make_problem
from verify.findings import Check, Finding, Verdict, failure, worst
from verify.metrics import Metrics, compare
from verify.probes import PROBES, Probe, Trial, own_stages


@dataclasses.dataclass(frozen=True)
class Locus:
    """Where an output's worst row is: the token (its index in the global batch), its experts, and the expert whose
    rows came closest to (or furthest over) the per-expert band."""

    token: int
    experts: tuple[int, ...]  # the token's GLOBAL expert ids on this rank (all of them for a combined row)
    rank: int | None  # None: the combine of all ranks
    layout: Layout
    view: ViewKind = ViewKind.DEEPEP
    local_expert: int | None = None
    global_expert: int | None = None

    def describe(self) -> str:
        rank = "all" if self.rank is None else self.rank
        text = f"token {self.token} experts {list(self.experts)} rank {rank} {self.layout}, {self.view} view"
        if self.global_expert is not None:
            text += (f"; worst expert: global {self.global_expert}" if self.rank is None else
                     f"; worst expert: local {self.local_expert} = global {self.global_expert}")
        return text

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), layout=str(self.layout), view=str(self.view))


@dataclasses.dataclass
class Row:
    case: str
    ep_size: int
    rank: int | None  # None: the combine of all ranks
    layout: Layout
    num_tokens: int
    view: ViewKind = ViewKind.DEEPEP
    findings: list[Finding] = dataclasses.field(default_factory=list)  # every band's, and every other problem
    metrics: Metrics | None = None
    locus: Locus | None = None

    @property
    def test_id(self) -> str:
        """case-ep{N}-rank{R}-layout, with a -raw suffix for a raw-view row (no suffix: the DeepEP view)."""
        rank = "all" if self.rank is None else f"rank{self.rank}"
        view = "" if self.view is ViewKind.DEEPEP else f"-{self.view}"
        return f"{self.case}-ep{self.ep_size}-{rank}-{self.layout}{view}"

    @property
    def verdict(self) -> Verdict:
        return worst(self.findings)

    @property
    def problems(self) -> list[Finding]:
        """The findings that are not a PASS, in the order they were found."""
        return [f for f in self.findings if f.verdict is not Verdict.PASS]

    @property
    def checks(self) -> list[str]:
        """The kinds of the failing findings, first first."""
        return [f.kind for f in self.findings if f.verdict is Verdict.FAIL]

    def band(self, metric: str) -> Finding | None:
        return next((f for f in self.findings if f.check is Check.BAND and f.metric == metric), None)

    def add(self, findings) -> None:
        for finding in findings:
            if finding not in self.findings:  # the same layout break seen by two probes is one finding
                self.findings.append(finding)

    def as_dict(self) -> dict:
        return dict(id=self.test_id, verdict=self.verdict.name, checks=self.checks,
                    findings=[f.as_dict() for f in self.findings],
                    locus=self.locus.as_dict() if self.locus else None,
                    metrics=self.metrics.as_dict() if self.metrics else None)


@dataclasses.dataclass(frozen=True)
class Target:
    """One row to run: ep_size, rank (None: combine), layout, view."""

    ep_size: int
    rank: int | None
    layout: Layout
    view: ViewKind = ViewKind.DEEPEP


def default_scale(device: str) -> str:
    """Case sizes to use on a device: realistic on a GPU, small for the CPU interpreter."""
    return "gpu" if torch.device(device).type == "cuda" else "cpu"


def targets(case: Case, scale: str, ep_sizes=None, ranks=None, layouts=LAYOUTS, views=tuple(ViewKind)) -> list[Target]:
    """The rows of a case, per ep_size: for each view (raw only when ep_size > 1) and layout, every rank, then the
    combine of all ranks when ep_size > 1."""
    out = []
    for ep in case.sweep_ep_sizes(scale) if ep_sizes is None else ep_sizes:
        for view in (ViewKind(v) for v in views):
            if view is ViewKind.RAW and ep == 1:
                continue  # one rank holds every expert: the raw view is the DeepEP view
            for layout in layouts:
                for rank in range(ep):
                    if ranks is None or rank in ranks:
                        out.append(Target(ep, rank, Layout(layout), view))
                if ep > 1 and ranks is None:
                    out.append(Target(ep, None, Layout(layout), view))
    return out


def judge_rank(row: Row, trial: Trial, probes: tuple[Probe, ...] = PROBES) -> torch.Tensor | None:
    """Run the implementation on the trial's rank view, judge its output with the trial's bands against its
    references, run every probe; the findings go into `row`. Returns the output (None if there is none)."""
    view = trial.view
    try:
        out = trial.call()
    except Exception as exc:  # a crash is a verdict, not an abort of the sweep
        row.add([failure(Check.CRASH, f"raised {type(exc).__name__}: {exc}")])
        trial.inputs_modified()  # (restores them for the next rows)
        return None
    if trial.inputs_modified():
        row.add([failure(Check.INPUTS, "an input was modified")])
    if not isinstance(out, torch.Tensor) or out.shape != view.x.shape or out.dtype != torch.bfloat16:
        row.add([failure(Check.OUTPUT, f"output must be bf16 {tuple(view.x.shape)}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")])
        return None
    judge(row, compare(out.float(), *trial.references, view.local_ids()), trial.table, view.token_index,
          view.topk_ids, expert_offset=view.rank * view.num_local_experts)
    for probe in probes:
        row.add(probe.run(trial, out))
    return out


def judge(row: Row, metrics: Metrics, table, token_index, global_ids, expert_offset: int) -> None:
    """The bands' findings for `metrics`, and where the worst row is."""
    row.metrics = metrics
    row.add(bands.judge(metrics, table))
    if metrics.worst_row >= 0:
        experts = global_ids[metrics.worst_row]
        expert = row.band("expert_err").expert
        row.locus = Locus(int(token_index[metrics.worst_row]), tuple(experts[experts >= 0].tolist()), row.rank,
                          row.layout, row.view, expert, None if expert is None else expert + expert_offset)


class Sweep:
    """Runs rows of one case for one implementation; rank views and references are built once and shared."""

    def __init__(self, case: Case, impl: Callable, *, seed: int = 0, device: str = "cpu", scale: str | None = None,
                 probes: tuple[Probe, ...] = PROBES):
        self.case, self.impl, self.seed, self.device, self.probes = case, impl, seed, device, probes
        self.problem: Problem = make_problem(case, seed, device, scale or default_scale(device))
        self.stages = own_stages(impl)
        self._views: dict[tuple[int, int, ViewKind], RankView] = {}
        self._refs: dict[tuple[int, int, ViewKind], tuple[torch.Tensor, torch.Tensor]] = {}
        self._outputs: dict[Target, torch.Tensor] = {}

    def view(self, ep_size: int, rank: int, kind: ViewKind = ViewKind.DEEPEP) -> RankView:
        key = (ep_size, rank, kind)
        if key not in self._views:
            view = VIEWS[kind](self.problem.x, self.problem.routing, ep_size, rank)
            if self.case.pad_views and kind is ViewKind.DEEPEP:
                view = pad_view(view, self.problem.routing.num_tokens)
            weights = checks.nan_weights_on_skipped_slots(view.topk_ids, view.topk_weights)
            self._views[key] = dataclasses.replace(view, topk_weights=weights)
        return self._views[key]

    def references(self, ep_size: int, rank: int, kind: ViewKind = ViewKind.DEEPEP):
        """(faithful, exact) references of one rank view."""
        key = (ep_size, rank, kind)
        if key not in self._refs:
            view = self.view(ep_size, rank, kind)
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

    def _trial(self, target: Target) -> Trial:
        view = self.view(target.ep_size, target.rank, target.view)
        return Trial(self.impl, view, *self.problem.rank_weights(target.ep_size, target.rank), target.layout,
                     self.seed, self.stages, references=self.references(target.ep_size, target.rank, target.view),
                     table=bands.bands_for(*self._hidden_inter()))

    def _run_rank(self, target: Target) -> Row:
        trial = self._trial(target)
        row = Row(self.case.name, target.ep_size, target.rank, target.layout, trial.view.num_tokens, target.view)
        out = judge_rank(row, trial, self.probes)
        if out is not None:
            self._outputs[target] = out
        return row

    def _rank_output(self, target: Target) -> torch.Tensor | None:
        """The rank's output: from its row when that ran, else from a plain run (its row judges it, not this one)."""
        if target not in self._outputs:
            trial = self._trial(target)
            try:
                self._outputs[target] = trial.call()
            except Exception:
                return None
            finally:
                trial.inputs_modified()  # (restores them)
        return self._outputs[target]

    def _run_combine(self, target: Target) -> Row:
        ep, layout, kind = target.ep_size, target.layout, target.view
        row = Row(self.case.name, ep, None, layout, self.problem.routing.num_tokens, kind)
        outputs = [self._rank_output(dataclasses.replace(target, rank=r)) for r in range(ep)]
        views = [self.view(ep, r, kind) for r in range(ep)]
        if any(o is None or o.shape != v.x.shape for o, v in zip(outputs, views, strict=True)):
            row.add([failure(Check.CRASH, "a rank's run failed or gave no [M, H] output: nothing to combine")])
            return row
        total = self.problem.routing.num_tokens
        out = combine(views, outputs, total)
        faithful = combine(views, [self.references(ep, r, kind)[0] for r in range(ep)], total)
        exact = moe_reference(self.problem.x, self.problem.routing.topk_ids, self.problem.routing.topk_weights,
                              self.problem.w13, self.problem.w2, mode="exact")
        ids = self.problem.routing.topk_ids.to(out.device)
        judge(row, compare(out, faithful, exact, ids), bands.combine_bands(*self._hidden_inter()),
              torch.arange(total), ids, expert_offset=0)
        return row

    def _hidden_inter(self) -> tuple[int, int]:
        return self.problem.sizes.hidden, self.problem.sizes.inter
