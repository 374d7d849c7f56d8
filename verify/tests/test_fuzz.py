"""The fuzzer (verify/fuzz.py) as a property of the pipeline: every drawn case passes for kernels.moe_expert_forward
(a bounded, derandomised number of examples in CI: the `ci` hypothesis profile of conftest.py; more with
`--hypothesis-profile deep`); it finds and shrinks a bug the catalogue's DeepEP rows cannot see; a replay token
reruns exactly its case; an implementation that raises only at the rounding detection's call fails the case."""

from __future__ import annotations

import pytest
from hypothesis import given

from kernels import moe_expert_forward
from kernels.dispatch import Layout
from reference.routing import ViewKind
from verify.diff import main as diff_main
from verify.findings import Verdict
from verify.fuzz import FuzzCase, fuzz_cases, replay_command, run_case, search
from verify.mutants import MUTANTS_BY_NAME
from verify.power import broken

OFF_BY_ONE = "previous_rank_expert_as_local"


@pytest.mark.long
@given(case=fuzz_cases())
def test_every_fuzzed_case_passes(case):
    row = run_case(case, moe_expert_forward)
    assert row.verdict is not Verdict.FAIL, (f"{case.describe()}: {[f.message for f in row.problems]}\n"
                                             f"replay: {replay_command(case, None, 'cpu')}")


@pytest.mark.long
def test_the_fuzzer_finds_and_shrinks_a_bug_only_raw_ids_show():
    # The search is deterministic per seed. Measured on the 2-core CPU: seed 5 finds and shrinks the bug in 6 s, seed 1
    # after 86 cases (89 s), seeds 0 and 3 after ~180 (the CLI's default seed is 0), seed 2 not within 100.
    found = search(MUTANTS_BY_NAME[OFF_BY_ONE].impl, max_examples=100, seed=5, device="cpu")
    assert found is not None, "the off-by-one local-range check survived 100 fuzzed cases"
    assert found.view is ViewKind.RAW and found.rank >= 1 and found.num_tokens <= 4, found.describe()


def test_a_replay_token_reruns_exactly_its_case(capsys):
    case = FuzzCase(num_tokens=3, hidden=32, inter=16, num_local_experts=2, ep_size=2, rank=1, topk=2, counts=(2, 1),
                    drop=0.5, view=ViewKind.RAW, duplicates=False, int32_ids=True, gate_up_order="up_gate",
                    layout=Layout.CONTIGUOUS, seed=7)
    assert FuzzCase.from_token(case.token()) == case
    assert diff_main(["--replay", case.token()]) == 0
    assert diff_main(["--replay", case.token(), "--impl", f"verify.mutants:{OFF_BY_ONE}"]) == 1
    out = capsys.readouterr().out
    assert "fuzz  2   1     contiguous  raw" in out and f"--replay {case.token()}" in out


@pytest.mark.parametrize("token", ["not-a-token", FuzzCase(1, 16, 16, 1, 1, 0, 1, (1,), 0.0).token()[:-9]])
def test_a_bad_replay_token_is_a_usage_error_naming_it(capsys, token):
    assert diff_main(["--replay", token]) == 2
    assert "--replay" in capsys.readouterr().err


def test_a_raise_at_the_rounding_detection_alone_fails_the_case():
    calls = []

    def raises_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first call only")
        return broken.reference_impl(*args, **kwargs)

    case = FuzzCase(num_tokens=3, hidden=32, inter=16, num_local_experts=2, ep_size=2, rank=1, topk=2, counts=(2, 1),
                    drop=0.0, seed=7)
    row = run_case(case, raises_once, rounding="auto")
    assert row.verdict is Verdict.FAIL and len(calls) > 1
    assert [f.message for f in row.problems] == ["the rounding detection's run raised RuntimeError: first call only"]
    calls.clear()
    assert run_case(case, broken.reference_impl, rounding="auto").verdict is Verdict.PASS
