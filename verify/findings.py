"""What the tester concludes, as data: verdicts, the kinds of check, and one Finding per thing a check saw.

A row of the sweep is a list of findings (verify/sweep.py); its verdict is the worst of them. Nothing downstream
parses text: the table, the JSON, the mutant hunt and the gate read these fields.
"""

from __future__ import annotations

import dataclasses
import enum


class Verdict(enum.IntEnum):
    """Ordered: the worst of several verdicts is their max."""

    PASS = 0
    WARN = 1  # outside the honest band, inside the failing one: passes, and is shown
    FAIL = 2

    def __str__(self) -> str:
        return self.name


class Check(enum.Enum):
    """Which check produced a finding."""

    BAND = "band"  # a tolerance band on an error metric (verify/bands.py)
    CRASH = "crash"  # the implementation raised
    INPUTS = "inputs"  # an input was modified
    OUTPUT = "output"  # wrong output type, dtype or shape
    RERUN = "rerun"  # the same call gave other bits
    POISONED = "poisoned"  # poisoned buffers changed the output
    PERMUTED = "permuted"  # a legal slot permutation changed the output
    LAYOUT = "layout"  # the scatter broke the layout contract
    LAYOUT_CHOICE = "layout-choice"  # layout="auto" broke the threshold rule
    EQUIVALENT = "equivalent-inputs"  # the same inputs presented otherwise (strides, id dtype, gate/up order) fail
    ROUNDING = "rounding"  # which rounding convention judged the row, or why none did
    ERROR_MODEL = "error-model"  # the error model of the stage: honest rounding or structure (verify/errormodel.py)
    DISPATCH = "dispatch"  # verify.dist: a token at the wrong rank, twice, missing, or altered on the wire

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Finding:
    """One check's outcome. Band findings also carry the metric, its raw value and the bound it was held to."""

    check: Check
    verdict: Verdict
    message: str
    metric: str | None = None  # band findings: the verify.metrics.Metrics quantity judged
    value: float | None = None  # its value, raw (as measured; any widening is in `limit`)
    limit: float | None = None  # the bound that decided: FAIL's bound when it failed, else PASS's bound
    expert: int | None = None  # per-expert band: the LOCAL expert closest to (or furthest over) its bound
    evidence: dict | None = None  # error-model findings: the test, its part of the output, statistic and bound

    @property
    def kind(self) -> str:
        """Short name of the check: "band:row_err", "layout", "rerun", ..."""
        return f"band:{self.metric}" if self.check is Check.BAND else self.check.value

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), check=self.check.value, verdict=self.verdict.name, kind=self.kind)


def failure(check: Check, message: str) -> Finding:
    return Finding(check, Verdict.FAIL, message)


def worst(findings, default: Verdict = Verdict.PASS) -> Verdict:
    """The worst verdict among `findings` (PASS for none)."""
    return max((f.verdict for f in findings), default=default)
