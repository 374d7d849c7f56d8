"""Detection power: every mutant of the catalogue is killed on the hunt cases, and the unmutated pipeline passes the
very same rows (no false alarm). `python -m verify.mutants` prints the kill matrix these tests assert."""

from __future__ import annotations

import pytest

from kernels import moe_expert_forward
from kernels._device import default_device
from verify.power.hunt import hunt
from verify.power.mutants import MUTANTS


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # some mutants compute on garbage rows
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_killed(mutant):
    result = hunt(mutant.name, mutant.impl, device=default_device(), until_killed=True)
    assert result.killed, f"{mutant.describe()} survived {result.rows} rows"


def test_the_unmutated_pipeline_passes_the_hunt_rows():
    result = hunt("(unmutated)", moe_expert_forward, device=default_device())
    assert not result.killed, f"false alarm: {result.where}"


def test_at_least_twenty_mutants_cover_every_stage():
    assert len(MUTANTS) >= 20
    assert {m.stage for m in MUTANTS} == {"count", "scatter", "silu_and_mul", "gemm", "gather", "executor"}
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
