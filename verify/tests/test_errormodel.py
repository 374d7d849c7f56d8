"""The error model (verify/errormodel.py) and the two-tier verdict: the rounding space and its search, the budget's
rounding variance, no false alarm over random honest implementations from the whole space and beyond, and planted
structural bugs caught and named in outside implementations whatever convention they follow."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from reference import moe_reference
from reference.moe import exact_trace, faithful_space
from reference.rounding import FIELDS, PROFILES, SPACE, rounding_profile
from verify import errormodel
from verify.cases import Sizes, random_problem
from verify.diff import main as diff_main
from verify.findings import Check, Verdict
from verify.power import honest


def test_the_space_holds_every_placement_with_the_named_profiles_first():
    assert len(SPACE) == math.prod(len(v) for v in FIELDS.values())
    assert len({p.point for p in SPACE}) == len(SPACE)
    assert [p.name for p in SPACE[: len(PROFILES)]] == list(PROFILES)
    for point in SPACE:
        assert rounding_profile(point.name) is point
        assert rounding_profile(",".join(f"{f}={getattr(point, f)}" for f in FIELDS)) is point
    with pytest.raises(ValueError, match="rounding must be one of"):
        rounding_profile("h=fp16")


def test_faithful_space_is_the_faithful_reference_of_each_point(seed):
    p = random_problem(Sizes(24, 64, 32, 8, 3), "skewed", seed)
    args = (p.x, p.routing.topk_ids, p.routing.topk_weights, p.w13[4:], p.w2[4:])
    points = SPACE[:: max(1, len(SPACE) // 40)]
    for point, out in faithful_space(*args, ep_size=2, ep_rank=1, points=points):
        want = moe_reference(*args, ep_size=2, ep_rank=1, mode="faithful", rounding=point)
        assert torch.equal(out, want), point.name


def test_the_rounding_variance_is_what_rounding_to_bf16_does():
    values = torch.randn(200_000, dtype=torch.float64) * torch.exp(torch.randn(200_000, dtype=torch.float64))
    error = values.float().to(torch.bfloat16).double() - values  # (via fp32: its error is 2^-16 of bf16's)
    predicted = errormodel.rounding_variance(values)
    ratio = float((error**2 / predicted).mean())  # each element's squared error over its predicted variance
    assert 0.98 < ratio < 1.02, ratio  # 200k samples of a uniform error: the mean's sd is 0.2%
    assert float(errormodel.rounding_variance(torch.zeros(1, dtype=torch.float64))) == 0.0


def _judged(impl, seed=0):
    p = random_problem(Sizes(96, 128, 64, 8, 4), "skewed", seed)
    args = (p.x, p.routing.topk_ids, p.routing.topk_weights, p.w13, p.w2)
    budget = errormodel.budget(exact_trace(*args), p.w2)
    return errormodel.tests(impl(*args).float(), budget)


def test_the_least_accurate_placement_sits_under_its_budget_and_an_exact_output_far_under():
    roundings = rounding_profile("silu=logistic,weights=bf16,slot=bf16,accumulator=bf16")
    everything = honest.Honest(honest.Placement((roundings,), weight_on_a=True))
    found = _judged(everything)
    overall = next(t for t in found if t.kind == "magnitude" and t.part == "all")
    assert 0.3 < overall.statistic < 1.0, overall  # the budget adds every rounding at its worst: a bound, not a guess
    assert not any(t.fails for t in found)
    exact = _judged(lambda *args: moe_reference(*args).to(torch.bfloat16))
    assert max(t.statistic for t in exact if t.kind == "magnitude" and t.part == "all") < overall.statistic


def test_no_false_alarm_over_honest_implementations_of_the_whole_space_and_beyond():
    """Three draws per catalogue case (any point, several points expert by expert, the weight on a, tree and reverse
    sums); the command `python -m verify.power.honest` runs a thousand (docs/error-model.md)."""
    runs = list(honest.calibrate(36))
    assert len(runs) >= 30
    assert not [r for r in runs if r.fails], [r.failing for r in runs if r.fails]
    assert max(r.closest["closeness"] for r in runs) < 1.0


@pytest.mark.parametrize("planted,part", [("expert_off", "expert"), ("last_slot_dropped", "slot"),
                                          ("weight_on_input", None)])
@pytest.mark.parametrize("name", ["fused_epilogue", "all_fp32", "vllm_like"])
def test_a_planted_bug_fails_under_auto_naming_its_expert_or_slot(capsys, tmp_path, name, planted, part):
    path = tmp_path / "rows.json"
    code = diff_main(["--case", "skewed", "--ep-size", "2", "--rank", "1", "--view", "deepep", "--impl",
                      f"verify.adapters.outside:{name}_{planted}", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 1, out
    row = json.loads(path.read_text())["rows"][0]
    failing = [f for f in row["findings"] if f["verdict"] == "FAIL"]
    assert failing and all(f["check"] == str(Check.ERROR_MODEL) for f in failing), out
    if part == "expert":  # rank 1 of 2 owns global experts 8..15; the planted one is local 4
        assert failing[0]["evidence"]["part"] == "expert" and failing[0]["evidence"]["index"] == 12, out
    elif part == "slot":
        assert any(f["evidence"]["part"] == "slot" and f["evidence"]["index"] == 3 for f in failing), out


@pytest.mark.parametrize("name", ["fused_epilogue", "all_fp32", "vllm_like", "jax_logistic", "torchtitan_like"])
def test_an_outside_implementation_passes_naming_its_convention(capsys, tmp_path, name):
    path = tmp_path / "rows.json"
    code = diff_main(["--case", "skewed", "--ep-size", "2", "--impl", f"verify.adapters.outside:{name}",
                      "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rounding = json.loads(path.read_text())["rounding"]
    assert rounding["matched"] and "rounding auto -> convention" in out, out
    assert rounding["exact_l2"] < 2 * errormodel.U


def test_an_honest_implementation_outside_every_convention_passes_by_the_error_model(capsys, tmp_path):
    """Each expert rounding its own way, the weight on a, a tree sum: no point of the space matches it."""
    path = tmp_path / "rows.json"
    code = diff_main(["--case", "skewed", "--ep-size", "2", "--rank", "0", "--view", "deepep", "--impl",
                      "verify.adapters.outside:mixed", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(path.read_text())
    assert not result["rounding"]["matched"] and "no known convention" in out
    row = result["rows"][0]
    assert any(f["check"] == str(Check.ERROR_MODEL) and f["verdict"] == "PASS" for f in row["findings"])
    assert row["verdict"] == str(Verdict.PASS)


def test_each_bias_variance_is_the_budget_covariance_projected_on_its_part():
    """Pairs.bias against the covariance written out element by element (tiny sizes, one token naming an expert
    twice): per element its own variance, per slot w2[e] diag(var_a) w2[e]^T and var_weight y y^T over its row."""
    p = random_problem(Sizes(12, 16, 8, 4, 3), "uniform", 5)
    topk_ids = p.routing.topk_ids.clone()
    topk_ids[0, 1] = topk_ids[0, 0]
    args = (p.x, topk_ids, p.routing.topk_weights, p.w13, p.w2)
    b = errormodel.budget(exact_trace(*args), p.w2)
    M, H = b.exact.shape
    cov = torch.diag(b.element.flatten())
    for j in range(b.token.numel()):
        rows = slice(int(b.token[j]) * H, int(b.token[j]) * H + H)
        w2 = b.w2[b.expert[j]]
        cov[rows, rows] += w2 @ torch.diag(b.var_a[j]) @ w2.T + b.var_weight[j] * torch.outer(b.y[j], b.y[j])
    pairs = b.pairs()
    for labels in (b.expert, b.slot, torch.zeros_like(b.token)):
        index, labels = torch.unique(labels, return_inverse=True)
        variance, size = pairs.bias(labels, len(index))
        for part in range(len(index)):
            c = torch.zeros_like(b.exact).index_add_(0, b.token[labels == part], b.contribution[labels == part])
            torch.testing.assert_close(variance[part], c.flatten() @ cov @ c.flatten(), rtol=1e-10, atol=0)
            torch.testing.assert_close(size[part], (c * c).sum(), rtol=1e-12, atol=0)


def test_every_test_of_a_combined_output_sees_each_rank():
    p = random_problem(Sizes(64, 64, 32, 8, 3), "uniform", 3)
    from reference.routing import rank_view

    budgets, index = [], []
    for rank in range(2):
        view = rank_view(p.x, p.routing, 2, rank)
        budgets.append(errormodel.budget_of_view(view, p.w13[4 * rank: 4 * rank + 4], p.w2[4 * rank: 4 * rank + 4]))
        index.append(view.token_index)
    combined = errormodel.combine(budgets, index, 64)
    whole = exact_trace(p.x, p.routing.topk_ids, p.routing.topk_weights, p.w13, p.w2)
    torch.testing.assert_close(combined.exact, whole.out, rtol=1e-12, atol=1e-12)
    parts = {(t.kind, t.part) for t in errormodel.tests(whole.out, combined)}
    assert {("magnitude", "rank"), ("bias", "rank"), ("bias", "slot"), ("magnitude", "row")} <= parts


def test_the_faithful_reference_of_any_point_is_honest_by_the_error_model(seed):
    p = random_problem(Sizes(48, 64, 32, 8, 4), "uniform", seed)
    args = (p.x, p.routing.topk_ids, p.routing.topk_weights, p.w13, p.w2)
    budget = errormodel.budget(exact_trace(*args), p.w2)
    for point in itertools.islice(SPACE, 0, None, 37):
        out = moe_reference(*args, mode="faithful", rounding=point).to(torch.bfloat16)
        assert not [t for t in errormodel.tests(out.float(), budget) if t.fails], point.name


def test_the_fuzzer_judges_by_the_same_two_tiers():
    from verify.adapters.outside import ADAPTERS
    from verify.fuzz import FuzzCase, run_case

    case = FuzzCase(num_tokens=64, hidden=64, inter=32, num_local_experts=4, ep_size=2, rank=1, topk=2,
                    counts=(32, 32, 32, 32), drop=0.0)
    honest_row = run_case(case, ADAPTERS["mixed"], rounding="auto")
    assert honest_row.verdict is Verdict.PASS
    assert any(f.check is Check.ERROR_MODEL for f in honest_row.findings)
    bugged = run_case(case, ADAPTERS["mixed_expert_off"], rounding="auto")
    failing = [f for f in bugged.findings if f.verdict is Verdict.FAIL]
    assert failing[0].check is Check.ERROR_MODEL and failing[0].evidence["index"] == 4 + 2, failing


def test_a_token_naming_one_expert_twice_shares_its_roundings_and_stays_honest():
    """Both slots see the same x, so the same h, silu, a and y and the same rounding errors: the budget counts them
    once with the summed weight (the fuzzer found the first budget, which counted them as independent, too small)."""
    from verify.adapters.outside import ADAPTERS
    from verify.fuzz import FuzzCase, run_case

    case = FuzzCase(num_tokens=127, hidden=256, inter=64, num_local_experts=8, ep_size=1, rank=0, topk=4,
                    counts=(0, 66, 0, 0, 0, 0, 0, 0), drop=0.0, duplicates=True, seed=7)
    row = run_case(case, ADAPTERS["mixed"], rounding="auto")
    assert row.verdict is Verdict.PASS, [f.message for f in row.problems]
