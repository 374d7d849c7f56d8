"""Each Triton stage and each grouped-GEMM backend against its reference (reference/stages.py, reference/layouts.py).

Layout facts are checked exactly and through output_index (never by row order); every output buffer is poisoned
(NaN / -2) before the stage runs, so an unwritten element shows; padding rows of GEMM outputs are never read."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kernels import activation
from kernels import scatter as S
from kernels._device import default_device
from kernels.activation import GATE_UP_ORDERS, silu_and_mul
from kernels.dispatch import (
    LAYOUTS,
    Layout,
    expected_fullest_rows,
    expected_local_slots,
    receive_share,
    speculative_block_rows,
    unsynced_block_rows,
)
from kernels.gather import gather
from kernels.gemm import BACKENDS, availability
from kernels.gemm import triton as triton_gemm
from reference import layouts
from reference import stages as ref
from reference.routing import make_routing, rank_view
from verify import bands, checks
from verify.cases import Sizes, nan_weights_on_skipped_slots, random_problem

DEVICE = default_device()
ROUTINGS = [("uniform", {}), ("skewed", {}), ("empty_experts", {}), ("boundary", {"counts": (127, 128, 129)}),
            ("hot_expert", {"share": 0.9})]


def tolerance(stage: str) -> dict:
    t = bands.STAGE_TOLERANCES[stage]
    return dict(rtol=t.rtol, atol=t.atol)


SMALL = Sizes(96, 128, 64, 8, 3)


def routed(routing="uniform", ep_size=1, rank=0, seed=0, sizes=SMALL, **params):
    """A rank's inputs on DEVICE: x, topk_ids (global, -1 for remote), weights (NaN on skipped slots), its weights."""
    p = random_problem(sizes, routing, seed, DEVICE, **params)
    view = rank_view(p.x, p.routing, ep_size, rank)
    weights = nan_weights_on_skipped_slots(view.topk_ids, view.topk_weights)
    w13, w2 = p.rank_weights(ep_size, rank)
    return view, weights, w13, w2


def scattered(layout, view, ep_size, rank, **options):
    """`options`: the scatter's own (block_rows, for the masked layout)."""
    routing = S.count_local_experts(view.topk_ids, ep_rank=rank, num_local_experts=view.num_local_experts,
                                    num_experts=view.num_experts)
    to = S.scatter_masked if layout is Layout.MASKED else S.scatter_contiguous
    return to(view.x, routing, alignment=128, empty=checks.poisoned_empty, **options)


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_count_local_experts_matches_reference(ep_size, seed):
    view, *_ = routed("skewed", ep_size, ep_size - 1, seed)
    ids = view.topk_ids.clone()
    ids[::5, 0] = -1  # router drops too
    for dtype in (torch.int32, torch.int64):
        got = S.count_local_experts(ids.to(dtype), ep_rank=ep_size - 1, num_local_experts=view.num_local_experts,
                                    num_experts=view.num_experts)
        want = layouts.local_expert_ids(ids, ep_size, ep_size - 1, view.num_experts)
        assert torch.equal(got.local_ids.long().cpu(), want.cpu())
        want_counts = layouts.expert_counts(want.cpu(), view.num_local_experts).tolist()
        assert list(got.counts_host) == want_counts == got.counts.cpu().tolist()


@pytest.mark.parametrize("bad", [-2, 8, 2**40])
def test_count_local_experts_rejects_out_of_range_ids(bad):
    ids = torch.zeros(4, 2, dtype=torch.int64, device=DEVICE)
    ids[2, 1] = bad
    with pytest.raises(ValueError, match="topk_ids"):
        S.count_local_experts(ids, ep_rank=0, num_local_experts=8, num_experts=8)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("routing,params", ROUTINGS, ids=[r for r, _ in ROUTINGS])
@pytest.mark.parametrize("ep_size,rank", [(1, 0), (2, 1), (4, 2)])
def test_scatter_holds_the_layout_contract(layout, routing, params, ep_size, rank, seed):
    sizes = Sizes(160, 128, 64, 16, 4) if routing == "boundary" else Sizes(96, 128, 64, 8, 3)
    view, *_ = routed(routing, ep_size, rank, seed, sizes, **params)
    dispatch = scattered(layout, view, ep_size, rank)
    assert checks.layout_problems(dispatch, view.x, view.local_ids(), 128) == []
    counts = dispatch.counts_host
    if layout is Layout.MASKED:  # sized from the largest count, not from M
        assert dispatch.block_rows == layouts.align_up(max(max(counts), 1), 128)
    else:
        assert dispatch.rows.shape[0] == layouts.padded_rows(torch.tensor(counts), 128)


def test_scatter_copies_rows_wider_than_the_columns_it_loads_at_once(seed):
    """A hidden size past the columns a scatter program loads at once (1024 under the interpreter, 8192 on a GPU),
    not a multiple of them: the later chunks, copied after the tickets are taken, land in the same rows, in all three
    forms of the scatter (synced masked and contiguous, and the fused route + scatter)."""
    hidden = S._scatter_config(1 << 20, 3)["BLOCK_H"] + 76
    view, *_ = routed("skewed", 2, 1, seed, Sizes(48, hidden, 64, 8, 3))
    for layout in LAYOUTS:
        assert checks.layout_problems(scattered(layout, view, 2, 1), view.x, view.local_ids(), 128) == []
    where = dict(ep_rank=1, num_local_experts=view.num_local_experts, num_experts=view.num_experts)
    fused, _ = S.route_scatter_masked(view.x, view.topk_ids, **where, block_rows=128, empty=checks.poisoned_empty)
    counts = tuple(S.route_local_experts(view.topk_ids, **where).counts.tolist())
    assert checks.layout_problems(dataclasses.replace(fused, counts_host=counts), view.x, view.local_ids(), 128) == []


@pytest.mark.parametrize("routing,params", ROUTINGS, ids=[r for r, _ in ROUTINGS])
@pytest.mark.parametrize("ep_size,rank", [(1, 0), (4, 2)])
@pytest.mark.parametrize("kept", [False, True], ids=["zeroed", "kept_counters"])
def test_route_scatter_masked_is_route_then_scatter_in_one_kernel(routing, params, ep_size, rank, kept, seed):
    """The decode path's fused kernel against its two stages: the same stats, fills and rows (the layout contract
    once the counts are known), and the stats it publishes to the host (poisoned first) the final ones. With counters
    the caller keeps (the eager decode call's), the same, and the counters zero again once it is done."""
    sizes = Sizes(160, 128, 64, 16, 4) if routing == "boundary" else SMALL
    view, *_ = routed(routing, ep_size, rank, seed, sizes, **params)
    where = dict(ep_rank=rank, num_local_experts=view.num_local_experts, num_experts=view.num_experts)
    block_rows = unsynced_block_rows(view.x.shape[0], 128)  # sized from M, as the decode path sizes it
    published = torch.full((view.num_local_experts + 2,), -2, dtype=torch.int32, pin_memory=DEVICE == "cuda")
    counters = torch.zeros(2 * view.num_local_experts + 3, dtype=torch.int32, device=DEVICE) if kept else None
    dispatch, stats = S.route_scatter_masked(view.x, view.topk_ids, **where, block_rows=block_rows, alignment=128,
                                             empty=checks.poisoned_empty, publish=published, counters=counters)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    routing_ = S.route_local_experts(view.topk_ids, **where)
    separate = S.scatter_masked(view.x, routing_, alignment=128, block_rows=block_rows)
    if kept:
        assert stats is None and not counters.any()
        stats = published
    assert stats.tolist() == routing_.stats.tolist() == published.tolist()
    assert dispatch.counts.tolist() == separate.counts.tolist() == routing_.counts.tolist()
    known = dataclasses.replace(dispatch, counts_host=tuple(routing_.counts.tolist()))
    assert checks.layout_problems(known, view.x, view.local_ids(), 128) == []


@pytest.mark.parametrize("num_experts,topk,ep_size", [(128, 8, 8), (256, 8, 8), (128, 4, 8), (16, 4, 4), (8, 2, 1)])
def test_decode_hint_expects_the_local_slots_of_uniform_routing(num_experts, topk, ep_size, seed):
    """`expected_local_slots` (the decode path's GEMM hint: its counts stay on the device) against the local slots of
    the tokens a rank receives from uniform routing: a one-sample t-test of the per-token local slots against the
    estimate's mean, which the old estimate (every slot local: k per token) and a forgotten receive share fail."""
    scipy_stats = pytest.importorskip("scipy.stats")
    routing = make_routing("uniform", 4096, num_experts, topk, seed=seed)
    view = rank_view(torch.empty(4096, 0), routing, ep_size, 0)
    per_token = (view.local_ids() >= 0).sum(dim=1).double()
    mean = expected_local_slots(view.num_tokens, topk, num_experts, view.num_local_experts) / view.num_tokens
    if ep_size == 1:
        assert mean == topk and (per_token == topk).all()
    else:
        assert scipy_stats.ttest_1samp(per_token.numpy(), mean).pvalue > 1e-6, (per_token.mean().item(), mean)


@pytest.mark.parametrize("num_local_experts", [2, 4, 16, 32])
def test_fullest_expert_hint_sits_just_above_the_expected_maximum(num_local_experts, seed):
    """`expected_fullest_rows` (the decode path's tile hint) against the mean largest count of 4000 multinomial draws
    (the slots of uniform routing over a rank's experts): above it, by less than 0.75 sigma (sigma = sqrt(mean))."""
    gen = np.random.default_rng(seed)
    for mean in (1, 6, 24, 100):
        largest = gen.multinomial(mean * num_local_experts, [1 / num_local_experts] * num_local_experts, size=4000)
        expected_max = largest.max(axis=1).mean()
        above = (expected_fullest_rows(mean, num_local_experts) - expected_max) / mean**0.5
        assert 0 < above < 0.75, (mean, expected_max, above)


@pytest.mark.long
@pytest.mark.parametrize("num_tokens,num_experts,topk,ep_size", [(4096, 128, 8, 8), (256, 256, 8, 8), (64, 128, 4, 8),
                                                                  (1024, 16, 4, 1)])
def test_the_early_block_holds_the_fullest_expert_of_uniform_routing(num_tokens, num_experts, topk, ep_size):
    """`speculative_block_rows` without alignment (the tail bound itself) against the fullest expert of the tokens a
    rank receives from 200 uniform routings (seeds 0-199: the same draws every run): it must hold every one of them (a
    bound missed once in 1000 batches at most) and stay within a few sigma of the mean, not the M-row block."""
    num_local_experts = num_experts // ep_size
    share = receive_share(num_experts, num_local_experts, topk)  # of the global tokens, those the rank receives
    fullest, received = [], []
    for seed in range(200):
        routing = make_routing("uniform", int(num_tokens / share * 1.5) + 32, num_experts, topk, seed=seed)
        local = rank_view(torch.empty(routing.topk_ids.shape[0], 0), routing, ep_size, 0).local_ids()[:num_tokens]
        received.append(local.shape[0])
        fullest.append(int(layouts.expert_counts(local, num_local_experts).max()))
    assert min(received) == num_tokens  # each draw gave the rank num_tokens tokens
    bound = speculative_block_rows(num_tokens, topk, num_experts, num_local_experts, 1)
    mean = expected_local_slots(num_tokens, topk, num_experts, num_local_experts) / num_local_experts
    assert max(fullest) <= bound < num_tokens
    assert bound - mean < 6 * mean**0.5 + 8, (bound, mean, max(fullest))


@pytest.mark.parametrize("bad", [-2, 8, 2**40])
@pytest.mark.parametrize("kept", [False, True], ids=["zeroed", "kept_counters"])
def test_route_scatter_masked_counts_bad_ids_and_drops_slots_past_the_block(bad, kept):
    """Out-of-range ids are counted, never placed; a row repeating an id past its block drops the extra slots
    (counted, output_index -1, nothing written past the block). Kept counters are zero again after it all."""
    x = torch.randn(130, 64, device=DEVICE).to(torch.bfloat16)
    ids = torch.zeros(130, 2, dtype=torch.int64, device=DEVICE)  # 260 slots on expert 0: 132 past a 128-row block
    ids[5, 1] = bad
    published = torch.full((10,), -2, dtype=torch.int32, pin_memory=DEVICE == "cuda")
    counters = torch.zeros(2 * 8 + 3, dtype=torch.int32, device=DEVICE) if kept else None
    dispatch, stats = S.route_scatter_masked(x, ids, ep_rank=0, num_local_experts=8, num_experts=8, block_rows=128,
                                             alignment=128, empty=checks.poisoned_empty, publish=published,
                                             counters=counters)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    if kept:
        assert stats is None and not counters.any()
        stats = published
    *histogram, num_bad, dropped = stats.tolist()
    assert (histogram[0], num_bad, dropped) == (259, 1, 259 - 128)
    assert published.tolist() == stats.tolist()  # what sync="after" reads: the final stats, drops included
    assert dispatch.counts.tolist() == [128] + [0] * 7
    index = dispatch.output_index.cpu()
    assert int((index >= 0).sum()) == 128 and int(index[5, 1]) == -1
    placed = index[index >= 0].long()
    assert sorted(placed.tolist()) == list(range(128))
    tokens = (index >= 0).nonzero()[:, 0]
    assert checks.bitwise_equal(dispatch.flat_rows().cpu()[placed], x.cpu()[tokens])


@pytest.mark.parametrize("counters", [torch.zeros(18, dtype=torch.int32), torch.zeros(19, dtype=torch.int64)],
                         ids=["short", "int64"])
def test_route_scatter_masked_refuses_counters_it_cannot_keep(counters):
    x = torch.randn(4, 64, device=DEVICE).to(torch.bfloat16)
    ids = torch.zeros(4, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="counters must be int32 \\[19\\]"):
        S.route_scatter_masked(x, ids, ep_rank=0, num_local_experts=8, num_experts=8, block_rows=128,
                               counters=counters.to(DEVICE))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate_up_order", ["gate_up", "up_gate"])
def test_silu_and_mul_computes_valid_rows_only(layout, gate_up_order, seed):
    view, *_ = routed("skewed", 2, 0, seed)
    _check_silu_and_mul(scattered(layout, view, 2, 0), gate_up_order)


def test_silu_and_mul_in_a_block_mostly_padding(seed):
    """A masked block of many more rows than tokens (the decode path's M-row blocks), where a GPU runs several rows
    per program (kernels/activation.py, _MAX_IDLE_PROGRAMS) instead of one."""
    view, *_ = routed("uniform", 2, 1, seed)
    dispatch = scattered(Layout.MASKED, view, 2, 1, block_rows=4352)
    if DEVICE == "cuda":
        assert activation._config(dispatch, 96)["BLOCK_R"] > 1, "the block no longer takes the form this test covers"
    _check_silu_and_mul(dispatch, "gate_up")


def _check_silu_and_mul(dispatch, gate_up_order):
    """silu_and_mul's valid rows against the faithful reference, its padding rows never written (poisoned output)."""
    valid = checks.valid_row_mask(dispatch).to(DEVICE)
    h = torch.randn(*dispatch.rows.shape[:-1], 2 * 96, device=DEVICE).to(torch.bfloat16)
    h.view(-1, h.shape[-1])[~valid] = float("nan")  # padding rows of the GEMM output are unspecified
    a = silu_and_mul(h, dispatch, gate_up_order=gate_up_order, empty=checks.poisoned_empty)
    flat_a, flat_h = a.view(-1, a.shape[-1]), h.view(-1, h.shape[-1])
    want = ref.silu_and_mul(flat_h[valid], gate_up_order, faithful=True).to(torch.bfloat16)
    torch.testing.assert_close(flat_a[valid], want, **tolerance("silu_and_mul"))
    assert flat_a[~valid].isnan().all(), "a padding row was computed or written"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hidden", [64, 320, pytest.param(2880, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("ep_size,rank", [(1, 0), (4, 3)])
def test_gather_weights_every_local_slot_in_order(layout, hidden, ep_size, rank, seed):
    view, weights, *_ = routed("skewed", ep_size, rank, seed, Sizes(64, hidden, 64, 8, 4))
    dispatch = scattered(layout, view, ep_size, rank)
    y = torch.randn(*dispatch.rows.shape, device=DEVICE).to(torch.bfloat16)
    y.view(-1, hidden)[~checks.valid_row_mask(dispatch).to(DEVICE)] = float("nan")
    out = gather(y, dispatch, weights, empty=checks.poisoned_empty)
    index = dispatch.output_index.long()
    y_slots = y.view(-1, hidden)[index.clamp_min(0)]
    want = ref.weighted_sum(y_slots, weights, index, faithful=True).to(torch.bfloat16)  # index >= 0: local
    torch.testing.assert_close(out, want, **tolerance("gather"))


def test_gather_writes_zero_rows_for_tokens_without_local_slot(seed):
    view, weights, *_ = routed("uniform", 4, 1, seed)
    view_ids = view.topk_ids.clone()
    view_ids[:7] = -1  # these tokens now have nothing local
    view = dataclasses.replace(view, topk_ids=view_ids)
    dispatch = scattered("contiguous", view, 4, 1)
    y = torch.randn(*dispatch.rows.shape, device=DEVICE).to(torch.bfloat16)
    out = gather(y, dispatch, weights, empty=checks.poisoned_empty)
    assert torch.equal(out[:7], torch.zeros_like(out[:7]))
    assert torch.isfinite(out).all()


def _backends():
    marks = {"deep_gemm": [pytest.mark.deep_gemm], "triton": [], "grouped_mm": [], "loop": []}
    return [pytest.param(name, marks=marks[name]) for name in BACKENDS]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("routing,params", [("skewed", {}), ("empty_experts", {}),
                                            ("boundary", {"counts": (127, 128, 129)})], ids=["skewed", "empty", "bnd"])
def test_grouped_gemm_backend_matches_reference_on_valid_rows(backend, layout, routing, params, seed):
    ok, why = availability(backend, DEVICE, 128, 64)
    if not ok:
        pytest.skip(why)
    sizes = Sizes(160, 128, 64, 16, 4) if routing == "boundary" else Sizes(96, 128, 64, 8, 3)
    view, _, w13, _ = routed(routing, 2, 1, seed, sizes, **params)
    dispatch = scattered(layout, view, 2, 1)
    d = BACKENDS[backend](dispatch.rows, w13, dispatch, checks.poisoned_empty)
    assert_gemm_matches_reference(dispatch, w13, d, f"{backend} {layout}")


def assert_gemm_matches_reference(dispatch, w, d, label: str) -> None:
    """d = the rows of `dispatch` times w[e]ᵀ on each expert's valid rows (counts_host says which)."""
    assert d.shape == (*dispatch.rows.shape[:-1], w.shape[1])
    flat_a, flat_d = dispatch.flat_rows(), d.reshape(-1, w.shape[1])
    rows_of = checks.valid_row_mask(dispatch).nonzero().flatten()
    experts = torch.repeat_interleave(torch.arange(dispatch.num_local_experts), torch.tensor(dispatch.counts_host))
    for e in experts.unique().tolist():
        rows = rows_of[experts == e].to(DEVICE)
        want = ref.gemm_nt(flat_a[rows], w[e], faithful=True).to(torch.bfloat16)
        torch.testing.assert_close(flat_d[rows], want, **tolerance("gemm"), msg=f"{label} expert {e}")


# form -> tokens, of which expert 0 (rank 0's first, of 4) receives all, the other 7 experts sharing the rest: counts
# on the host with few rows (16-row tiles) or more (32-row tiles, two splits), on the device (decode) with the
# scatter's hint (32-row tiles, four splits), or with a hint far below the counts, as skewed routing makes it (16-row
# tiles in four splits for a 96-row expert: a split sweeps more than one tile)
SKINNY_FORMS = {"host_counts_few": 12, "host_counts": 40, "decode": 40, "decode_underestimated": 96}


@pytest.mark.parametrize("gate_up_order", GATE_UP_ORDERS)
@pytest.mark.parametrize("form", SKINNY_FORMS)
def test_skinny_gate_up_silu_is_the_two_stages(gate_up_order, form, seed):
    """The Triton skinny kernel (a masked block with few rows per expert) against the reference GEMM, and with
    silu_and_mul fused into the gate+up GEMM: the unfused GEMM + silu_and_mul's bits on every valid row, and no other
    row written; both tile sizes, and splits that sweep more than one tile (`SKINNY_FORMS`)."""
    gemm = BACKENDS["triton"]
    ok, why = availability("triton", DEVICE, 128, 64)
    if not ok:
        pytest.skip(why)
    tokens = SKINNY_FORMS[form]
    view, _, w13, _ = routed("boundary", 2, 0, seed, Sizes(tokens, 128, 64, 8, 2), counts=(tokens,))
    small = triton_gemm.SKINNY_TILE_ROWS[0]
    if form.startswith("decode"):
        where = dict(ep_rank=0, num_local_experts=view.num_local_experts, num_experts=view.num_experts)
        dispatch, _ = S.route_scatter_masked(view.x, view.topk_ids, **where, alignment=128, empty=checks.poisoned_empty,
                                             block_rows=unsynced_block_rows(view.x.shape[0], 128))
        counts = dispatch.counts.tolist()
        if form == "decode_underestimated":
            dispatch = dataclasses.replace(dispatch, expected_slots=4.0)
            assert dispatch.rows_hint <= small < max(counts) / triton_gemm.SKINNY_SPLITS_UNSEEN
        else:
            assert dispatch.rows_hint > small
    else:
        dispatch = scattered(Layout.MASKED, view, 2, 0)
        counts = list(dispatch.counts_host)
        assert (dispatch.rows_hint <= small) == (form == "host_counts_few")
    assert gemm.runs_skinny(dispatch)
    a = gemm.gate_up_silu(dispatch.rows, w13, dispatch, gate_up_order, checks.poisoned_empty)
    h = gemm(dispatch.rows, w13, dispatch, checks.poisoned_empty)
    want = silu_and_mul(h, dispatch, gate_up_order=gate_up_order, empty=checks.poisoned_empty)
    known = dataclasses.replace(dispatch, counts_host=tuple(counts))
    assert_gemm_matches_reference(known, w13, h, f"skinny {form}")
    valid = checks.valid_row_mask(known).to(DEVICE)
    flat_a, flat_want = a.view(-1, a.shape[-1]), want.view(-1, want.shape[-1])
    assert torch.isfinite(flat_a[valid]).all(), "a valid row was not written"
    assert checks.bitwise_equal(flat_a[valid], flat_want[valid])
    assert flat_a[~valid].isnan().all(), "a row past masked_m was written"


def test_skinny_kernel_leaves_blocks_with_many_rows_to_the_tiled_kernel():
    """Past SKINNY_MAX_ROWS rows in the fullest expert the tiled kernel runs, unfused (gate_up_silu says so: None);
    the other GEMM tests cover it in both layouts."""
    view, _, w13, _ = routed("boundary", 2, 1, 0, Sizes(160, 128, 64, 16, 4), counts=(127, 128, 129))
    dispatch = scattered(Layout.MASKED, view, 2, 1)
    gemm = BACKENDS["triton"]
    assert dispatch.rows_hint > triton_gemm.SKINNY_MAX_ROWS and not gemm.runs_skinny(dispatch)
    assert gemm.gate_up_silu(dispatch.rows, w13, dispatch, "gate_up", checks.poisoned_empty) is None
