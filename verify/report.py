"""The tester's table: one line per row, in units of u, as verify.diff, verify.fuzz and verify.dist print it; and
the command-line pieces they share."""

from __future__ import annotations

import argparse
import math

from reference.rounding import rounding_profile
from verify import bands
from verify.findings import Check
from verify.sweep import Row

DEFAULT_IMPL = "kernels:moe_expert_forward"


def rounding_option(text: str) -> str:
    """--rounding's value, checked: "auto" or a placement reference.rounding knows."""
    if text != "auto":
        try:
            rounding_profile(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _u(value: float) -> str:
    return "inf" if math.isinf(value) else "nan" if math.isnan(value) else f"{value / bands.U_BF16:.3f}"


COLUMNS = ("case", "ep", "rank", "layout", "view", "M", "row/u", "expert/u", "l2/u", "exact_l2/u", "calc_diff",
           "judged by", "verdict")


def _cells(row: Row) -> list[str]:
    m = row.metrics
    values = ["-"] * 5 if m is None else [_u(m.row_err), _u(row.band("expert_err").value), _u(m.rel_l2),
                                          _u(m.exact_rel_l2), f"{m.calc_diff:.1e}"]
    rank = "all" if row.rank is None else str(row.rank)
    layout = "-" if row.layout is None else str(row.layout)
    judged = "error model" if any(f.check is Check.ERROR_MODEL for f in row.findings) else "bands"
    return [row.case, str(row.ep_size), rank, layout, str(row.view), str(row.num_tokens), *values, judged,
            str(row.verdict)]


def format_table(rows: list[Row]) -> str:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
