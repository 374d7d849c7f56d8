"""Detection power: every mutant of the catalogue is killed on the hunt cases, and the unmutated pipeline passes the
row that killed it, same inputs (the kill is no false alarm). `python -m verify.mutants` prints the kill matrix and
runs the unmutated pipeline over every hunt row (the catalogue's tests run those rows on their own seeds)."""

from __future__ import annotations

import pytest

from kernels import moe_expert_forward
from kernels._device import default_device
from verify.cases import CASES_BY_NAME
from verify.findings import Verdict
from verify.mutants import MUTANTS
from verify.power.hunt import hunt
from verify.sweep import Sweep, default_scale

SEED = 0


@pytest.mark.long
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # some mutants compute on garbage rows
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_killed(mutant):
    device = default_device()
    result = hunt(mutant.name, mutant.impl, seed=SEED, device=device, until_killed=True)
    assert result.killed, f"{mutant.describe()} survived {result.rows} rows"
    unmutated = Sweep(CASES_BY_NAME[result.killed_in], moe_expert_forward, seed=SEED, device=device,
                      scale=default_scale(device)).run(result.killed_at)
    assert unmutated.verdict is not Verdict.FAIL, f"false alarm: the unmutated pipeline fails {result.where} too"


def test_at_least_twenty_mutants_cover_every_stage():
    assert len(MUTANTS) >= 20
    assert {m.stage for m in MUTANTS} == {"count", "scatter", "silu_and_mul", "gemm", "gather", "executor"}
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
