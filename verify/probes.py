"""The sweep's extra runs of a row, declared: one Probe per way of running an implementation again, with what it
transforms and what it expects. The sweep runs every probe that applies after the plain run of a row, and each probe
returns its findings (verify/findings.py); none writes into the sweep. Adding a check = adding a Probe to PROBES.

A probe that needs the implementation's stages runs only for implementations that expose them (a `stages=` keyword
whose default is a kernels.Stages, like kernels.moe_expert_forward); it composes the tester's hooks with the
implementation's own stages, so a mutant's bugged stage stays in place. Determinism, slot order and the threshold rule
are properties of the pipeline that the view does not change: those probes run on the DeepEP view's rows only; the
raw view's rows get the poisoned run (its layout check is where remote global ids meet the local-id mapping) and the
equivalent inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from kernels import Stages
from kernels.dispatch import M_ALIGNMENT, Dispatch, Layout
from reference import moe_reference
from reference.rounding import PRODUCTION, Rounding
from reference.routing import RankView, ViewKind
from verify import bands, checks, errormodel
from verify.findings import Check, Finding, Verdict, failure
from verify.impls import Implementation
from verify.metrics import compare

RERUNS = {"cuda": 3, "cpu": 1}  # plain reruns that must reproduce the output bit for bit


@dataclasses.dataclass
class Seen:
    """What the tester's after-scatter hook saw during one run."""

    layouts: list[Layout] = dataclasses.field(default_factory=list)  # the layout of every scatter, in order
    problems: list[str] = dataclasses.field(default_factory=list)  # layout-contract breaks

    def findings(self) -> list[Finding]:
        return [failure(Check.LAYOUT, f"layout: {p}") for p in dict.fromkeys(self.problems)]


@dataclasses.dataclass
class Trial:
    """One rank row: the implementation, the rank view it runs on, that view's weights, its references and the bands
    it is held to. Inputs are saved on creation; `inputs_modified` compares them bit for bit and puts them back.

    `declared`: the rounding was declared (the bands against its faithful reference decide), or found by `auto`
    (where those bands fail, the error model decides: `verdicts`)."""

    impl: Implementation
    view: RankView
    w13: torch.Tensor
    w2: torch.Tensor
    layout: Layout | None  # None: the implementation has no layouts
    seed: int
    references: tuple[torch.Tensor, torch.Tensor] = ()  # (faithful, exact) for this view
    table: tuple = ()  # the verify.bands.Band table this row is judged by
    gate_up_order: str = "gate_up"
    rounding: Rounding = PRODUCTION  # the placement the faithful reference follows
    declared: bool = True
    budget_of: Callable[[], errormodel.Budget] | None = None  # the error model's budget, when someone keeps it

    def __post_init__(self):
        self._saved = [t.clone() for t in self.inputs]
        self._budget = None

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.view.x, self.view.topk_ids, self.view.topk_weights, self.w13, self.w2

    @property
    def device_type(self) -> str:
        return self.view.x.device.type

    @property
    def stages(self) -> Stages | None:
        return self.impl.stages

    def call(self, inputs=None, **options) -> torch.Tensor:
        """The implementation on this view (or on `inputs` standing for it), in this row's layout and gate/up order
        unless `options` say otherwise; it is given only the keywords it takes (verify/impls.py)."""
        v = self.view
        given = dict(ep_size=v.ep_size, ep_rank=v.rank, num_experts=v.num_experts, gate_up_order=self.gate_up_order)
        if self.layout is not None:
            given["layout"] = str(self.layout)
        return self.impl(*(inputs or self.inputs), **{**given, **options})

    def faithful(self, rounding: Rounding) -> torch.Tensor:
        """The faithful reference of this view under another rounding profile."""
        v = self.view
        return moe_reference(*self.inputs, ep_size=v.ep_size, ep_rank=v.rank, num_experts=v.num_experts,
                             gate_up_order=self.gate_up_order, mode="faithful", rounding=rounding)

    def budget(self) -> errormodel.Budget:
        """What honest rounding may do to this view's output (verify/errormodel.py)."""
        if self._budget is None:
            self._budget = (self.budget_of() if self.budget_of else
                            errormodel.budget_of_view(self.view, self.w13, self.w2, self.gate_up_order))
        return self._budget

    def judge(self, out: torch.Tensor) -> list[Finding]:
        """The findings for an output of this view: the bands', as `verdicts` applies them."""
        return self.verdicts(out, bands.judge(compare(out.float(), *self.references, self.view.local_ids()),
                                              self.table))

    def verdicts(self, out: torch.Tensor, findings: list[Finding]) -> list[Finding]:
        """The band findings as they judge: all of them for a declared rounding, or where the faithful bands pass;
        otherwise (auto, no convention holds) the error model's findings in place of the rounding bands'."""
        return tiered(findings, self.table, self.declared, lambda: errormodel.judge(out, self.budget()))

    def call_hooked(self, transform: Callable[[Dispatch], Dispatch] = lambda d: d, **options):
        """(output, Seen) of a run with every buffer poisoned, padding rows poisoned after the scatter, the layout
        contract checked on every dispatch, and `transform` applied to the dispatch before the GEMMs."""
        seen, base, local_ids = Seen(), self.stages, self.view.local_ids()

        def after_scatter(dispatch):
            dispatch = base.after_scatter(dispatch)
            seen.layouts.append(dispatch.layout)
            seen.problems.extend(checks.layout_problems(dispatch, self.view.x, local_ids, M_ALIGNMENT))
            return transform(checks.poison_padding(dispatch))

        stages = dataclasses.replace(base, after_scatter=after_scatter, empty=checks.poisoned_empty)
        return self.call(stages=stages, **options), seen

    def inputs_modified(self) -> bool:
        """True if a run wrote into an input; the inputs are restored either way."""
        modified = not all(checks.bitwise_equal(t, s) for t, s in zip(self.inputs, self._saved, strict=True))
        if modified:
            checks.restore(self.inputs, self._saved)
        return modified


def tiered(findings: list[Finding], table, declared: bool, error_model: Callable[[], list[Finding]]) -> list[Finding]:
    """The convention tier (the bands against the faithful reference of the rounding found) where it holds, else the
    error model's tier: the bands that assume a convention (against the faithful or the exact reference) are set
    aside (kept as PASS, marked so) and the error model's findings judge instead (docs/error-model.md)."""
    rounding_bands = {b.metric for b in table if b.against != "-"}
    missed = [f for f in findings if f.metric in rounding_bands and f.verdict is not Verdict.PASS]
    if declared or not missed:
        return findings
    aside = [dataclasses.replace(f, verdict=Verdict.PASS, message=f"{f.message} [set aside: no known convention]")
             if f in missed else f for f in findings]
    note = Finding(Check.ROUNDING, Verdict.PASS, "no known convention holds here ("
                   + ", ".join(f.metric for f in missed) + " against the closest): judged by the error model")
    return aside + [note] + error_model()


@dataclasses.dataclass(frozen=True)
class Probe:
    name: str
    check: Check  # the check its findings belong to (a crash in its run is reported under it too)
    transforms: str  # how its run differs from the plain run
    expects: str  # what must hold
    observe: Callable[[Trial, torch.Tensor], list[Finding]]  # (trial, the plain run's output) -> findings
    needs_stages: bool = True
    applies: Callable[[Trial], bool] = lambda trial: True
    views: tuple[ViewKind, ...] = tuple(ViewKind)  # the rank views it runs on

    def run(self, trial: Trial, out: torch.Tensor) -> list[Finding]:
        if (self.needs_stages and trial.stages is None) or trial.view.kind not in self.views or not self.applies(trial):
            return []
        try:
            findings = self.observe(trial, out)
        except torch.OutOfMemoryError:
            raise  # no verdict, as in sweep.judge_rank
        except Exception as exc:  # a crash is a finding, not an abort of the sweep
            findings = [failure(self.check, f"{self.name} run raised {type(exc).__name__}: {exc}")]
        if trial.inputs_modified():
            findings.append(failure(Check.INPUTS, f"the {self.name} run modified an input"))
        return findings


def _rerun(trial: Trial, out: torch.Tensor) -> list[Finding]:
    for _ in range(RERUNS.get(trial.device_type, 1)):
        if not checks.bitwise_equal(trial.call(), out):
            return [failure(Check.RERUN, "nondeterministic: a rerun on the same inputs differs")]
    return []


def _poisoned(trial: Trial, out: torch.Tensor) -> list[Finding]:
    again, seen = trial.call_hooked()
    same = checks.bitwise_equal(again, out)
    return ([] if same else [failure(Check.POISONED, "poisoned buffers changed the output (a stage reads memory "
                                                     "nobody wrote)")]) + seen.findings()


def _permuted(trial: Trial, out: torch.Tensor) -> list[Finding]:
    generator = torch.Generator().manual_seed(trial.seed)
    again, seen = trial.call_hooked(lambda d: checks.permute_segments(d, generator))
    same = checks.bitwise_equal(again, out)
    return ([] if same else [failure(Check.PERMUTED, "a legal slot permutation changed the output "
                                                     "(order-dependent)")]) + seen.findings()


def _auto_threshold(trial: Trial, out: torch.Tensor) -> list[Finding]:
    findings, num_tokens = [], trial.view.num_tokens
    for limit in (num_tokens, num_tokens - 1):
        _, seen = trial.call_hooked(layout="auto", masked_max_tokens=limit)
        want = Layout.MASKED if limit >= num_tokens else Layout.CONTIGUOUS
        if seen.layouts and seen.layouts[-1] != want:  # (nothing scattered: no layout to check)
            findings.append(failure(Check.LAYOUT_CHOICE, f"layout='auto' with masked_max_tokens={limit} and "
                                    f"M={num_tokens} took the {seen.layouts[-1]} path, the contract says {want}"))
        findings += seen.findings()
    return findings


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, not contiguous: every other element of a buffer twice as wide (NaN in between)."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan") if t.dtype.is_floating_point else -7,
                      dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _other_int(ids: torch.Tensor) -> torch.Tensor:
    return ids.to(torch.int64 if ids.dtype == torch.int32 else torch.int32)


def _swapped_halves(w13: torch.Tensor) -> torch.Tensor:
    return torch.cat(w13.chunk(2, dim=1)[::-1], dim=1)


def _equivalents(trial: Trial) -> dict[str, Callable[[tuple, dict], tuple[tuple, dict]]]:
    """Ways to present the same computation differently: each maps (inputs, options) to new ones."""
    out = {
        "non-contiguous x, ids and weights": lambda i, o: ((_strided(i[0]), _strided(i[1]), _strided(i[2]), *i[3:]),
                                                           o),
        "ids in the other integer dtype": lambda i, o: ((i[0], _other_int(i[1]), *i[2:]), o),
    }
    if trial.impl.takes("gate_up_order"):
        other = "up_gate" if trial.gate_up_order == "gate_up" else "gate_up"
        out["w13 halves swapped, gate_up_order swapped"] = lambda i, o: ((*i[:3], _swapped_halves(i[3]), i[4]),
                                                                         dict(o, gate_up_order=other))
    return out


def _equivalent_inputs(trial: Trial, out: torch.Tensor) -> list[Finding]:
    failing = {f.metric for f in trial.judge(out) if f.verdict is Verdict.FAIL}  # the plain run's: reported already

    def failures(names):
        inputs, options = trial.inputs, {}
        for name in names:
            inputs, options = ways[name](inputs, options)
        return [f for f in trial.judge(trial.call(inputs, **options))
                if f.verdict is Verdict.FAIL and f.metric not in failing]

    ways = _equivalents(trial)
    if not failures(list(ways)):
        return []
    guilty = [name for name in ways if failures([name])] or list(ways)  # name the presentations that break it alone
    return [failure(Check.EQUIVALENT, f"with {name}: " + "; ".join(f.message for f in failures([name])))
            for name in guilty]


PROBES: tuple[Probe, ...] = (
    Probe("rerun", Check.RERUN, "the same call again (1x on a CPU, 3x on a GPU)", "bit-identical output",
          _rerun, needs_stages=False, views=(ViewKind.DEEPEP,)),
    Probe("poisoned", Check.POISONED, "every buffer the pipeline allocates filled with NaN (floats) / -2 (ints), "
          "padding rows set to NaN after the scatter", "bit-identical output; the layout contract holds", _poisoned),
    Probe("permuted", Check.PERMUTED, "the rows inside every expert segment permuted at random, with output_index "
          "(another order GPU atomics could give)", "bit-identical output; the layout contract holds", _permuted,
          views=(ViewKind.DEEPEP,)),
    Probe("auto-threshold", Check.LAYOUT_CHOICE, "layout='auto' with masked_max_tokens = M, then M - 1",
          "the masked path at M, the contiguous path at M - 1 (the threshold rule); the layout contract holds",
          _auto_threshold, applies=lambda trial: trial.layout is Layout.MASKED and trial.view.num_tokens > 1,
          views=(ViewKind.DEEPEP,)),
    Probe("equivalent-inputs", Check.EQUIVALENT, "the same inputs presented otherwise, all at once: x, topk_ids and "
          "topk_weights not contiguous, the ids in the other integer dtype, and (where the implementation takes "
          "gate_up_order) w13's halves swapped with gate_up_order", "no band fails that the plain run passes (on a "
          "failure, each presentation is retried alone and the guilty ones are named)", _equivalent_inputs,
          needs_stages=False),
)
