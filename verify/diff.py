"""python -m verify.diff: compare an implementation with the reference over one case of the catalogue.

    python -m verify.diff --case skewed                       # kernels.moe_expert_forward, every ep_size and rank
    python -m verify.diff --case skewed --impl mypkg.moe:forward --ep-size 4 --rank 2
    python -m verify.diff --list
    python -m verify.diff --replay TOKEN                      # one case found by python -m verify.fuzz

Prints one table (one row per case x ep_size x rank x layout, plus the combine of all ranks) and exits 0 when every
row passes (WARN passes), 1 when any row fails, 2 on a usage error or out of device memory (no verdict). A failing
row prints the command that replays it.
The contract of this command: docs/contract.md, "Command line".
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from kernels._device import default_device
from kernels.dispatch import LAYOUTS
from reference.rounding import PROFILES
from reference.routing import ViewKind
from verify import bands
from verify.cases import CASES, CASES_BY_NAME, Sizes
from verify.findings import Verdict
from verify.impls import UsageError, load, no_verdict
from verify.report import DEFAULT_IMPL, format_table, rounding_option
from verify.sweep import RoundingChoice, Row, Sweep, default_scale


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage first)
        raise UsageError(message)


def parse_args(argv):
    p = _Parser(prog="python -m verify.diff", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", help="case name (see --list)")
    p.add_argument("--impl", default=DEFAULT_IMPL, help="MODULE:CALLABLE with the signature of "
                   "kernels.moe_expert_forward (default: %(default)s)")
    p.add_argument("--ep-size", type=int, help="only this ep_size (default: the case's list)")
    p.add_argument("--rank", type=int, help="only this rank")
    p.add_argument("--layout", choices=[str(layout) for layout in LAYOUTS], help="only this layout (default: both)")
    p.add_argument("--view", choices=[str(view) for view in ViewKind], help="only this rank view (default: deepep, "
                   "and raw for ep_size > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    p.add_argument("--json", help="also write every row, with all metrics, to this file")
    p.add_argument("--plot", help="also draw each local expert's error against its band, per rank, faithful and "
                   "exact side by side (PNG)")
    p.add_argument("--list", action="store_true", help="print the case catalogue and exit")
    p.add_argument("--replay", metavar="TOKEN", help="rerun exactly the case a `python -m verify.fuzz` token encodes")
    p.add_argument("--rounding", type=rounding_option, help="the rounding placement of the faithful reference: a "
                   f"profile ({', '.join(PROFILES)}), field=value,... (reference/rounding.py), or auto; default: "
                   "production for kernels.moe_expert_forward, auto for any other --impl (the placement one run "
                   "matches best, named in the header; the error model judges where none holds)")
    return p.parse_args(argv)


def replay_command(row: Row, args) -> str:
    if args.replay:
        cmd = ["python", "-m", "verify.diff", "--replay", args.replay, "--device", args.device]
    else:
        cmd = ["python", "-m", "verify.diff", "--case", row.case, "--ep-size", str(row.ep_size)]
        if row.rank is not None:
            cmd += ["--rank", str(row.rank)]
        if row.layout is not None:
            cmd += ["--layout", str(row.layout)]
        cmd += ["--view", str(row.view), "--seed", str(args.seed), "--device", args.device]
    if args.impl != DEFAULT_IMPL:
        cmd += ["--impl", args.impl]
    if args.rounding:
        cmd += ["--rounding", args.rounding]
    return shlex.join(cmd)


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="verify.diff", unit="row", leave=False, file=sys.stderr)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except torch.OutOfMemoryError as exc:
        return no_verdict("verify.diff", exc)


def _main(argv) -> int:
    try:
        args = parse_args(argv)
        scale = default_scale(args.device)
        if args.list:
            for case in CASES:
                print(case.describe(scale))
            return 0
        if args.device == "cuda" and default_device() != "cuda":
            raise UsageError("--device cuda, but no CUDA GPU is visible")
        if args.replay:
            from verify.fuzz import FuzzCase, choose_rounding, run_case

            try:
                fuzz_case = FuzzCase.from_token(args.replay)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            impl = load(args.impl)
            start = time.perf_counter()
            rounding = choose_rounding(fuzz_case, impl, args.device, rounding_of(args))
            rows = [run_case(fuzz_case, impl, args.device, rounding)]
            header, elapsed = f"fuzz case: {fuzz_case.describe()}", time.perf_counter() - start
            sizes = Sizes(fuzz_case.num_tokens, fuzz_case.hidden, fuzz_case.inter, fuzz_case.num_experts,
                          fuzz_case.topk)
            return report(rows, header, sizes, rounding, elapsed, args)
        if not args.case:
            raise UsageError("--case or --replay is required (see --list)")
        if args.case not in CASES_BY_NAME:
            raise UsageError(f"unknown case {args.case!r}; known: {', '.join(CASES_BY_NAME)}")
        impl = load(args.impl)
        case = CASES_BY_NAME[args.case]
        num_experts = case.sizes(scale).num_experts
        if args.ep_size is not None and (args.ep_size < 1 or num_experts % args.ep_size):
            raise UsageError(f"--ep-size {args.ep_size} does not divide the case's {num_experts} experts")
        if args.rank is not None and args.ep_size is not None and not 0 <= args.rank < args.ep_size:
            raise UsageError(f"--rank {args.rank} is not in [0, --ep-size {args.ep_size})")
    except UsageError as exc:
        print(f"verify.diff: error: {exc}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    runner = Sweep(case, impl, seed=args.seed, device=args.device, rounding=rounding_of(args))
    todo = runner.targets(ep_sizes=None if args.ep_size is None else (args.ep_size,),
                          ranks=None if args.rank is None else (args.rank,),
                          layouts=LAYOUTS if args.layout is None else (args.layout,),
                          views=tuple(ViewKind) if args.view is None else (args.view,))
    rows = [runner.run(t) for t in _progress(todo, sys.stderr.isatty() and len(todo) > 4)]
    return report(rows, case.describe(scale), runner.problem.sizes, runner.rounding, time.perf_counter() - start,
                  args)


def plot_experts(rows: list[Row], sizes: Sizes, title: str, path: str) -> None:
    """One panel per ep_size: every rank row's local experts, at their global id, as error / FAIL bound (the faithful
    per-expert band, and the exact L2 band over that expert's rows), the worst over layouts and views. Above 1 fails:
    one bad expert or one bad rank stands out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = [r for r in rows if r.rank is not None and r.metrics is not None]
    table = {b.metric: b for b in bands.bands_for(sizes.hidden, sizes.inter)}
    ep_sizes = sorted({r.ep_size for r in ranked})
    fig, axes = plt.subplots(len(ep_sizes), 1, figsize=(11, 2.6 * len(ep_sizes)), squeeze=False)
    for ax, ep in zip(axes[:, 0], ep_sizes, strict=True):
        worst: dict[tuple[int, str], tuple[float, int]] = {}  # (global expert, reference) -> (error / bound, rank)
        for row in (r for r in ranked if r.ep_size == ep):
            offset = row.rank * sizes.num_experts // ep
            for e in row.metrics.experts:
                for against, value, band in (("faithful", e.rel_l2, table["expert_err"]),
                                             ("exact", e.exact_rel_l2, table["exact_rel_l2"])):
                    ratio = value / band.bounds(e.rows)[1]
                    key = (e.expert + offset, against)
                    if ratio > worst.get(key, (-1.0, 0))[0]:
                        worst[key] = (ratio, row.rank)
        for against, marker in (("faithful", "o"), ("exact", "x")):
            points = sorted((g, v[0], v[1]) for (g, a), v in worst.items() if a == against)
            ax.scatter([p[0] for p in points], [max(p[1], 1e-3) for p in points], c=[p[2] for p in points],
                       cmap="tab10", vmin=0, vmax=9, marker=marker, label=f"{against} (color: rank)")
        ax.axhline(1.0, color="red", lw=0.8)
        ax.set(ylabel="error / FAIL bound", title=f"ep_size {ep}", yscale="log", ylim=(1e-3, None),
               xlabel="global expert id")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title[:150], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rounding_of(args) -> str:
    """--rounding, or its default: production for our pipeline (it declares the contract's points), auto otherwise."""
    return args.rounding or ("production" if args.impl == DEFAULT_IMPL else "auto")


def report(rows: list[Row], header: str, sizes: Sizes, rounding: RoundingChoice, elapsed: float, args) -> int:
    """Print the table and every row that did not pass; write the JSON; the exit code."""
    print(f"{header}\nimpl {args.impl} on {args.device}, seed {args.seed}; {rounding.describe()}; "
          f"u = 2^-8 (bf16 unit roundoff); bands: verify/bands.py")
    print(format_table(rows))
    failed = [r for r in rows if r.verdict is Verdict.FAIL]
    for row in [r for r in rows if r.verdict is not Verdict.PASS]:
        print(f"\n{row.verdict} {row.test_id}: {'; '.join(f.message for f in row.problems)}")
        if row.locus:
            print(f"  worst: {row.locus.describe()}")
        if row.verdict is Verdict.FAIL:
            print(f"  replay: {replay_command(row, args)}")
    print(f"\n{len(rows) - len(failed)}/{len(rows)} rows pass ({elapsed:.1f} s)")
    if args.plot and rows:
        plot_experts(rows, sizes, header, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"case": header, "impl": args.impl, "device": args.device, "seed": args.seed,
                       "rounding": rounding.as_dict(), "seconds": elapsed, "rows": [r.as_dict() for r in rows]},
                      f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
