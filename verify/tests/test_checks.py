"""The tester's own parts can fail: metrics score what they claim, bands are justified, and the layout checker,
the padding poisoner and the slot permuter do what the sweep relies on."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kernels import moe_expert_forward
from kernels import scatter as S
from kernels._device import default_device
from kernels.dispatch import LAYOUTS, Layout
from reference.routing import rank_view
from verify import bands, checks
from verify.cases import CASES_BY_NAME, Sizes, random_problem
from verify.findings import Check, Verdict, failure, worst
from verify.metrics import Metrics, calc_diff, compare
from verify.probes import PROBES, Probe
from verify.sweep import Sweep, Target

U = bands.U_BF16
BANDS = bands.bands_for(64, 32)
DEVICE = default_device()


def outputs(seed=0):
    p = random_problem(Sizes(32, 64, 32, 8, 2), "uniform", seed, DEVICE)
    ids = rank_view(p.x, p.routing, 2, 0).local_ids().cpu()
    ids[:3] = -1  # three rows with nothing local, as in a padded receive buffer
    ref = torch.randn(ids.shape[0], 64)
    ref[:3] = 0.0
    return ref, ids


def test_a_zero_output_never_passes():
    ref, ids = outputs()
    m = compare(torch.zeros_like(ref), ref, ref, ids)
    assert m.row_err == 1.0 and worst(bands.judge(m, BANDS)) is Verdict.FAIL


def test_nan_and_stray_rows_fail():
    ref, ids = outputs()
    routed = (ids >= 0).any(1)
    out = ref.clone()
    out[routed.nonzero()[0], 3] = float("nan")
    m = compare(out, ref, ref, ids)
    assert m.nonfinite_rows == 1 and math.isinf(m.row_err) and worst(bands.judge(m, BANDS)) is Verdict.FAIL
    out = ref.clone()
    out[(~routed).nonzero()[0], 0] = 1e-30
    m = compare(out, ref, ref, ids)
    assert m.stray_rows == 1 and worst(bands.judge(m, BANDS)) is Verdict.FAIL


def test_one_expert_off_by_two_percent_fails_where_calc_diff_sees_nothing():
    ref, ids = outputs()
    out = ref.clone()
    rows = (ids == 1).any(1)
    out[rows] *= 1.02
    findings = bands.judge(compare(out, ref, ref, ids), BANDS)
    expert = next(f for f in findings if f.metric == "expert_err")
    assert expert.expert == 1 and expert.verdict is Verdict.FAIL and worst(findings) is Verdict.FAIL
    assert calc_diff(out, ref) < 1e-3  # DeepGEMM's threshold would pass it


def test_every_band_is_ordered_and_justified():
    for band in BANDS + bands.combine_bands(7168, 2048):
        assert 0 <= band.passes <= band.fails and len(band.why) > 20, band
    per_expert = {"expert_err"}  # judged over Metrics.experts, one relative L2 error per local expert
    assert {b.metric for b in BANDS} <= {f.name for f in dataclasses.fields(Metrics)} | per_expert
    assert all(len(t.why) > 20 for t in bands.STAGE_TOLERANCES.values())


def test_one_ulp_noise_passes_and_small_groups_get_room():
    ref, ids = outputs()
    out = ref.to(torch.bfloat16).float()
    flipped = out.clone()
    flipped[5, 0] = (out[5, 0] * (1 + 2 * U)).to(torch.bfloat16).float()  # one ulp up
    m = compare(flipped, out, out, ids)
    assert worst(bands.judge(m, BANDS)) is Verdict.PASS
    assert bands.small_sample(1) == 3 and bands.small_sample(100) == 1.2


def test_metrics_stay_raw_and_the_bands_own_the_widening():
    """One expert whose few rows are 0.2u off: the metric reports 0.2u as measured; only its band's bound grows."""
    ref, ids = outputs()
    out = ref.clone()
    rows = (ids == 2).any(1)
    out[rows] *= 1 + 0.2 * U
    m = compare(out, ref, ref, ids)
    (err,) = [e for e in m.experts if e.expert == 2]
    assert err.rows == int(rows.sum()) and err.rel_l2 == pytest.approx(0.2 * U, rel=1e-3)
    band = next(b for b in BANDS if b.metric == "expert_err")
    finding = band.judge(m)
    assert finding.value == err.rel_l2 and finding.expert == 2
    assert finding.limit == pytest.approx(band.passes * bands.small_sample(err.rows))


def dispatch_of(layout, seed=0):
    p = random_problem(Sizes(96, 64, 32, 8, 3), "skewed", seed, DEVICE)
    view = rank_view(p.x, p.routing, 2, 1)
    routing = S.count_local_experts(view.topk_ids, ep_rank=1, num_local_experts=4, num_experts=8)
    scatter = S.scatter_masked if layout == "masked" else S.scatter_contiguous
    return scatter(view.x, routing, alignment=128), view


@pytest.mark.parametrize("layout", LAYOUTS)
def test_permutation_is_legal_and_really_moves_rows(layout, seed):
    dispatch, view = dispatch_of(layout, seed)
    permuted = checks.permute_segments(dispatch, torch.Generator().manual_seed(seed))
    assert checks.layout_problems(permuted, view.x, view.local_ids(), 128) == []
    assert not torch.equal(permuted.output_index, dispatch.output_index)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_checker_catches_each_kind_of_break(layout):
    dispatch, view = dispatch_of(layout)
    ids = view.local_ids()
    index = dispatch.output_index.clone()
    local = (index >= 0).nonzero()
    (t0, k0), (t1, k1) = local[0].tolist(), local[1].tolist()
    index[t1, k1] = index[t0, k0]
    shared = dataclasses.replace(dispatch, output_index=index)
    assert checks.layout_problems(shared, view.x, ids, 128)
    remote = dataclasses.replace(dispatch, output_index=torch.where(dispatch.output_index < 0, 0,
                                                                    dispatch.output_index))
    assert any("-1" in p for p in checks.layout_problems(remote, view.x, ids, 128))
    rows = dispatch.rows.clone()
    rows.view(-1, rows.shape[-1])[dispatch.output_index[t0, k0]] += 1
    assert any("bitwise" in p for p in checks.layout_problems(dataclasses.replace(dispatch, rows=rows), view.x, ids,
                                                             128))
    if layout == "contiguous":
        m = dispatch.m_indices.clone()
        m[-1] = 0  # a padding row claimed by an expert
        assert any("m_indices" in p for p in checks.layout_problems(dataclasses.replace(dispatch, m_indices=m),
                                                                     view.x, ids, 128))


def test_poison_padding_poisons_exactly_the_rows_without_tokens():
    dispatch, _ = dispatch_of("contiguous")
    poisoned = checks.poison_padding(dispatch)
    flat = poisoned.flat_rows()
    valid = checks.valid_row_mask(dispatch).to(flat.device)
    assert flat[~valid].isnan().all() and not flat[valid].isnan().any()
    assert checks.bitwise_equal(flat[valid], dispatch.flat_rows()[valid])


def test_poisoned_empty_fills_floats_with_nan_and_ints_with_an_illegal_row():
    assert checks.poisoned_empty((3,), dtype=torch.bfloat16, device="cpu").isnan().all()
    assert (checks.poisoned_empty((3,), dtype=torch.int32, device="cpu") == checks.POISON_INT).all()


def test_faithful_bands_grow_like_sqrt_k_from_their_floor():
    small, deepseek = bands.bands_for(256, 128), bands.bands_for(7168, 2048)
    get = lambda table, name: next(b for b in table if b.metric == name)  # noqa: E731
    assert get(small, "rel_l2").fails == U / 4 and get(deepseek, "rel_l2").fails == 0.5 * U
    exact = get(small, "exact_rel_l2"), get(deepseek, "exact_rel_l2")  # the exact band does not grow with K ...
    assert (exact[0].passes, exact[0].fails) == (exact[1].passes, exact[1].fails)
    assert exact[0].bounds(1) > exact[1].bounds(1)  # ... but widens when few independent roundings feed a row


def test_a_probe_is_one_declaration_and_returns_its_findings():
    """Adding a check is adding a Probe: its findings land in the row, tagged with its check, and nothing else."""
    def observe(trial, out):
        return [failure(Check.RERUN, f"saw {trial.view.num_tokens} rows in {trial.layout}")]

    probe = Probe("always-fails", Check.RERUN, "nothing", "a finding", observe, needs_stages=False)
    case = CASES_BY_NAME["single_token"]
    plain = Sweep(case, moe_expert_forward).run(Target(1, 0, Layout.MASKED))
    row = Sweep(case, moe_expert_forward, probes=(*PROBES, probe)).run(Target(1, 0, Layout.MASKED))
    assert plain.verdict is Verdict.PASS and row.verdict is Verdict.FAIL
    assert row.findings[: len(plain.findings)] == plain.findings
    assert row.problems == [failure(Check.RERUN, "saw 1 rows in masked")]
    assert len({p.name for p in PROBES}) == len(PROBES) and all(p.transforms and p.expects for p in PROBES)


def test_an_implementation_that_writes_into_its_input_is_caught_in_every_run():
    def scribbles(x, *args, **kwargs):
        out = moe_expert_forward(x, *args, **kwargs)
        x[0, 0] += 1
        return out

    row = Sweep(CASES_BY_NAME["skewed"], scribbles).run(Target(2, 1, Layout.CONTIGUOUS))
    # the plain run and the rerun each wrote into x; the inputs were put back in between, so the rerun agreed
    assert [(f.check, f.message) for f in row.problems] == [(Check.INPUTS, "an input was modified"),
                                                           (Check.INPUTS, "the rerun run modified an input")]
