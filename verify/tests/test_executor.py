"""kernels.moe_expert_forward end to end against the reference, judged by the bands; its edge behaviours (M == 0,
all-remote, layout choice, buffer sizing), the decode path (counts left on the device: sync="after" / "never";
the caller's host_counts), inputs left alone, and bad input rejected naming the argument."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import Stages, choose_layout, executor, moe_expert_forward, scatter
from kernels._device import default_device
from kernels.dispatch import (
    LAYOUTS,
    M_ALIGNMENT,
    Layout,
    masked_block_bytes,
    masked_bytes,
    speculative_block_rows,
    unsynced_block_rows,
)
from kernels.gemm import BACKENDS, availability
from kernels.gemm.loop import Loop
from reference import moe_reference
from reference.layouts import expert_counts
from reference.routing import rank_view
from verify import bands, checks
from verify.cases import Sizes, random_problem
from verify.findings import Verdict, worst
from verify.metrics import compare
from verify.tests.bad_inputs import CONTRACT_BAD_INPUTS, good_arguments
from verify.tests.bad_inputs import ids as bad_input_ids

DEVICE = default_device()
POISONED = Stages(empty=checks.poisoned_empty)


def _backends():
    return [pytest.param(n, marks=[pytest.mark.deep_gemm] if n == "deep_gemm" else []) for n in BACKENDS]


def check_rank(problem, ep_size, rank, **kwargs):
    """Run every rank's expert stage with poisoned buffers and judge it against both references."""
    view = rank_view(problem.x, problem.routing, ep_size, rank)
    w13, w2 = problem.rank_weights(ep_size, rank)
    order = kwargs.get("gate_up_order", "gate_up")
    out = moe_expert_forward(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=ep_size, ep_rank=rank,
                             **{"stages": POISONED, **kwargs})
    refs = [moe_reference(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=ep_size, ep_rank=rank,
                          gate_up_order=order, mode=mode) for mode in ("faithful", "exact")]
    metrics = compare(out.float(), *refs, view.local_ids())
    findings = bands.judge(metrics, bands.bands_for(view.x.shape[1], w2.shape[2]))
    assert worst(findings) is not Verdict.FAIL, f"ep={ep_size} rank={rank} {kwargs}: {findings} {metrics}"
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate_up_order", ["gate_up", "up_gate"])
@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_every_backend_layout_order_and_rank(backend, layout, gate_up_order, ep_size, seed):
    ok, why = availability(backend, DEVICE, 128, 64)
    if not ok:
        pytest.skip(why)
    problem = random_problem(Sizes(64, 128, 64, 8, 3), "skewed", seed, DEVICE)
    for rank in range(ep_size):
        check_rank(problem, ep_size, rank, layout=layout, gemm=backend, gate_up_order=gate_up_order)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("routing,sizes,params", [
    ("empty_rank", Sizes(64, 128, 64, 8, 3), {"ep_size": 4}),
    ("boundary", Sizes(160, 128, 64, 16, 4), {"counts": (127, 128, 129)}),
    ("uniform", Sizes(48, 320, 192, 8, 2), {}),  # H = 5 * 64: not a multiple of 512
    pytest.param("uniform", Sizes(256, 2880, 2880, 32, 4), {}, marks=pytest.mark.gpu),  # gpt-oss H
], ids=["empty_rank", "boundary-127-128-129", "odd_hidden", "gpt_oss_hidden"])
def test_routing_edge_cases_on_every_rank(layout, routing, sizes, params, seed):
    problem = random_problem(sizes, routing, seed, DEVICE, **params)
    for rank in range(4):
        check_rank(problem, 4, rank, layout=layout)


EDGE_CASES = [("empty_rank", Sizes(64, 128, 64, 8, 3), {"ep_size": 4}),
              ("boundary", Sizes(160, 128, 64, 16, 4), {"counts": (127, 128, 129)}),
              ("hot_expert", Sizes(200, 128, 64, 8, 2), {"share": 0.75})]


@pytest.mark.parametrize("sync", ["after", "never"])
@pytest.mark.parametrize("routing,sizes,params", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_the_unsynced_decode_path_passes_and_matches_the_synced_one(sync, routing, sizes, params, seed):
    """Counts left on the device (an M-row block per expert, masked_m read by the kernels): within the bands with
    poisoned buffers on every rank, and bit for bit the synced masked call wherever rows are position-independent."""
    problem = random_problem(sizes, routing, seed, DEVICE, **params)
    for rank in range(4):
        out = check_rank(problem, 4, rank, sync=sync)
        if DEVICE == "cpu":  # on a GPU DeepGEMM may tile an M-row block differently: the bands judge it there
            assert checks.bitwise_equal(out, check_rank(problem, 4, rank, layout="masked"))


def _with_host_counts(problem, ep_size, rank):
    view = rank_view(problem.x, problem.routing, ep_size, rank)
    return view, expert_counts(view.local_ids(), problem.sizes.num_experts // ep_size).tolist()


@pytest.mark.parametrize("sync", ["before", "after", "never"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_counts_replace_the_read_back(sync, layout, seed):
    problem = random_problem(Sizes(96, 128, 64, 8, 3), "skewed", seed, DEVICE)
    for rank in range(2):
        _, counts = _with_host_counts(problem, 2, rank)
        count_refused = Stages(count=_refuse, empty=checks.poisoned_empty)  # no read-back of the device's counts
        out = check_rank(problem, 2, rank, sync=sync, layout=layout, host_counts=counts, stages=count_refused)
        assert checks.bitwise_equal(out, check_rank(problem, 2, rank, layout=layout))


@pytest.mark.parametrize("sync", ["before", "after"])
def test_host_counts_the_ids_contradict_raise_naming_them(sync):
    problem = random_problem(Sizes(32, 64, 64, 4, 2), "uniform", 0, DEVICE)
    view, counts = _with_host_counts(problem, 2, 1)
    counts[0] += 1
    w13, w2 = problem.rank_weights(2, 1)
    with pytest.raises(ValueError, match="host_counts"):
        moe_expert_forward(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=2, ep_rank=1, sync=sync,
                           host_counts=counts)


def test_bad_ids_raise_after_the_work_is_queued_and_are_skipped_when_never_read():
    args = good_arguments(DEVICE)
    spoiled = args["topk_ids"].clone()
    spoiled[3, 1] = 99
    with pytest.raises(ValueError, match="topk_ids"):
        moe_expert_forward(**dict(args, topk_ids=spoiled, sync="after"))
    skipped = spoiled.clone()
    skipped[3, 1] = -1
    want = moe_expert_forward(**dict(args, topk_ids=skipped, layout="masked"))
    assert checks.bitwise_equal(moe_expert_forward(**dict(args, topk_ids=spoiled, sync="never")), want)
    # on a GPU the flags' pinned buffer is reused from call to call: a good call after a bad one reads its own flags
    for ids, fails in ((skipped, False), (spoiled, True), (skipped, False)):
        if fails:
            with pytest.raises(ValueError, match="topk_ids"):
                moe_expert_forward(**dict(args, topk_ids=ids, sync="after"))
        else:
            assert checks.bitwise_equal(moe_expert_forward(**dict(args, topk_ids=ids, sync="after")), want)


def test_a_row_repeating_an_id_past_the_m_row_block_is_dropped_and_flagged_never_written():
    """M = 100 rows each naming expert 0 twice: 200 slots for a block of 128 rows. sync="after" sees the flag and
    answers with the synced path; sync="never" drops the 72 slots without a trace outside the routing's stats, and
    its masked_m says the 128 rows the block holds, so no GEMM reads past it."""
    problem = random_problem(Sizes(100, 64, 64, 4, 2), "uniform", 0, DEVICE)
    ids = torch.zeros_like(problem.routing.topk_ids)
    args = (problem.x, ids, problem.routing.topk_weights, problem.w13, problem.w2)
    synced = moe_expert_forward(*args)
    scattered = []
    seen = Stages(route_scatter_masked=lambda *a, **kw: scattered.append(scatter.route_scatter_masked(*a, **kw))
                  or scattered[-1], empty=checks.poisoned_empty)
    assert checks.bitwise_equal(moe_expert_forward(*args, sync="after", stages=seen), synced)
    moe_expert_forward(*args, sync="never", stages=seen)
    assert [int(stats[-1]) for _, stats in scattered] == [72, 72]  # LocalRouting.stats: [..., bad, dropped]
    never = scattered[-1][0]
    assert never.block_rows == 128 and never.counts.tolist() == [128, 0, 0, 0]
    kept = never.output_index[never.output_index >= 0]
    assert kept.numel() == 128 and kept.unique().numel() == 128 and int(kept.max()) < 128  # block 0's rows, once each


def _refuse(*args, **kwargs):
    raise AssertionError("this stage must not run")


class _NoGemm(Loop):
    def __call__(self, *args, **kwargs):
        raise AssertionError("no GEMM may be launched")


def _decode_call(seed: int, tokens: int = 60, bad_id: bool = False):
    """A sync="after" call of rank 0 of 2; another seed is another batch of as many rows (the rows shuffled, new x);
    `bad_id`: its first id out of range."""
    problem = random_problem(Sizes(tokens, 64, 32, 8, 2), "uniform", 0, DEVICE)
    view = rank_view(problem.x, problem.routing, 2, 0)
    w13, w2 = problem.rank_weights(2, 0)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(view.x.shape[0], generator=gen).to(view.x.device)
    x = torch.randn(view.x.shape, generator=gen).to(view.x)
    ids = view.topk_ids[rows]
    if bad_id:
        ids[0, 0] = 8
    return lambda **kw: moe_expert_forward(x, ids, view.topk_weights[rows], w13, w2, ep_size=2, ep_rank=0,
                                           **{"sync": "after", **kw})


def test_the_decode_path_keeps_its_intermediates_and_no_stale_row_shows(monkeypatch):
    """sync="after" takes its intermediates (the scatter's counters, rows, output_index, masked_m, h, a, y) from
    buffers kept for its call shape: the next call of that shape allocates none of them; whatever they hold before it
    (NaN and POISON_INT here, as another batch would leave them) changes no bit of its output, which is the freshly
    poisoned call's; and the counters, zeroed once, are zero again after every call (the scatter resets them, even
    in a call that raises on bad ids), so no memset is launched."""
    monkeypatch.setattr(executor, "_KEPT", {})
    _decode_call(0)()
    [(key, kept)] = executor._KEPT.items()
    counters, *intermediates = kept
    assert counters.dtype == torch.int32 and counters.shape == (2 * 4 + 3,) and not counters.any()
    assert len(intermediates) >= 5  # rows, output_index, masked_m, a, y (h too where silu is not fused)
    for buffer in intermediates:
        buffer.fill_(float("nan") if buffer.dtype.is_floating_point else checks.POISON_INT)
    addresses = [buffer.data_ptr() for buffer in kept]
    call = _decode_call(1)
    out = call()
    assert [buffer.data_ptr() for buffer in executor._KEPT[key]] == addresses and not counters.any()
    assert checks.bitwise_equal(out, call(stages=POISONED))
    assert not any(out.data_ptr() == address for address in addresses)  # the output is the caller's, never kept
    with pytest.raises(ValueError, match="topk_ids"):
        _decode_call(2, bad_id=True)()
    assert not counters.any() and checks.bitwise_equal(call(), out)
    never = call(sync="never")  # the same kept buffers: the scatter resets its counters without publishing its stats
    assert [buffer.data_ptr() for buffer in executor._KEPT[key]] == addresses and not counters.any()
    assert checks.bitwise_equal(never, out)


def test_kept_buffers_are_bounded_in_size_and_in_call_shapes(monkeypatch):
    """At most KEPT_SHAPES call shapes (the least recently used goes first), none over KEPT_MAX_BYTES; poisoned stages
    (a replaced Stages.empty) keep nothing."""
    monkeypatch.setattr(executor, "_KEPT", {})
    monkeypatch.setattr(executor, "KEPT_SHAPES", 2)
    blocks = []
    for tokens in (60, 250, 450, 250):  # three call shapes: M-row blocks of 128, 256 and 384 rows
        call = _decode_call(0, tokens)
        blocks.append(unsynced_block_rows(call().shape[0], M_ALIGNMENT))
    assert blocks == [128, 256, 384, 256]
    assert [key[4] for key in executor._KEPT] == [384, 256]  # (device, stream, thread, E_local, block_rows, ...)
    executor._KEPT.clear()
    _decode_call(0)(stages=POISONED)
    assert not executor._KEPT
    monkeypatch.setattr(executor, "KEPT_MAX_BYTES", masked_bytes(4, 128, 64, 32) - 1)
    _decode_call(0)()
    assert not executor._KEPT


def test_empty_batch_returns_empty_and_launches_nothing():
    problem = random_problem(Sizes(8, 64, 64, 4, 2), "uniform", 0, DEVICE)
    nothing = Stages(count=_refuse, route=_refuse, route_scatter_masked=_refuse, scatter_masked=_refuse,
                     scatter_contiguous=_refuse, gemm=_NoGemm())
    out = moe_expert_forward(problem.x[:0], problem.routing.topk_ids[:0], problem.routing.topk_weights[:0],
                             problem.w13, problem.w2, stages=nothing)
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16


def test_all_remote_ids_return_zeros_without_gemm():
    problem = random_problem(Sizes(16, 64, 64, 8, 2), "empty_rank", 0, DEVICE, ep_size=4, rank=1)
    w13, w2 = problem.rank_weights(4, 1)
    ids = problem.routing.topk_ids.clone()
    ids[0, 0] = -1
    out = moe_expert_forward(problem.x, ids, problem.routing.topk_weights, w13, w2, ep_size=4, ep_rank=1,
                             stages=dataclasses.replace(POISONED, gemm=_NoGemm(), scatter_masked=_refuse,
                                                        scatter_contiguous=_refuse))
    assert torch.equal(out, torch.zeros_like(out))


def _layout_taken(m_tokens, stages_change=None, **kwargs):
    seen = []
    record = Stages(after_scatter=lambda d: seen.append(d) or d, **(stages_change or {}))
    problem = random_problem(Sizes(m_tokens, 64, 64, 4, 2), "uniform", 0, DEVICE)
    moe_expert_forward(problem.x, problem.routing.topk_ids, problem.routing.topk_weights, problem.w13, problem.w2,
                       stages=record, **kwargs)
    return seen[0]


def test_masked_max_tokens_is_the_seed_rule():
    assert _layout_taken(40, masked_max_tokens=40).layout == "masked"
    assert _layout_taken(41, masked_max_tokens=40).layout == "contiguous"
    assert _layout_taken(41, masked_max_tokens=40, layout="masked").layout == "masked"


def test_auto_layout_rule_reads_the_routing():
    few = [8] * 32
    assert choose_layout(few, 256, 7168, 2048, 128, None) == "masked"
    many = [2048] * 32  # mean rows per expert beyond the measured crossover
    assert choose_layout(many, 65536, 7168, 2048, 128, None) == "contiguous"
    skew = [1] * 31 + [8000]  # one hot expert: the masked block would hold 32 x 8064 rows
    assert choose_layout(skew, 8031, 7168, 2048, 128, None) == "contiguous"


def _read_first(**change) -> Stages:
    """Stages with which sync="before" reads the counts before it scatters."""
    return Stages(scatter_before_read=False, **change)


def _call(routing, seed=0, **options):
    """M = 400 tokens of 8 experts, top-3: the early block has 256 rows; a hot expert takes ~300 slots."""
    problem = random_problem(Sizes(400, 128, 96, 8, 3), routing, seed, DEVICE, **options)
    return (problem.x, problem.routing.topk_ids, problem.routing.topk_weights, problem.w13, problem.w2)


def _hot_expert_call(seed=0):
    return _call("hot_expert", seed, share=0.75)


def test_masked_block_read_first_is_sized_from_the_largest_count():
    dispatch = _layout_taken(200, layout="masked", stages_change=dict(scatter_before_read=False))
    assert dispatch.block_rows == -(-max(dispatch.counts_host) // 128) * 128 < 200 * 2


def test_the_early_scatter_fills_a_block_sized_before_the_counts():
    """sync="before" routes and scatters (one kernel) into a block of `speculative_block_rows` rows, then reads: the
    counts it read are the routing's, nothing is routed or scattered again, and the output is the read-first call's
    bit for bit. (Run twice: the first call may read first, if this process last saw these shapes overflow.)"""
    problem = random_problem(Sizes(600, 64, 64, 4, 2), "uniform", 0, DEVICE)
    args = (problem.x, problem.routing.topk_ids, problem.routing.topk_weights, problem.w13, problem.w2)
    early, seen = [], []
    stages = Stages(count=_refuse, route=_refuse, scatter_masked=_refuse, after_scatter=lambda d: seen.append(d) or d,
                    route_scatter_masked=lambda *a, **kw: early.append(scatter.route_scatter_masked(*a, **kw))
                    or early[-1], empty=checks.poisoned_empty)
    moe_expert_forward(*args, layout="masked", gemm="loop")
    out = moe_expert_forward(*args, layout="masked", gemm="loop", stages=stages)
    rows = speculative_block_rows(600, 2, 4, 4, M_ALIGNMENT)
    assert len(early) == 1 and seen[-1].block_rows == rows < 600  # (600 rows: the M-row block)
    assert seen[-1].counts_host == tuple(expert_counts(problem.routing.topk_ids.long(), 4).tolist())
    assert int(early[0][1][-1]) == 0  # nothing dropped
    read_first = _read_first(empty=checks.poisoned_empty)
    assert checks.bitwise_equal(out, moe_expert_forward(*args, layout="masked", gemm="loop", stages=read_first))


@pytest.mark.parametrize("layout", ["masked", "auto"])
def test_an_early_block_that_overflows_is_scattered_again_and_the_next_call_reads_first(layout):
    """A hot expert overflows the early block: its slots are dropped there and the call routes and scatters again
    into a block sized by the counts it read (no second read; "auto" applies the layout rule to those counts). The
    next call of these shapes reads first, until a call's counts fit the early block again."""
    hot, uniform = _hot_expert_call(), _call("uniform")
    early, seen = [], []
    stages = Stages(after_scatter=lambda d: seen.append(d) or d, empty=checks.poisoned_empty,
                    route_scatter_masked=lambda *a, **kw: early.append(scatter.route_scatter_masked(*a, **kw))
                    or early[-1])

    def run(args):
        before = len(early)
        out = moe_expert_forward(*args, layout=layout, gemm="loop", stages=stages)
        return out, len(early) > before

    run(uniform)  # early or not, as this process last saw these shapes; its counts fit the early block
    assert run(uniform)[1]
    out, scattered_early = run(hot)
    assert scattered_early and int(early[-1][1][-1]) > 0  # slots dropped in the early block
    assert seen[-1].block_rows == -(-max(seen[-1].counts_host) // 128) * 128 > early[-1][0].block_rows
    read_first = _read_first(empty=checks.poisoned_empty)
    assert checks.bitwise_equal(out, moe_expert_forward(*hot, layout=layout, gemm="loop", stages=read_first))
    again, scattered_early = run(hot)
    assert not scattered_early and checks.bitwise_equal(again, out)
    assert not run(uniform)[1] and run(uniform)[1]  # read first, saw counts that fit; then early again


def test_a_contiguous_choice_after_the_early_scatter_scatters_again_by_the_counts_read():
    args = _hot_expert_call(1)
    seen = []
    contiguous = Stages(choose_layout=lambda *a: Layout.CONTIGUOUS, after_scatter=lambda d: seen.append(d) or d,
                        empty=checks.poisoned_empty)
    out = moe_expert_forward(*args, gemm="loop", stages=contiguous)
    assert seen[0].layout is Layout.CONTIGUOUS
    read_first = moe_expert_forward(*args, layout="contiguous", gemm="loop", stages=Stages(empty=checks.poisoned_empty))
    assert checks.bitwise_equal(out, read_first)


def test_the_memory_budget_counts_exactly_what_the_masked_layout_allocates():
    """The layout rule's budget (kernels.dispatch.masked_block_bytes) and the buffers of a masked run are one
    computation: the bf16 blocks allocated (x, h, a, y) add up to the bytes the budget charged."""
    blocks, counts = [], []

    def recording_empty(shape, *, dtype, device):
        if dtype == torch.bfloat16 and len(shape) == 3:
            blocks.append(torch.Size(shape).numel() * 2)
        return torch.empty(shape, dtype=dtype, device=device)

    def count(*args, **kwargs):
        routing = scatter.count_local_experts(*args, **kwargs)
        counts.append(routing.counts_host)
        return routing

    problem = random_problem(Sizes(300, 128, 96, 8, 3), "hot_expert", 0, DEVICE, share=0.75)
    args = (problem.x, problem.routing.topk_ids, problem.routing.topk_weights, problem.w13, problem.w2)
    moe_expert_forward(*args, layout="masked", gemm="loop", stages=_read_first(empty=recording_empty, count=count))
    assert len(blocks) == 4 and sum(blocks) == masked_block_bytes(counts[0], 128, 96, M_ALIGNMENT)


def test_inputs_are_never_modified(seed):
    problem = random_problem(Sizes(32, 64, 64, 4, 2), "uniform", seed, DEVICE)
    args = (problem.x, problem.routing.topk_ids, problem.routing.topk_weights, problem.w13,
            problem.w2)
    before = [a.clone() for a in args]
    for layout in LAYOUTS:
        moe_expert_forward(*args, layout=layout)
    assert all(checks.bitwise_equal(a, b) for a, b in zip(args, before, strict=True))


BAD_INPUTS = CONTRACT_BAD_INPUTS + [
    ("layout", lambda a: a.update(layout="flat")),
    ("gemm", lambda a: a.update(gemm="cublas")),
    ("masked_max_tokens", lambda a: a.update(masked_max_tokens=-1)),
    ("sync", lambda a: a.update(sync="later")),
    ("host_counts", lambda a: a.update(host_counts=[1, 2])),  # E_local = 4
    ("host_counts", lambda a: a.update(host_counts=[1, 2, -1, 0])),
    ("layout", lambda a: a.update(sync="never", layout="contiguous")),  # sized by host counts, which it lacks
    ("H=", lambda a: a.update(x=a["x"][:, :8].contiguous(), w13=a["w13"][:, :, :8].contiguous(),
                              w2=a["w2"][:, :8].contiguous(), gemm="triton")),  # triton needs H % 16 == 0
]


@pytest.mark.parametrize("argument,spoil", BAD_INPUTS, ids=bad_input_ids(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(argument, spoil):
    args = good_arguments(DEVICE)
    spoil(args)
    with pytest.raises(ValueError, match=argument):
        moe_expert_forward(**args)


def test_wrong_type_raises_type_error():
    args = good_arguments(DEVICE)
    args["topk_weights"] = args["topk_weights"].tolist()
    with pytest.raises(TypeError, match="topk_weights"):
        moe_expert_forward(**args)
