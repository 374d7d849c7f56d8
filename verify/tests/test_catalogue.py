"""The case catalogue, one test per row: `skewed-ep4-rank2-masked`, `skewed-ep4-all-contiguous` (the combine of all
ranks). CPU sizes everywhere; the realistic GPU sizes run with `-m gpu` (ids end in -gpu)."""

from __future__ import annotations

import pytest

from kernels import moe_expert_forward
from kernels._device import default_device
from verify.cases import CASES
from verify.findings import Verdict
from verify.sweep import Sweep, targets


def _rows():
    for scale, marks in (("cpu", []), ("gpu", [pytest.mark.gpu])):
        for case in CASES:
            for target in targets(case, scale):
                rank = "all" if target.rank is None else f"rank{target.rank}"
                test_id = f"{case.name}-ep{target.ep_size}-{rank}-{target.layout}" + ("-gpu" if scale == "gpu" else "")
                yield pytest.param(case, target, scale, id=test_id, marks=marks)


@pytest.mark.parametrize("case,target,scale", list(_rows()))
def test_catalogue_row(case, target, scale, seed):
    row = Sweep(case, moe_expert_forward, seed=seed, device=default_device(), scale=scale).run(target)
    where = row.locus.describe() if row.locus else "-"
    assert row.verdict is not Verdict.FAIL, (f"{row.test_id} (seed {seed}): "
                                             f"{'; '.join(f.message for f in row.problems)}; worst: {where}")
