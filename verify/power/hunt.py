"""python -m verify.mutants [--only NAME ...] [--json PATH] [--seed S] [--list]: hunting mutants.

Runs the hunt cases against the unmutated pipeline (which must pass every row) and against every mutant of
verify/mutants.py (each must fail a row), and prints the kill matrix: the check that killed each mutant first
and where, whether DeepGEMM's global calc_diff or torch.testing's default assert_close would have missed it, the kill
rate and the survivors. Exit 0 when every mutant is killed and the unmutated pipeline passes, 1 otherwise, 2 on usage
errors.

Alongside our checks, the two naive ones are scored on the same runs, as other suites would apply them: DeepGEMM's
global calc_diff < 1e-3 against the exact reference, and torch.testing's default bf16 assert_close (rtol 1.6e-2,
atol 1e-5) against it. A naive check "misses" a mutant when it passes every row the mutant produced (a crash is
seen by everyone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable

from kernels import moe_expert_forward
from kernels._device import default_device
from verify.cases import CASES_BY_NAME
from verify.findings import Check, Verdict
from verify.mutants import MUTANTS, MUTANTS_BY_NAME
from verify.perf.results import provenance
from verify.sweep import Row, Sweep, Target, default_scale, targets

HUNT_CASES = ("skewed", "padded", "boundary")  # every stage and axis: ep 1/2/4, an empty rank, 127/128/129 rows
CALC_DIFF_THRESHOLD = 1e-3  # DeepGEMM's tests


@dataclasses.dataclass
class Hunt:
    name: str
    rows: int = 0
    failed_rows: int = 0
    killed_by: str = ""  # the first check that failed, on the first failing row
    where: str = ""  # that row, and its worst token
    killed_in: str = ""  # that row's case
    killed_at: Target | None = None  # and the row itself, to rerun it
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
        crashed = any(f.check is Check.CRASH for f in row.findings)
        self.calc_diff_fails += crashed or (m is not None and not m.calc_diff < CALC_DIFF_THRESHOLD)
        self.allclose_fails += crashed or (m is not None and not m.default_allclose)
        if row.verdict is Verdict.FAIL:
            self.failed_rows += 1
            if not self.killed_by:
                self.killed_by = row.checks[0]
                self.where = f"{row.test_id}: {row.locus.describe()}" if row.locus else row.test_id
                self.killed_in = row.case
                self.killed_at = Target(row.ep_size, row.rank, row.layout, row.view)


def hunt(name: str, impl: Callable, *, cases=HUNT_CASES, seed: int = 0, device: str = "cpu",
         on_row: Callable[[], None] = lambda: None, until_killed: bool = False, rounding: str = "production") -> Hunt:
    """The rows of `cases` for `impl`: every one (the naive checks are scored on all of them), or with
    `until_killed` only up to the first failing row (enough to know that it is killed, and where first)."""
    result = Hunt(name)
    scale = default_scale(device)
    for case_name in cases:
        case = CASES_BY_NAME[case_name]
        runner = Sweep(case, impl, seed=seed, device=device, scale=scale, rounding=rounding)
        for target in targets(case, scale):
            result.record(runner.run(target))
            on_row()
            if until_killed and result.killed:
                return result
    return result


def rows_per_hunt(cases=HUNT_CASES, device: str = "cpu") -> int:
    scale = default_scale(device)
    return sum(len(targets(CASES_BY_NAME[c], scale)) for c in cases)


def _yes(flag: bool) -> str:
    return "MISSED" if flag else "caught"


def format_matrix(baseline: Hunt, hunts: list[Hunt]) -> str:
    head = ("mutant", "stage", "killed by", "calc_diff<1e-3", "assert_close", "failed rows", "first failing row")
    lines = [head]
    for h in hunts:
        stage = MUTANTS_BY_NAME[h.name].stage
        lines.append((h.name, stage, h.killed_by or "SURVIVED", _yes(h.missed_by_calc_diff),
                      _yes(h.missed_by_allclose), f"{h.failed_rows}/{h.rows}", h.where))
    lines.append(("(unmutated)", "-", "FALSE ALARM" if baseline.killed else "passes", _yes(baseline.missed_by_calc_diff)
                  .replace("MISSED", "passes").replace("caught", "FALSE ALARM"),
                  f"fails {baseline.allclose_fails}/{baseline.rows} rows", f"{baseline.failed_rows}/{baseline.rows}",
                  baseline.where))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    out = ["  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1] for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 17)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m verify.mutants", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="hunt only these mutants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the matrix to this file")
    p.add_argument("--rounding", choices=["production", "auto"], default="production", help="judge every mutant by "
                   "the production profile (the pipeline declares it: the default), or by the profile each run "
                   "matches best (auto: which mutants would pass as another legitimate convention)")
    p.add_argument("--list", action="store_true", help="describe every mutant and exit")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(m.describe())
        return 0
    unknown = sorted(set(args.only or ()) - set(MUTANTS_BY_NAME))
    if unknown:
        print(f"verify.mutants: error: unknown mutant(s) {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    device = default_device()

    from tqdm import tqdm

    start = time.perf_counter()
    bar = tqdm(total=rows_per_hunt(device=device) * (len(chosen) + 1), unit="row", desc="verify.mutants",
               leave=False, file=sys.stderr, disable=not sys.stderr.isatty())
    baseline = hunt("(unmutated)", moe_expert_forward, seed=args.seed, device=device, on_row=lambda: bar.update(),
                    rounding=args.rounding)
    hunts = [hunt(m.name, m.impl, seed=args.seed, device=device, on_row=lambda: bar.update(), rounding=args.rounding)
             for m in chosen]
    bar.close()
    elapsed = time.perf_counter() - start

    print(f"hunt cases: {', '.join(HUNT_CASES)} ({baseline.rows} rows each) on {device}, seed {args.seed}, "
          f"rounding {args.rounding}")
    print(format_matrix(baseline, hunts))
    killed = [h for h in hunts if h.killed]
    survivors = [h.name for h in hunts if not h.killed]
    print(f"\nkill rate {len(killed)}/{len(hunts)} ({100 * len(killed) / max(len(hunts), 1):.0f}%); "
          f"survivors: {', '.join(survivors) or 'none'}; unmutated pipeline: "
          f"{'passes every row' if not baseline.killed else f'{baseline.failed_rows} FALSE ALARMS'}")
    print(f"missed by a global calc_diff < 1e-3: {sum(h.missed_by_calc_diff for h in hunts)}/{len(hunts)}; "
          f"missed by the default assert_close: {sum(h.missed_by_allclose for h in hunts)}/{len(hunts)} (which "
          f"fails {baseline.allclose_fails}/{baseline.rows} rows of the unmutated pipeline); {elapsed:.0f} s")
    if args.json:
        title = ("Mutants judged as our own pipeline declares itself (verify.mutants)" if args.rounding ==
                 "production" else "Mutants judged as outside implementations are (verify.mutants --rounding auto)")
        stamp = provenance(title, "mutants", device, "python -m verify.mutants", argv)  # before the file is opened
        with open(args.json, "w") as f:
            json.dump({**stamp,
                       "device": device, "seed": args.seed, "rounding": args.rounding, "cases": HUNT_CASES,
                       "seconds": elapsed, "baseline": dataclasses.asdict(baseline),
                       "mutants": [dataclasses.asdict(h) for h in hunts]}, f, indent=1)
    return 0 if not survivors and not baseline.killed else 1


if __name__ == "__main__":
    sys.exit(main())
