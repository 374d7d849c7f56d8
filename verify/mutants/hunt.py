"""Hunting mutants: run the sweep of selected cases against one implementation and record which check failed first.

Alongside our checks, two naive ones are scored on the same runs, as other suites would apply them: DeepGEMM's
global calc_diff < 1e-3 against the exact reference, and torch.testing's default bf16 assert_close (rtol 1.6e-2,
atol 1e-5) against it. A naive check "misses" a mutant when it passes every row the mutant produced (a crash is
seen by everyone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from verify import bands
from verify.cases import CASES_BY_NAME
from verify.sweep import Row, Sweep, default_scale, targets

HUNT_CASES = ("skewed", "padded", "boundary")  # every stage and axis: ep 1/2/4, an empty rank, 127/128/129 rows
CALC_DIFF_THRESHOLD = 1e-3  # DeepGEMM's tests


@dataclasses.dataclass
class Hunt:
    name: str
    rows: int = 0
    failed_rows: int = 0
    killed_by: str = ""  # the first check that failed, on the first failing row
    where: str = ""  # that row, and its worst token
    calc_diff_fails: int = 0  # rows the naive calc_diff check fails (or crashes)
    allclose_fails: int = 0  # rows the naive default assert_close fails (or crashes)

    @property
    def killed(self) -> bool:
        return self.failed_rows > 0

    @property
    def missed_by_calc_diff(self) -> bool:
        return self.calc_diff_fails == 0

    @property
    def missed_by_allclose(self) -> bool:
        return self.allclose_fails == 0

    def record(self, row: Row) -> None:
        self.rows += 1
        m = row.metrics
        crashed = "crash" in row.checks
        self.calc_diff_fails += crashed or (m is not None and not m.calc_diff < CALC_DIFF_THRESHOLD)
        self.allclose_fails += crashed or (m is not None and not m.default_allclose)
        if row.verdict == bands.FAIL:
            self.failed_rows += 1
            if not self.killed_by:
                self.killed_by = row.checks[0]
                self.where = f"{row.test_id}: {row.worst}" if row.worst else row.test_id


def hunt(name: str, impl: Callable, *, cases=HUNT_CASES, seed: int = 0, device: str = "cpu",
         on_row: Callable[[], None] = lambda: None) -> Hunt:
    """Every row of `cases` for `impl` (no early stop: the naive checks are scored on all of them)."""
    result = Hunt(name)
    scale = default_scale(device)
    for case_name in cases:
        case = CASES_BY_NAME[case_name]
        runner = Sweep(case, impl, seed=seed, device=device, scale=scale)
        for target in targets(case, scale):
            result.record(runner.run(target))
            on_row()
    return result


def rows_per_hunt(cases=HUNT_CASES, device: str = "cpu") -> int:
    scale = default_scale(device)
    return sum(len(targets(CASES_BY_NAME[c], scale)) for c in cases)
