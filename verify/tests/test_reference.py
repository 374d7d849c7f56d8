"""The golden model checked against an independent NumPy oracle, against itself across ranks, and against the bf16
rounding model; its routings checked for the properties their names promise; its bad-input errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import layouts, moe_reference
from reference import routing as R
from reference.oracle_np import moe_oracle, round_to_bf16
from verify import bands
from verify.cases import Sizes, random_problem
from verify.metrics import compare
from verify.tests.bad_inputs import CONTRACT_BAD_INPUTS, good_arguments
from verify.tests.bad_inputs import ids as bad_input_ids


def make_inputs(num_tokens, hidden, inter, num_experts, topk, seed, routing="uniform", **params):
    p = random_problem(Sizes(num_tokens, hidden, inter, num_experts, topk), routing, seed, **params)
    return p.x, p.routing, p.w13, p.w2


def rank_args(x, r, w13, w2, ep_size, rank):
    view = R.rank_view(x, r, ep_size, rank)
    per_rank = r.num_experts // ep_size
    experts = slice(rank * per_rank, (rank + 1) * per_rank)
    return view, (view.x, view.topk_ids, view.topk_weights, w13[experts], w2[experts])


@pytest.mark.parametrize("mode", ["exact", "faithful"])
@pytest.mark.parametrize("gate_up_order", ["gate_up", "up_gate"])
@pytest.mark.parametrize("ep_size", [1, 2, 4])
@pytest.mark.parametrize("routing", ["skewed", "empty_rank"])
def test_reference_matches_numpy_oracle_on_every_rank(mode, gate_up_order, ep_size, routing, seed):
    x, r, w13, w2 = make_inputs(24, 64, 32, 8, 3, seed, routing)
    for rank in range(ep_size):
        view, args = rank_args(x, r, w13, w2, ep_size, rank)
        kw = dict(ep_size=ep_size, ep_rank=rank, gate_up_order=gate_up_order, mode=mode)
        ours = moe_reference(*args, **kw)
        oracle = torch.from_numpy(moe_oracle(*args, **kw)).float()
        where = f"mode={mode} order={gate_up_order} ep={ep_size} rank={rank} routing={routing}"
        if mode == "faithful":  # same rounding points, same fp32 gather: bitwise, but for silu's last fp32 bit
            mismatched = int((ours != oracle).sum())
            assert mismatched <= ours.numel() // 1000, f"{where}: {mismatched} of {ours.numel()} elements differ"
            torch.testing.assert_close(ours, oracle, rtol=2 * bands.U_BF16, atol=0, msg=where)
        else:
            torch.testing.assert_close(ours, oracle, rtol=1e-6, atol=1e-6, msg=where)


@settings(max_examples=25, deadline=None)
@given(num_tokens=st.integers(0, 12), inter=st.sampled_from([16, 32]), experts_log2=st.integers(1, 3),
       topk=st.integers(1, 2), ep_log2=st.integers(0, 1), drop=st.floats(0, 0.5), seed=st.integers(0, 2**16))
def test_reference_matches_oracle_with_minus_one_ids(num_tokens, inter, experts_log2, topk, ep_log2, drop, seed):
    """Random shapes, ids dropped to -1 at random (router drops: -1 ids with NONZERO weights), any rank."""
    num_experts, ep_size = 2**experts_log2, 2**ep_log2
    x, r, w13, w2 = make_inputs(num_tokens, 32, inter, num_experts, min(topk, num_experts), seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.where(torch.rand(r.topk_ids.shape, generator=gen) < drop, -1, r.topk_ids)
    per_rank = num_experts // ep_size
    for rank in range(ep_size):
        experts = slice(rank * per_rank, (rank + 1) * per_rank)
        args = (x, ids, r.topk_weights, w13[experts], w2[experts])
        for mode in ("exact", "faithful"):
            ours = moe_reference(*args, ep_size=ep_size, ep_rank=rank, mode=mode)
            oracle = torch.from_numpy(moe_oracle(*args, ep_size=ep_size, ep_rank=rank, mode=mode)).float()
            tol = 2 * bands.U_BF16 if mode == "faithful" else 1e-6
            torch.testing.assert_close(ours, oracle, rtol=tol, atol=1e-6, msg=f"mode={mode} rank={rank}")


@pytest.mark.parametrize("ep_size", [2, 4])
@pytest.mark.parametrize("routing", ["uniform", "skewed", "empty_rank", "hot_expert"])
def test_ranks_sum_to_the_single_rank_reference(ep_size, routing, seed):
    x, r, w13, w2 = make_inputs(40, 64, 32, 8, 3, seed, routing)
    views, outs = [], []
    for rank in range(ep_size):
        view, args = rank_args(x, r, w13, w2, ep_size, rank)
        views.append(view)
        outs.append(moe_reference(*args, ep_size=ep_size, ep_rank=rank, mode="exact"))
    total = R.combine(views, outs, r.num_tokens)
    whole = moe_reference(x, r.topk_ids, r.topk_weights, w13, w2, mode="exact")
    # exact mode: float64 per rank, rounded to fp32 once per rank -> sums agree to a few fp32 ulps
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hidden,inter", [(64, 32), (256, 128), (1024, 512)])
def test_faithful_differs_from_exact_as_the_rounding_model_predicts(hidden, inter, seed):
    x, r, w13, w2 = make_inputs(48, hidden, inter, 8, 2, seed)
    args = (x, r.topk_ids, r.topk_weights, w13, w2)
    faithful = moe_reference(*args, mode="faithful")
    exact = moe_reference(*args, mode="exact")
    m = compare(faithful, faithful, exact, r.topk_ids)
    limits = {b.metric: b.passes for b in bands.bands_for(hidden, inter) if b.against == "exact"}
    assert 0 < m.exact_rel_l2 <= limits["exact_rel_l2"], f"H={hidden} I={inter}: {m}"
    assert m.exact_row_err <= limits["exact_row_err"], f"H={hidden} I={inter}: {m}"
    # and it really rounds: every faithful value is a bf16 value
    assert torch.equal(faithful, faithful.to(torch.bfloat16).float())


def test_gate_up_order_swaps_the_halves(seed):
    x, r, w13, w2 = make_inputs(16, 64, 32, 4, 2, seed)
    swapped = torch.cat(w13.chunk(2, dim=1)[::-1], dim=1)
    for mode in ("exact", "faithful"):
        a = moe_reference(x, r.topk_ids, r.topk_weights, w13, w2, mode=mode)
        b = moe_reference(x, r.topk_ids, r.topk_weights, swapped, w2, gate_up_order="up_gate", mode=mode)
        assert torch.equal(a, b)


def test_rows_without_local_expert_are_exactly_zero_and_empty_batch(seed):
    x, r, w13, w2 = make_inputs(32, 64, 32, 8, 2, seed, "empty_rank", ep_size=4)
    per_rank = 2
    out = moe_reference(x, r.topk_ids, r.topk_weights, w13[6:8], w2[6:8], ep_size=4, ep_rank=3)
    assert torch.equal(out, torch.zeros_like(out))
    out = moe_reference(x, r.topk_ids, r.topk_weights, w13[:per_rank], w2[:per_rank], ep_size=4, ep_rank=0)
    remote = ~(layouts.local_expert_ids(r.topk_ids, 4, 0, 8) >= 0).any(dim=1)
    assert remote.any() and torch.equal(out[remote], torch.zeros_like(out[remote]))
    empty = moe_reference(x[:0], r.topk_ids[:0], r.topk_weights[:0], w13, w2)
    assert empty.shape == (0, 64) and empty.dtype == torch.float32


def test_round_to_bf16_matches_torch():
    values = torch.randn(1 << 16) * torch.exp(torch.randn(1 << 16) * 8)
    assert torch.equal(torch.from_numpy(round_to_bf16(values.numpy())), values.to(torch.bfloat16).float())


# ---- routings keep their promises -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(R.ROUTINGS))
def test_every_routing_has_distinct_ids_and_normalised_weights(name, seed):
    r = R.make_routing(name, 200, 16, 4, seed=seed)
    assert r.topk_ids.dtype == torch.int64 and r.topk_ids.min() >= 0 and r.topk_ids.max() < 16
    twice = [len(set(row)) < len(row) for row in r.topk_ids.tolist()]
    if name == "duplicates":  # a quarter of the tokens name slot 0's expert again in slot 1, and nothing else
        assert 0.15 < sum(twice) / len(twice) < 0.35 and all(
            (len(set(row)) == len(row) - 1) == (row[0] == row[1]) for row in r.topk_ids.tolist())
    else:
        assert not any(twice), "an expert twice in one token"
    assert (r.topk_weights > 0).all()
    torch.testing.assert_close(r.topk_weights.sum(1), torch.ones(r.num_tokens))
    again = R.make_routing(name, 200, 16, 4, seed=seed)
    assert torch.equal(r.topk_ids, again.topk_ids) and torch.equal(r.topk_weights, again.topk_weights)


def test_routing_properties(seed):
    counts = R.skewed(2000, 32, 4, seed=seed, exponent=1.2).counts()
    assert counts.max() > 4 * counts.float().median(), f"skewed is not skewed: {counts.tolist()}"
    hot = R.hot_expert(1000, 16, 4, seed=seed, share=0.75, expert=5).counts()
    assert 0.7 < hot[5] / 1000 < 0.8 and hot[5] == hot.max()
    assert (R.empty_experts(500, 16, 2, seed=seed, fraction=0.5).counts() == 0).sum() == 8
    r = R.empty_rank(300, 16, 4, seed=seed, ep_size=4, rank=2)
    assert R.rank_view(torch.zeros(300, 8), r, 4, 2).num_tokens == 0
    assert all(R.rank_view(torch.zeros(300, 8), r, 4, k).num_tokens > 0 for k in (0, 1, 3))
    assert R.single_token(50, 16, 4, seed=seed).num_tokens == 1
    b = R.boundary(160, 16, 4, seed=seed).counts()
    assert b[0] == 127 and b[15] == 129 and 128 in b.tolist()


def test_rank_view_is_deepep_normal_dispatch(seed):
    x = torch.arange(40, dtype=torch.float32)[:, None].expand(40, 8).to(torch.bfloat16)  # x carries its token id
    r = R.uniform(40, 8, 3, seed=seed)
    for rank in range(4):
        v = R.rank_view(x, r, 4, rank)
        lo, hi = 2 * rank, 2 * rank + 2
        has = ((r.topk_ids >= lo) & (r.topk_ids < hi)).any(1)
        assert v.token_index.tolist() == has.nonzero().flatten().tolist()  # global order, exactly those tokens
        assert torch.equal(v.x[:, 0].long(), v.token_index)  # each row is its token's row
        local = (v.topk_ids >= lo) & (v.topk_ids < hi)
        assert ((v.topk_ids == -1) | local).all() and (v.topk_weights[~local] == 0).all()
        assert v.counts.dtype == torch.int32 and v.counts.tolist() == [
            int((r.topk_ids == e).sum()) for e in range(lo, hi)]
    padded = R.pad_view(R.rank_view(x, r, 4, 0), 40)
    assert padded.num_tokens == 40 and (padded.token_index[-1] == -1) and padded.x[-1].isnan().all()


def test_raw_view_is_every_token_with_the_routers_ids(seed):
    x = torch.arange(40, dtype=torch.float32)[:, None].expand(40, 8).to(torch.bfloat16)
    r = R.uniform(40, 8, 3, seed=seed)
    for rank in range(4):
        v = R.raw_view(x, r, 4, rank)
        assert v.kind is R.ViewKind.RAW and v.topk_ids.dtype == torch.int32
        assert v.token_index.tolist() == list(range(40)) and torch.equal(v.x, x)
        assert torch.equal(v.topk_ids.long(), r.topk_ids) and torch.equal(v.topk_weights, r.topk_weights)
        assert v.counts.tolist() == R.rank_view(x, r, 4, rank).counts.tolist()  # the same local work


def test_layout_facts():
    counts = torch.tensor([3, 0, 128, 129])
    assert layouts.segment_starts(counts, 128).tolist() == [0, 128, 128, 256]
    assert layouts.padded_rows(counts, 128) == 512
    m = layouts.expected_m_indices(counts, 128)
    assert m[:3].tolist() == [0] * 3 and (m[3:128] == -1).all() and (m[128:256] == 2).all()
    assert (m[256:385] == 3).all() and (m[385:] == -1).all()


# ---- bad input names the argument --------------------------------------------------------------------------------

BAD_INPUTS = CONTRACT_BAD_INPUTS + [("mode", lambda a: a.update(mode="fast"))]


@pytest.mark.parametrize("argument,spoil", BAD_INPUTS, ids=bad_input_ids(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(argument, spoil):
    args = good_arguments()
    spoil(args)
    with pytest.raises(ValueError, match=argument):
        moe_reference(**args)


def test_non_tensor_raises_type_error():
    args = good_arguments()
    args["x"] = args["x"].tolist()
    with pytest.raises(TypeError, match="x"):
        moe_reference(**args)
