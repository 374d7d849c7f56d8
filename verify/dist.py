"""torchrun --nproc-per-node N -m verify.dist --case NAME [--impl MODULE:CALLABLE] [--layout L] [--json PATH]
                                            [--transport all_to_all|deep_ep] [--inject drop-token]
torchrun --nproc-per-node N -m verify.dist --bench M [--shape deepseek|qwen3|gpt_oss] [--json PATH]

Real expert parallelism over torch.distributed: every rank builds the same global batch from the case and the seed,
owns an even share of its tokens, and sends each token to the ranks that own its experts (ids rewritten as DeepEP's
normal dispatch does: another rank's expert -> -1, weight 0); each rank runs the implementation on what it received
(the receive buffer padded with rows of -1 ids), sends the output rows back, and each token's owner sums them. The
transport is `all_to_all_single` (NCCL on GPUs, gloo on a CPU), or DeepEP's normal-mode dispatch / combine where
`deep_ep` is installed.

Checks: the dispatch itself, with rank-tagged payloads (every token is checked against the single-process rank view
of reference.routing: a token at the wrong rank, twice, missing, or with altered x or ids is a dispatch error, not a
numeric one); each rank's expert stage, judged like a verify.diff row (bands against the references of what it
received, then the probes); and the combined output of every token, against the ep_size = 1 references of the global
batch. Rank 0 prints the same table as verify.diff, one row per rank and layout plus the combined row, and the
failing rows name their rank. Exit 0 when every row passes, 1 otherwise (every process exits alike; a usage error,
or a rank out of device memory, which it names, exits 2 in every process: no verdict).

--bench M: the DeepSeek-like shape (or --shape), M tokens owned per rank, uniform routing: dispatch, expert stage and
combine timed on every rank (CUDA events, median of the repetitions), with the all-to-all bandwidth of the same bytes
measured in the same run as the ceiling.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, set here before any process
group exists): on shared machines a program that uses it can put the host's GPUs out of service.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from kernels.dispatch import LAYOUTS, Layout  # noqa: E402
from reference import moe_reference  # noqa: E402
from reference.layouts import expert_counts, local_expert_ids  # noqa: E402
from reference.routing import RankView, combine, make_routing, pad_view, rank_view  # noqa: E402
from verify import bands  # noqa: E402
from verify.cases import (  # noqa: E402
    CASES_BY_NAME,
    DEEPSEEK_V3,
    GPT_OSS,
    QWEN3_30B,
    Problem,
    expert_weights,
    make_problem,
    normal,
)
from verify.findings import Check, Finding, Verdict, failure  # noqa: E402
from verify.impls import UsageError, implementation, load, no_verdict  # noqa: E402
from verify.metrics import compare  # noqa: E402
from verify.probes import Trial  # noqa: E402
from verify.sweep import Row, default_scale, judge, judge_rank  # noqa: E402

DEFAULT_IMPL = "kernels:moe_expert_forward"
SHAPES = {s.name: s for s in (DEEPSEEK_V3, QWEN3_30B, GPT_OSS)}


@dataclasses.dataclass
class Received:
    """What one rank received: rows in global token order (the dispatcher's view), and how to send outputs back."""

    view: RankView  # GLOBAL ids (-1 for other ranks' experts), weight 0 there; token_index: global token ids
    send_counts: list[int]  # rows this rank sent to each rank
    recv_counts: list[int]  # rows it received from each rank
    sent_index: torch.Tensor  # the global token of each row it sent, in send order (for the combine)


# ---- transport: all_to_all_single ---------------------------------------------------------------------------------

def _exchange(tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """all_to_all_single of the rows of `tensor`, bit for bit (float rows travel as their bytes: gloo moves no bf16)."""
    data = tensor.contiguous().view(torch.uint8) if tensor.dtype.is_floating_point else tensor.contiguous()
    out = torch.empty((sum(recv_counts), *data.shape[1:]), dtype=data.dtype, device=data.device)
    dist.all_to_all_single(out, data, recv_counts, send_counts)
    return out.view(tensor.dtype) if tensor.dtype.is_floating_point else out


def dispatch_all_to_all(problem: Problem, mine: torch.Tensor, world: int, rank: int, drop_token: bool) -> Received:
    """Send each of my tokens to every rank that owns one of its experts; receive mine."""
    ids = problem.routing.topk_ids[mine]
    owner = torch.where(ids >= 0, ids // (problem.sizes.num_experts // world), -1)
    send_rows, send_ids, send_weights, send_counts = [], [], [], []
    for dest in range(world):
        goes = (owner == dest).any(dim=1).nonzero().flatten()
        if drop_token and rank == 0 and dest == world - 1 and goes.numel():  # a dispatch bug: one token lost
            goes = goes[1:]
        send_rows.append(goes)
        here = owner[goes] == dest
        send_ids.append(torch.where(here, ids[goes], -1))
        send_weights.append(torch.where(here, problem.routing.topk_weights[mine][goes], 0.0))
        send_counts.append(goes.numel())
    counts = torch.tensor(send_counts, dtype=torch.int64, device=problem.x.device)
    received_counts = torch.empty_like(counts)
    dist.all_to_all_single(received_counts, counts)
    recv_counts = received_counts.tolist()
    rows = torch.cat(send_rows)
    sent_index = mine[rows]
    token_index = _exchange(sent_index, send_counts, recv_counts)
    x = _exchange(problem.x[sent_index], send_counts, recv_counts)
    topk_ids = _exchange(torch.cat(send_ids), send_counts, recv_counts)
    weights = _exchange(torch.cat(send_weights), send_counts, recv_counts)
    num_local_experts = problem.sizes.num_experts // world
    local = local_expert_ids(topk_ids, world, rank, problem.sizes.num_experts)
    view = RankView(world, rank, problem.sizes.num_experts, x, topk_ids, weights, token_index,
                    expert_counts(local.cpu(), num_local_experts).to(torch.int32))
    return Received(view, send_counts, recv_counts, sent_index)


def combine_all_to_all(out: torch.Tensor, received: Received, mine: torch.Tensor) -> torch.Tensor:
    """Send every output row back to its token's owner; each owner sums its tokens' rows (fp32, in rank order)."""
    back = _exchange(out, received.recv_counts, received.send_counts)
    total = torch.zeros(mine.numel(), out.shape[1], dtype=torch.float32, device=out.device)
    total.index_add_(0, received.sent_index - (mine[0] if mine.numel() else 0), back.float())  # mine: a range
    return total


# ---- transport: DeepEP (where installed) ---------------------------------------------------------------------------

def deep_ep_unavailable() -> str | None:
    """None when DeepEP's normal mode can run here, else why not."""
    try:
        import deep_ep  # noqa: F401
    except Exception as exc:
        return f"deep_ep is not importable here ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "deep_ep needs CUDA GPUs"
    return None


class DeepEPTransport:
    """DeepEP's normal-mode dispatch and combine (its README's prefill example), the same checks around them.
    DeepEP hands back LOCAL ids (-1 elsewhere); they are made GLOBAL again for the expert stage's contract."""

    def __init__(self, problem: Problem, world: int):
        import deep_ep

        self.buffer = deep_ep.Buffer(dist.group.WORLD, int(1e9), 0)
        self.num_experts = problem.sizes.num_experts
        self.world = world

    def dispatch(self, problem: Problem, mine: torch.Tensor, rank: int):
        ids, weights = problem.routing.topk_ids[mine], problem.routing.topk_weights[mine]
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(ids, self.num_experts)
        x, topk, w, _, self.handle, _ = self.buffer.dispatch(
            problem.x[mine], topk_idx=ids, topk_weights=weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        num_local_experts = self.num_experts // self.world
        topk_global = torch.where(topk >= 0, topk + rank * num_local_experts, -1)
        index = dist_token_index(x, problem)
        local = local_expert_ids(topk_global, self.world, rank, self.num_experts)
        view = RankView(self.world, rank, self.num_experts, x, topk_global, w, index,
                        expert_counts(local.cpu(), num_local_experts).to(torch.int32))
        return Received(view, [], [], mine)

    def combine(self, out: torch.Tensor, received: Received, mine: torch.Tensor) -> torch.Tensor:
        combined, _, _ = self.buffer.combine(out, self.handle)
        return combined.float()


def dist_token_index(x: torch.Tensor, problem: Problem) -> torch.Tensor:
    """The global token of each received row, found from its payload (a row of x is its token's fingerprint):
    DeepEP does not carry token ids, so the rank-tagged check matches payloads."""
    fingerprints = {bytes(row.view(torch.int16).cpu().numpy()): t for t, row in enumerate(problem.x)}
    return torch.tensor([fingerprints.get(bytes(row.view(torch.int16).cpu().numpy()), -1) for row in x],
                        dtype=torch.int64, device=x.device)


# ---- checks --------------------------------------------------------------------------------------------------------

def dispatch_problems(received: RankView, expected: RankView, problem: Problem) -> list[Finding]:
    """The rank-tagged payload check: what arrived at this rank against the single-process rank view."""
    got = received.token_index.cpu().tolist()
    want = set(expected.token_index.cpu().tolist())
    problems = []
    seen: set[int] = set()
    for row, token in enumerate(got):
        if token in seen:
            problems.append(f"token {token} arrived twice")
        elif token not in want:
            problems.append(f"token {token} arrived but has no expert on this rank")
        seen.add(token)
        if token >= 0 and not torch.equal(received.x[row].view(torch.int16), problem.x[token].view(torch.int16)):
            problems.append(f"token {token}'s x row arrived altered")
    problems += [f"token {t} has an expert on this rank but did not arrive" for t in sorted(want - seen)]
    if not problems:  # same tokens in the same order: the ids and weights must be the rank view's
        if not torch.equal(received.topk_ids.long(), expected.topk_ids.long()):
            problems.append("the ids that arrived are not the rank view's (another rank's expert kept, or lost)")
    return [failure(Check.DISPATCH, f"dispatch: {p}") for p in problems[:5]] + (
        [failure(Check.DISPATCH, f"dispatch: {len(problems) - 5} more")] if len(problems) > 5 else [])


def run_case(args, impl, world: int, rank: int, device: str) -> tuple[list[Row], bool, bool]:
    """Every row of one case on this rank (rank 0 also judges the combined rows). Returns rank 0's rows, whether
    any row failed, and, on every rank, whether any rank ran out of device memory (then there is no verdict)."""
    case = CASES_BY_NAME[args.case]
    scale = default_scale(device)
    problem = make_problem(case, args.seed, device, scale)
    mine = torch.tensor_split(torch.arange(problem.routing.num_tokens, device=device), world)[rank]
    expected = rank_view(problem.x, problem.routing, world, rank)
    w13, w2 = problem.rank_weights(world, rank)
    transport = DeepEPTransport(problem, world) if args.transport == "deep_ep" else None
    layouts = LAYOUTS if args.layout is None else (Layout(args.layout),)
    rows, combined, out_of_memory = [], {}, False
    for layout in layouts if impl.has_layouts else (None,):
        received = (transport.dispatch(problem, mine, rank) if transport else
                    dispatch_all_to_all(problem, mine, world, rank, args.inject == "drop-token"))
        view = pad_view(received.view, received.view.num_tokens + 8)  # a receive buffer padded past its rows
        row = Row(case.name, world, rank, layout, view.num_tokens)
        row.add(dispatch_problems(received.view, expected, problem))
        references = tuple(moe_reference(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=world,
                                         ep_rank=rank, num_experts=problem.sizes.num_experts, mode=mode)
                           for mode in ("faithful", "exact"))
        trial = Trial(impl, view, w13, w2, layout, args.seed, references=references,
                      table=bands.bands_for(problem.sizes.hidden, problem.sizes.inter))
        try:
            out = judge_rank(row, trial)
        except torch.OutOfMemoryError as exc:  # no verdict (verify.diff's answer); every rank learns it below
            out_of_memory = True
            no_verdict(f"verify.dist (rank {rank})", exc)
            out = None
        if out is None:  # keep the exchange going: a crashed rank sends zeros and fails its row
            out = torch.zeros_like(view.x)
        real = out[: received.view.num_tokens]
        mine_out = (transport.combine(real, received, mine) if transport else
                    combine_all_to_all(real, received, mine))
        rows.append(row)
        combined[layout] = mine_out
    short = torch.tensor([int(out_of_memory)], device=device)
    dist.all_reduce(short, op=dist.ReduceOp.MAX)
    if short.item():
        return [], False, True
    gathered_rows = [None] * world
    dist.all_gather_object(gathered_rows, rows)
    gathered_out = {layout: _gather_rows(out, world) for layout, out in combined.items()}
    if rank != 0:
        return [], False, False
    result = []
    for i, layout in enumerate(combined):
        result += [r[i] for r in gathered_rows]
        result.append(_combined_row(case.name, problem, world, layout, gathered_out[layout]))
    return result, any(r.verdict is Verdict.FAIL for r in result), False


def _gather_rows(rows: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (ranks may hold different numbers of rows)."""
    sizes = [None] * world
    dist.all_gather_object(sizes, rows.shape[0])
    parts = [torch.empty(n, rows.shape[1], dtype=rows.dtype, device=rows.device) for n in sizes]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


def _combined_row(name: str, problem: Problem, world: int, layout, total: torch.Tensor) -> Row:
    """Every token's combined output against the ep_size = 1 references (as verify.sweep's combined rows)."""
    row = Row(name, world, None, layout, problem.routing.num_tokens)
    views = [rank_view(problem.x, problem.routing, world, r) for r in range(world)]
    faithful = []
    for r, view in enumerate(views):
        w13, w2 = problem.rank_weights(world, r)
        faithful.append(moe_reference(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=world, ep_rank=r,
                                      num_experts=problem.sizes.num_experts, mode="faithful"))
    faithful = combine(views, faithful, problem.routing.num_tokens)
    exact = moe_reference(problem.x, problem.routing.topk_ids, problem.routing.topk_weights, problem.w13, problem.w2,
                          mode="exact")
    ids = problem.routing.topk_ids
    metrics = compare(total, faithful, exact, ids)
    judge(row, metrics, bands.judge(metrics, bands.combine_bands(problem.sizes.hidden, problem.sizes.inter)),
          torch.arange(problem.routing.num_tokens), ids, expert_offset=0)
    return row


# ---- bench ---------------------------------------------------------------------------------------------------------

def bench(args, impl, world: int, rank: int, device: str) -> dict | None:
    """Dispatch, expert stage and combine timed on every rank at --bench M tokens per rank, with the all-to-all
    bandwidth of the dispatched bytes measured in the same run."""
    shape = SHAPES[args.shape]
    tokens = args.bench * world
    routing = make_routing("uniform", tokens, shape.num_experts, shape.topk, seed=args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = normal(tokens, shape.hidden, generator=gen, device=device)
    num_local_experts = shape.num_experts // world
    w13, w2 = expert_weights(num_local_experts, shape.hidden, shape.inter, gen, device)
    routing = dataclasses.replace(routing, topk_ids=routing.topk_ids.to(device),
                                  topk_weights=routing.topk_weights.to(device))
    problem = Problem(shape.sizes(tokens), x, routing, w13, w2)  # (w13/w2 here: this rank's experts only)
    mine = torch.tensor_split(torch.arange(tokens, device=device), world)[rank]

    def timed(fn, reps: int = 20) -> tuple[float, object]:
        result, times = None, []
        for i in range(reps + 3):
            dist.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
        return statistics.median(times), result

    dispatch_ms, received = timed(lambda: dispatch_all_to_all(problem, mine, world, rank, False))
    view = received.view
    kw = dict(ep_size=world, ep_rank=rank, num_experts=shape.num_experts)
    expert_ms, out = timed(lambda: impl(view.x, view.topk_ids, view.topk_weights, w13, w2, **kw))
    combine_ms, _ = timed(lambda: combine_all_to_all(out, received, mine))
    payload = problem.x[received.sent_index]  # the same bytes again, as one all-to-all: the transport's ceiling
    a2a_ms, _ = timed(lambda: _exchange(payload, received.send_counts, received.recv_counts))
    moved = sum(c for i, c in enumerate(received.send_counts) if i != rank) * shape.hidden * 2
    entry = dict(rank=rank, tokens_owned=int(mine.numel()), rows_received=view.num_tokens, dispatch_ms=dispatch_ms,
                 expert_ms=expert_ms, combine_ms=combine_ms, a2a_ms=a2a_ms, a2a_gbps=moved / a2a_ms / 1e6)
    entries = [None] * world
    dist.all_gather_object(entries, entry)
    return dict(shape=shape.describe(), tokens_per_rank=args.bench, world=world, card=torch.cuda.get_device_name(),
                ranks=entries) if rank == 0 else None


def main(argv=None) -> int:
    from verify.report import format_table

    p = argparse.ArgumentParser(prog="torchrun ... -m verify.dist", description=__doc__.split("\n\n")[1][:200])
    p.add_argument("--case", help="a catalogue case (verify/cases.py)")
    p.add_argument("--impl", default=DEFAULT_IMPL, help="MODULE:CALLABLE (default: %(default)s)")
    p.add_argument("--layout", choices=[str(layout) for layout in LAYOUTS], help="only this layout (default: both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transport", choices=("all_to_all", "deep_ep"), default="all_to_all")
    p.add_argument("--inject", choices=("drop-token",), help="break the dispatch on purpose (rank 0 drops one "
                   "token it sends to the last rank): the run must report a dispatch error")
    p.add_argument("--bench", type=int, metavar="M", help="time dispatch, expert stage and combine, M tokens per rank")
    p.add_argument("--shape", choices=SHAPES, default="deepseek", help="--bench: the model shape")
    p.add_argument("--json", help="rank 0 writes the rows (or the bench) here")
    args = p.parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    gpu = torch.cuda.is_available()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(torch.cuda.device_count(), 1)}" if gpu else "cpu"
    try:
        impl = implementation(load(args.impl), args.impl)
        if args.bench is None and args.case not in CASES_BY_NAME:
            raise UsageError(f"--case must be one of {', '.join(CASES_BY_NAME)} (or give --bench M)")
        if args.bench is not None and not gpu:
            raise UsageError("--bench times CUDA events: it needs GPUs")
        experts = SHAPES[args.shape].num_experts if args.bench else CASES_BY_NAME[args.case].sizes(
            default_scale(device)).num_experts
        if experts % world:
            raise UsageError(f"{experts} experts do not split over {world} ranks")
        if args.transport == "deep_ep" and deep_ep_unavailable():
            raise UsageError(f"--transport deep_ep is unavailable: {deep_ep_unavailable()}")
    except UsageError as exc:
        print(f"verify.dist (rank {rank}): error: {exc}", file=sys.stderr)
        return 2
    if gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if gpu else "gloo", device_id=torch.device(device) if gpu else None)
    try:
        if args.bench is not None:
            result = bench(args, impl, world, rank, device)
            if rank == 0:
                print(f"verify.dist bench: {result['shape']}, {world} ranks x {args.bench} tokens, {result['card']}")
                print("rank  rows received  dispatch ms  expert ms  combine ms  a2a GB/s (same bytes)")
                for e in result["ranks"]:
                    print(f"{e['rank']:4d}  {e['rows_received']:13d}  {e['dispatch_ms']:11.3f}  {e['expert_ms']:9.3f}  "
                          f"{e['combine_ms']:10.3f}  {e['a2a_gbps']:8.1f}")
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(result, f, indent=1)
            return 0
        rows, failed, out_of_memory = run_case(args, impl, world, rank, device)
        if out_of_memory:  # the rank that ran out said so; every rank exits 2
            dist.barrier()
            return 2
        flag = torch.tensor([int(failed)], device=device)
        dist.broadcast(flag, 0)
        if rank == 0:
            print(f"{CASES_BY_NAME[args.case].describe(default_scale(device))}\nimpl {args.impl}, {world} ranks "
                  f"({'nccl' if gpu else 'gloo'}, {args.transport}), seed {args.seed}")
            print(format_table(rows))
            for row in (r for r in rows if r.verdict is not Verdict.PASS):
                where = "combined" if row.rank is None else f"rank {row.rank}"
                print(f"\n{row.verdict} {row.test_id} ({where}): {'; '.join(f.message for f in row.problems)}")
            print(f"\n{sum(r.verdict is not Verdict.FAIL for r in rows)}/{len(rows)} rows pass")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(case=args.case, impl=args.impl, world=world, transport=args.transport,
                                   rows=[r.as_dict() for r in rows]), f, indent=1)
        dist.barrier()  # no rank exits (torchrun would stop the others) before rank 0 has reported
        return int(flag.item())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
