"""python -m verify.perf.results [--check]: the results pages, one per card, made from the committed results.

Every JSON file under baselines/results/<card>/ is one result as data, with its provenance: `card`, `commit`,
`date`, `command`, and `kind`, which says how it reads:
- "bench": a `python -m verify.bench` run (its report's targets, each a measured ratio against its goal);
- "impls": outside implementations over the catalogue (`results`: one entry per implementation and case);
- "honest": `python -m verify.power.honest` (the error model's false alarms and what it caught);
- "mutants": `python -m verify.mutants` (the kill matrix);
- "fuzz": `python -m verify.fuzz --mutants` (per mutant: cases run until found, the shrunk case);
- "dist": `torchrun -m verify.dist --bench` (per rank: rows received, dispatch, expert stage, combine);
- "gate": `python -m verify.gate` runs against a stored baseline (exit codes and what each flagged).
The command writes docs/results/<card>.md from them, every table under the commit, date and command that produced
it; with `--check` it writes nothing and exits 1 when a committed page is not what the data gives.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import subprocess
import sys

import torch

from verify.perf import report

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "baselines" / "results"
PAGES = ROOT / "docs" / "results"


def provenance(title: str, kind: str, device: str, prog: str, argv: list[str] | None = None) -> dict:
    """What makes a command's JSON a result of baselines/results/: its title and kind, the card, the commit (with
    "+changes" when tracked files differ from it), the date and the command line (`argv`: default sys.argv[1:])."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + ("+changes" if git("status", "--porcelain",
                                                                                    "--untracked-files=no") else "")
    card = (torch.cuda.get_device_name() if torch.device(device).type == "cuda"
            else f"CPU, {os.cpu_count()} cores (Triton interpreter)")
    return dict(title=title, kind=kind, card=card, commit=commit, date=datetime.date.today().isoformat(),
                command=" ".join([prog, *(sys.argv[1:] if argv is None else argv)]))


def _bench(data: dict) -> list[str]:
    return report.summary_lines(data, fit_from=FIT_POINTS)[1:]  # (its first line is a blank one)


FIT_POINTS = 20  # a bench run's fitted layout rule is shown from this many points on: a fit over a few fits nothing


def _impls(data: dict) -> list[str]:
    per = collections.defaultdict(lambda: dict(cases=0, passed=0, rows=0, ok_rows=0, placements=set()))
    for r in data["results"]:
        p = per[r["impl"]]
        p["cases"] += 1
        p["passed"] += r["passed"] == r["rows"]
        p["rows"] += r["rows"]
        p["ok_rows"] += r["passed"]
        p["placements"].add(r["rounding"])
    lines = ["| --impl | cases passed | rows passed | placements found |", "|---|---|---|---|"]
    for impl, p in per.items():
        lines.append(f"| {impl} | {p['passed']}/{p['cases']} | {p['ok_rows']}/{p['rows']} | "
                     f"{'; '.join(sorted(p['placements']))} |")
    return lines


def _honest(data: dict) -> list[str]:
    lines = ["| population | runs | flagged | closest to its bound |", "|---|---|---|---|"]
    for planted, r in data["planted"].items():
        closest = r["closest"][0]["closest"]["closeness"] if r["closest"] else float("nan")
        what = "honest (false alarms)" if planted == "none" else f"planted: {planted} (caught)"
        lines.append(f"| {what} | {r['runs']} | {r['flagged']} | {closest:.3f} |")
    return lines


def _mutants(data: dict) -> list[str]:
    mutants = data["mutants"]
    lines = ["| mutant | killed by | failed rows |", "|---|---|---|"]
    lines += [f"| {m['name']} | {m['killed_by'] or 'SURVIVED'} | {m['failed_rows']}/{m['rows']} |" for m in mutants]
    killed = sum(bool(m["killed_by"]) for m in mutants)
    return [f"Killed {killed}/{len(mutants)}, judged with --rounding {data['rounding']}.", "", *lines]


def _fuzz(data: dict) -> list[str]:
    searches = data["searches"]
    found = [s for s in searches if s["found"]]
    lines = [f"Found {len(found)}/{len(searches)} within {data['max_examples']} examples each (seed {data['seed']}).",
             "",
             "| mutant | cases run | shrunk to |", "|---|---|---|"]
    lines += [f"| {s['impl'].rsplit(':', 1)[-1]} | {s['cases_run']} | "
              f"{s['found']['describe'] if s['found'] else 'NOT FOUND'} |" for s in searches]
    return lines


def _dist(data: dict) -> list[str]:
    lines = [f"{data['shape']}, {data['world']} ranks x {data['tokens_per_rank']} tokens.", "",
             "| rank | rows received | dispatch ms | expert stage ms | combine ms | all-to-all of the same bytes |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['rows_received']} | {r['dispatch_ms']:.2f} | {r['expert_ms']:.2f} | "
              f"{r['combine_ms']:.2f} | {r['a2a_gbps']:.0f} GB/s |" for r in data["ranks"]]
    return lines


def _gate(data: dict) -> list[str]:
    lines = [data["what"], "", "| run | arguments | exit | flagged |", "|---|---|---|---|"]
    for i, r in enumerate(data["runs"], 1):
        flagged = "; ".join(r["regressions"][:3]) + (f"; and {len(r['regressions']) - 3} more"
                                                      if len(r["regressions"]) > 3 else "")
        lines.append(f"| {i} | `{r['args']}` | {r['exit']} | {flagged or '-'} |")
    return lines


RENDER = {"bench": _bench, "impls": _impls, "honest": _honest, "mutants": _mutants, "fuzz": _fuzz, "dist": _dist,
          "gate": _gate}


def page(card_dir: pathlib.Path) -> str:
    """The results page of one card's directory."""
    files = sorted(card_dir.glob("*.json"))
    first = json.loads(files[0].read_text())
    out = [f"# Results: {first['card']}", "",
           f"Made by `python -m verify.perf.results` from baselines/results/{card_dir.name}/ (do not edit by hand).",
           ""]
    for path in files:
        data = json.loads(path.read_text())
        out += [f"## {data['title']}", "",
                f"Commit {data['commit']}, {data['date']}, {data['card']}: `{data['command']}` "
                f"(baselines/results/{card_dir.name}/{path.name}).", "", *RENDER[data["kind"]](data), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m verify.perf.results", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page differs from its data")
    args = p.parse_args(argv)
    stale = []
    for card_dir in sorted(d for d in RESULTS.iterdir() if d.is_dir()):
        target = PAGES / f"{card_dir.name}.md"
        text = page(card_dir)
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(str(target.relative_to(ROOT)))
        else:
            PAGES.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    if stale:
        print(f"verify.perf.results: not what the data gives: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
