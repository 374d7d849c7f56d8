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
from reference.moe import faithful_space
from reference.rounding import PRODUCTION, PROFILES, SPACE, Rounding, rounding_profile
from reference.routing import RankView, ViewKind, combine
from verify import bands, errormodel
from verify.cases import Case, Problem, make_problem
from verify.findings import Check, Finding, Verdict, failure, worst
from verify.impls import Implementation, implementation
from verify.metrics import Metrics, compare, rel_l2
from verify.probes import PROBES, Probe, Trial, tiered


@dataclasses.dataclass(frozen=True)
class Locus:
    """Where an output's worst row is: the token (its index in the global batch), its experts, and the expert whose
    rows came closest to (or furthest over) the per-expert band."""

    token: int
    experts: tuple[int, ...]  # the token's GLOBAL expert ids on this rank (all of them for a combined row)
    rank: int | None  # None: the combine of all ranks
    layout: Layout | None
    view: ViewKind = ViewKind.DEEPEP
    local_expert: int | None = None
    global_expert: int | None = None

    def describe(self) -> str:
        rank = "all" if self.rank is None else self.rank
        layout = "" if self.layout is None else f" {self.layout}"
        text = f"token {self.token} experts {list(self.experts)} rank {rank}{layout}, {self.view} view"
        if self.global_expert is not None:
            text += (f"; worst expert: global {self.global_expert}" if self.rank is None else
                     f"; worst expert: local {self.local_expert} = global {self.global_expert}")
        return text

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), layout=self.layout and str(self.layout), view=str(self.view))


@dataclasses.dataclass
class Row:
    case: str
    ep_size: int
    rank: int | None  # None: the combine of all ranks
    layout: Layout | None  # None: an implementation without layouts
    num_tokens: int
    view: ViewKind = ViewKind.DEEPEP
    findings: list[Finding] = dataclasses.field(default_factory=list)  # every band's, and every other problem
    metrics: Metrics | None = None
    locus: Locus | None = None

    @property
    def test_id(self) -> str:
        """case-ep{N}-rank{R}-layout, with a -raw suffix for a raw-view row (no suffix: the DeepEP view), and no
        layout for an implementation without layouts."""
        rank = "all" if self.rank is None else f"rank{self.rank}"
        layout = "" if self.layout is None else f"-{self.layout}"
        view = "" if self.view is ViewKind.DEEPEP else f"-{self.view}"
        return f"{self.case}-ep{self.ep_size}-{rank}{layout}{view}"

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
    layout: Layout | None
    view: ViewKind = ViewKind.DEEPEP


def default_scale(device: str) -> str:
    """Case sizes to use on a device: realistic on a GPU, small for the CPU interpreter."""
    return "gpu" if torch.device(device).type == "cuda" else "cpu"


def targets(case: Case, scale: str, ep_sizes=None, ranks=None, layouts=LAYOUTS, views=tuple(ViewKind)) -> list[Target]:
    """The rows of a case, per ep_size: for each view (raw only when ep_size > 1) and layout, every rank, then the
    combine of all ranks when ep_size > 1. `layouts=(None,)`: one row where an implementation has no layouts."""
    out = []
    for ep in case.sweep_ep_sizes(scale) if ep_sizes is None else ep_sizes:
        for view in (ViewKind(v) for v in views):
            if view is ViewKind.RAW and ep == 1:
                continue  # one rank holds every expert: the raw view is the DeepEP view
            for layout in (None if lay is None else Layout(lay) for lay in layouts):
                for rank in range(ep):
                    if ranks is None or rank in ranks:
                        out.append(Target(ep, rank, layout, view))
                if ep > 1 and ranks is None:
                    out.append(Target(ep, None, layout, view))
    return out


def judge_rank(row: Row, trial: Trial, probes: tuple[Probe, ...] = PROBES,
               until_failure: bool = False) -> torch.Tensor | None:
    """Run the implementation on the trial's rank view, judge its output with the trial's bands against its
    references, run every probe; the findings go into `row`. Returns the output (None if there is none).
    `until_failure`: stop at the first failing check (enough for a search that only asks whether the row fails)."""
    view = trial.view
    try:
        out = trial.call()
    except torch.OutOfMemoryError:
        raise  # says nothing of the implementation: no verdict (the caller reports it)
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
    metrics = compare(out.float(), *trial.references, view.local_ids())
    judge(row, metrics, trial.verdicts(out, bands.judge(metrics, trial.table)), view.token_index, view.topk_ids,
          expert_offset=view.rank * view.num_local_experts)
    row.add(explain_rounding(row, trial, out))
    for probe in probes:
        if until_failure and row.verdict is Verdict.FAIL:
            break
        row.add(probe.run(trial, out))
    return out


def explain_rounding(row: Row, trial: Trial, out: torch.Tensor) -> list[Finding]:
    """When only faithful bands fail, say which bands passed (the exact ones included) and which rounding profile
    the output came closest to: the difference between "rounds elsewhere" and "broken" in one line."""
    failed = [f for f in row.findings if f.verdict is Verdict.FAIL and f.check is Check.BAND]
    against = {b.metric: b.against for b in trial.table}
    if not trial.declared or not failed or any(against[f.metric] != "faithful" for f in failed):
        return []
    routed = (trial.view.local_ids() >= 0).any(dim=1)
    errors = {name: rel_l2(out.float()[routed].double(), trial.faithful(profile)[routed].double())
              for name, profile in PROFILES.items()}
    closest = min(errors, key=errors.get)
    passed = ", ".join(f.metric for f in row.findings if f.check is Check.BAND and f.verdict is not Verdict.FAIL)
    return [failure(Check.ROUNDING, f"matches no rounding profile: faithful bands fail against {trial.rounding.name}; "
                    f"passed: {passed}; closest profile {closest} (l2 {errors[closest] / bands.U_BF16:.2f}u)")]


def judge(row: Row, metrics: Metrics, findings: list[Finding], token_index, global_ids, expert_offset: int) -> None:
    """The row's metrics and findings, and where the worst row is."""
    row.metrics = metrics
    row.add(findings)
    if metrics.worst_row >= 0:
        experts = global_ids[metrics.worst_row]
        expert = row.band("expert_err").expert
        row.locus = Locus(int(token_index[metrics.worst_row]), tuple(experts[experts >= 0].tolist()), row.rank,
                          row.layout, row.view, expert, None if expert is None else expert + expert_offset)


@dataclasses.dataclass(frozen=True)
class RoundingChoice:
    """The placement a sweep judges by: declared, or found by `auto`, which searches the whole space of placements
    (reference.rounding.SPACE) for the one whose faithful reference one run of the implementation matches best."""

    profile: Rounding
    declared: bool
    matched: bool = True  # auto: the placement found passes the faithful bands on that run (a convention holds)
    faithful_l2: dict[str, float] = dataclasses.field(default_factory=dict)  # auto: the named profiles' and the best
    exact_l2: float | None = None  # auto: the run's rel L2 against the exact reference
    production_exact_l2: float | None = None  # auto: production's (its faithful reference's) on the same inputs
    crash: str | None = None  # auto: how the run raised (then production; a row reports it)

    def findings(self) -> list[Finding]:
        """The detection run's crash, for a row to report: an implementation that raises once is broken, even when
        the calls the rows judge succeed."""
        return [] if self.crash is None else [failure(Check.CRASH, f"the rounding detection's run {self.crash}")]

    def describe(self) -> str:
        if self.declared:
            return f"rounding {self.profile.name} (declared)"
        if self.crash is not None:
            return f"rounding auto -> {self.profile.name} (the detection's run {self.crash})"
        accuracy = (f"against the exact reference {_u(self.exact_l2)}, production's on the same inputs "
                    f"{_u(self.production_exact_l2)}")
        if self.matched:
            return f"rounding auto -> convention {self.profile.describe()}; {accuracy}"
        return (f"rounding auto -> no known convention: judged by the error model (docs/error-model.md), the closest "
                f"placement {self.profile.name} at {_u(self.faithful_l2.get(self.profile.name))}; {accuracy}")

    def as_dict(self) -> dict:
        return dict(profile=self.profile.name, words=self.profile.words(), declared=self.declared,
                    matched=self.matched, faithful_l2=self.faithful_l2, exact_l2=self.exact_l2,
                    production_exact_l2=self.production_exact_l2, crash=self.crash)


def _u(value: float | None) -> str:
    return "-" if value is None else f"{value / bands.U_BF16:.2f}u"


def detect_rounding(trial: Trial) -> RoundingChoice:
    """The placement of the whole space whose faithful reference one run of the trial's implementation matches best
    (ties: the first in reference.rounding.SPACE, the named profiles first), and whether it holds (the faithful
    bands pass on that run); production when the run fails (a raise is kept as `crash`, for a row to report; a wrong
    output is judged by the rows)."""
    try:
        out = trial.call()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        return RoundingChoice(PRODUCTION, declared=False, crash=f"raised {type(exc).__name__}: {exc}")
    finally:
        trial.inputs_modified()
    if not isinstance(out, torch.Tensor) or out.shape != trial.view.x.shape:
        return RoundingChoice(PRODUCTION, declared=False)
    v = trial.view
    routed = (v.local_ids() >= 0).any(dim=1)
    rows = out.double()[routed]
    errors: dict[str, float] = {}
    best = best_ref = production_ref = None
    for point, ref in faithful_space(*trial.inputs, ep_size=v.ep_size, ep_rank=v.rank, num_experts=v.num_experts,
                                     gate_up_order=trial.gate_up_order):
        errors[point.name] = rel_l2(rows, ref.double()[routed])
        if point is PRODUCTION:
            production_ref = ref
        if best is None or _rank(point, errors) < _rank(best, errors):
            best, best_ref = point, ref
    exact = trial.references[1]
    matched = all(f.verdict is not Verdict.FAIL for f in bands.judge(
        compare(out.float(), best_ref, exact, v.local_ids()), trial.table))
    return RoundingChoice(best, False, matched, {n: e for n, e in errors.items() if n in PROFILES or n == best.name},
                          rel_l2(rows, exact.double()[routed]),
                          rel_l2(production_ref.double()[routed], exact.double()[routed]))


_SPACE_INDEX = {point.name: i for i, point in enumerate(SPACE)}


def _rank(point: Rounding, errors: dict[str, float]) -> tuple[float, int]:
    """The smaller error first, then the earlier point of SPACE (the named profiles first)."""
    return errors[point.name], _SPACE_INDEX[point.name]


class Sweep:
    """Runs rows of one case for one implementation; rank views and references are built once and shared.

    rounding: a placement (reference/rounding.py) or its name, declared; or "auto": the placement whose faithful
    reference one run of the implementation matches best (the ep_size = 1 view when the case has it, or rank 0's),
    the error model judging where it does not hold (verify/errormodel.py)."""

    def __init__(self, case: Case, impl: Callable | Implementation, *, seed: int = 0, device: str = "cpu",
                 scale: str | None = None, probes: tuple[Probe, ...] = PROBES, rounding: Rounding | str = PRODUCTION):
        self.case, self.seed, self.device, self.probes = case, seed, device, probes
        self.impl = implementation(impl)
        self.scale = scale or default_scale(device)
        self.problem: Problem = make_problem(case, seed, device, self.scale)
        self._views: dict[tuple[int, int, ViewKind], RankView] = {}
        self._refs: dict[tuple[int, int, ViewKind], tuple[torch.Tensor, torch.Tensor]] = {}
        self._outputs: dict[Target, torch.Tensor] = {}
        self._budgets: dict[tuple[int, int, ViewKind], errormodel.Budget] = {}
        self.rounding = RoundingChoice(PRODUCTION, declared=True)  # what the detection's own run is built with
        if rounding == "auto":
            self.rounding = self._detect()
        else:
            self.rounding = RoundingChoice(rounding_profile(rounding), declared=True)
        self._unreported = self.rounding.findings()

    def targets(self, ep_sizes=None, ranks=None, layouts=LAYOUTS, views=tuple(ViewKind)) -> list[Target]:
        """This case's rows for this implementation (one row per rank and view where it has no layouts)."""
        return targets(self.case, self.scale, ep_sizes, ranks, layouts if self.impl.has_layouts else (None,), views)

    def _detect(self) -> RoundingChoice:
        target = self.targets(ep_sizes=self.case.sweep_ep_sizes(self.scale)[:1], ranks=(0,),
                              views=(ViewKind.DEEPEP,))[0]
        return detect_rounding(self._trial(target, PRODUCTION))

    def view(self, ep_size: int, rank: int, kind: ViewKind = ViewKind.DEEPEP) -> RankView:
        key = (ep_size, rank, kind)
        if key not in self._views:
            self._views[key] = self.problem.view(self.case, ep_size, rank, kind)
        return self._views[key]

    def references(self, ep_size: int, rank: int, kind: ViewKind = ViewKind.DEEPEP,
                   rounding: Rounding | None = None):
        """(faithful, exact) references of one rank view, the faithful one under the sweep's profile."""
        rounding = rounding or self.rounding.profile
        key = (ep_size, rank, kind, rounding.name)
        if key not in self._refs:
            view = self.view(ep_size, rank, kind)
            w13, w2 = self.problem.rank_weights(ep_size, rank)
            self._refs[key] = tuple(
                moe_reference(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=ep_size, ep_rank=rank,
                              num_experts=self.problem.sizes.num_experts, mode=mode, rounding=rounding)
                for mode in ("faithful", "exact"))
        return self._refs[key]

    def budget(self, ep_size: int, rank: int, kind: ViewKind = ViewKind.DEEPEP) -> errormodel.Budget:
        """The error model's budget of one rank view."""
        key = (ep_size, rank, kind)
        if key not in self._budgets:
            self._budgets[key] = errormodel.budget_of_view(self.view(ep_size, rank, kind),
                                                           *self.problem.rank_weights(ep_size, rank))
        return self._budgets[key]

    def run(self, target: Target) -> Row:
        row = self._run_combine(target) if target.rank is None else self._run_rank(target)
        row.add(self._unreported)  # the rounding detection's crash, on the first row run
        self._unreported = []
        return row

    def _trial(self, target: Target, rounding: Rounding | None = None) -> Trial:
        rounding = rounding or self.rounding.profile
        view = self.view(target.ep_size, target.rank, target.view)
        return Trial(self.impl, view, *self.problem.rank_weights(target.ep_size, target.rank), target.layout,
                     self.seed, references=self.references(target.ep_size, target.rank, target.view, rounding),
                     table=bands.bands_for(*self._hidden_inter()), rounding=rounding,
                     declared=self.rounding.declared,
                     budget_of=lambda: self.budget(target.ep_size, target.rank, target.view))

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
            except torch.OutOfMemoryError:
                raise
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
        if any(not isinstance(o, torch.Tensor) or o.shape != v.x.shape for o, v in zip(outputs, views, strict=True)):
            row.add([failure(Check.CRASH, "a rank's run failed or gave no [M, H] output: nothing to combine")])
            return row
        total = self.problem.routing.num_tokens
        out = combine(views, outputs, total)
        faithful = combine(views, [self.references(ep, r, kind)[0] for r in range(ep)], total)
        exact = moe_reference(self.problem.x, self.problem.routing.topk_ids, self.problem.routing.topk_weights,
                              self.problem.w13, self.problem.w2, mode="exact")
        ids = self.problem.routing.topk_ids.to(out.device)
        metrics, table = compare(out, faithful, exact, ids), bands.combine_bands(*self._hidden_inter())

        def error_model():
            budgets = [self.budget(ep, r, kind) for r in range(ep)]
            return errormodel.judge(out, errormodel.combine(budgets, [v.token_index for v in views], total))

        judge(row, metrics, tiered(bands.judge(metrics, table), table, self.rounding.declared, error_model),
              torch.arange(total), ids, expert_offset=0)
        return row

    def _hidden_inter(self) -> tuple[int, int]:
        return self.problem.sizes.hidden, self.problem.sizes.inter
