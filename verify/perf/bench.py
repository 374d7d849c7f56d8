"""python -m verify.bench: time every stage and the whole expert stage, per layout and GEMM backend, beside peers and
ceilings measured in the same run.

For each bench case (verify/cases.py: a realistic shape at one ep_size, one routing) and each M (tokens RECEIVED by
rank 0):
- stages: count (+ the host sync), scatter, gemm1 (gate+up), silu_and_mul, gemm2 (down), gather, per layout and
  backend, each fed the real output of the stage before; on a GPU each stage also graphed (its GPU time alone);
- whole: kernels.moe_expert_forward per backend x layout, and the hybrid (layout="auto", gemm="auto"); on a GPU at
  M <= DECODE_MAX_TOKENS also the decode path, eager (`sync="after"`: no host sync before the last kernel is queued)
  and graphed (kernels.GraphedExpertStage, the replay of the captured graph alone: a serving engine writes the next
  batch into the captured buffers itself);
- peers: the torch-native pipeline (verify/perf/peers.py), the faithful reference;
- ceilings: a dense bf16 matmul of the same FLOPs (per M), on a GPU a copy of the bytes scatter and gather move (per
  M, graphed: what their size alone allows), and, once per run, a large device-to-device copy and a large dense
  matmul (the roofline's two roofs);
- on a GPU, scatter, gather, the copies of their bytes and the large copy also by their kernels' span in a profiler
  trace (`kernel_span_ms`): the bandwidths the report reads, without the launch a graph of one stage pays.
Timers (verify/perf/timing.py): a call as made (every eager whole-stage call, the peers, each stage as called) is
timed by back-to-back calls between CUDA events, as the gate times (do_bench's L2 flush races a call that waits for the
GPU inside, and hides a host-bound call's launches behind the flush); GPU work alone (graphed replays, the copies, the
matmuls) by do_bench, L2 flushed; on a CPU both by perf_counter (plumbing only). Every timing runs on the two CPUs the
gate's workers time on (verify/perf/procs.py, `shared_cpus`, near the GPU): a host-bound point's time follows the
core it runs on. Every whole-stage output is also judged against the faithful reference with verify.bands.
verify/perf/report.py turns the points into the targets table, the fitted layout rule and the plots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch
import triton

from kernels import GraphedExpertStage, activation, gather, moe_expert_forward, scatter
from kernels._device import default_device
from kernels.dispatch import LAYOUTS, Layout, masked_block_bytes
from kernels.executor import choose_layout
from kernels.gemm import BACKENDS, auto_backends, availability, for_dispatch, select
from kernels.graphs import capture
from reference import moe_reference
from reference.layouts import expert_counts
from reference.rounding import Rounding
from reference.routing import RankView
from verify import bands
from verify.cases import BENCH_CASES, BenchCase, BenchInputs
from verify.findings import worst
from verify.impls import Implementation, UsageError, load
from verify.metrics import compare
from verify.perf import procs, report
from verify.perf.peers import torch_native_forward
from verify.perf.results import provenance
from verify.perf.timing import Timers
from verify.probes import Trial
from verify.sweep import detect_rounding

DECODE_MAX_TOKENS = 1024  # the decode path's M-row blocks: DeepSeek-like ep 8 at M = 1024 holds 1.3 GB


def graphed(fn: Callable) -> Callable:
    """fn captured in a CUDA graph (kernels.graphs.capture): its replay is fn's GPU work without the host's launches,
    which is what a stage's bandwidth means (a 10 us kernel launched eagerly times the launch)."""
    return capture(fn)[0].replay


def gpu_work(fn: Callable, device) -> Callable:
    """What times fn's work on the device: its graph's replay on a GPU (`graphed`), fn itself on a CPU."""
    return graphed(fn) if torch.device(device).type == "cuda" else fn


def _stage_times(case: BenchCase, inp: BenchInputs, backends: list[str], timers: Timers) -> dict[str, float]:
    """count, then per layout scatter / silu / gather and per backend x layout gemm1 / gemm2, each as called (eager);
    on a GPU each also graphed ("graphed/<stage>": the count without its read-back, i.e. route_local_experts)."""
    ms, kw = {}, dict(ep_rank=0, num_local_experts=case.num_local_experts, num_experts=case.shape.num_experts)
    gpu = torch.device(case.device).type == "cuda"

    def time(key: str, fn: Callable, capturable: Callable | None = None, span: bool = False) -> None:
        ms[key] = timers.eager(fn)
        if gpu:
            replay = graphed(capturable or fn)
            ms[f"graphed/{key}"] = timers.gpu(replay)
            if span:  # the memory-bound stages, whose bandwidth the report reads
                ms[f"kernels/{key}"] = kernel_span_ms(replay, case.device)

    time("count", lambda: scatter.count_local_experts(inp.topk_ids, **kw),
         lambda: scatter.route_local_experts(inp.topk_ids, **kw))
    routing = scatter.count_local_experts(inp.topk_ids, **kw)
    for layout in LAYOUTS:
        scatter_to = scatter.scatter_masked if layout is Layout.MASKED else scatter.scatter_contiguous
        time(f"scatter/{layout}", lambda scatter_to=scatter_to: scatter_to(inp.x, routing), span=True)
        dispatch = scatter_to(inp.x, routing)
        for i, name in enumerate(backends):
            gemm = BACKENDS[name]
            h = gemm(dispatch.rows, inp.w13, dispatch)
            a = activation.silu_and_mul(h, dispatch)
            if i == 0:  # silu and gather do not depend on the backend
                time(f"silu/{layout}", lambda h=h, d=dispatch: activation.silu_and_mul(h, d))
                y = gemm(a, inp.w2, dispatch)
                time(f"gather/{layout}", lambda y=y, d=dispatch: gather.gather(y, d, inp.topk_weights), span=True)
            time(f"gemm1/{name}/{layout}", lambda g=gemm, d=dispatch: g(d.rows, inp.w13, d))
            time(f"gemm2/{name}/{layout}", lambda g=gemm, a=a, d=dispatch: g(a, inp.w2, d))
    return ms


def measure_point(case: BenchCase, tokens: int, weights, backends: list[str], timers: Timers, seed: int = 0,
                  impls: dict[str, tuple[Implementation, Rounding]] | None = None) -> dict:
    """One M of a case. `impls`: outside implementations (name -> (implementation, the rounding profile it is judged
    by)), timed as "impl/NAME" beside ours."""
    s = case.shape
    inp = case.received(tokens, weights, seed)
    args = (inp.x, inp.topk_ids, inp.topk_weights, inp.w13, inp.w2)
    kw = dict(ep_size=case.ep_size, ep_rank=0, num_experts=s.num_experts)
    counts = expert_counts(inp.local_ids, case.num_local_experts).tolist()
    active = [c for c in counts if c]
    slots = sum(counts)
    chosen = select("auto", case.device, s.hidden, s.inter)[0]
    auto_layout = choose_layout(counts, tokens, s.hidden, s.inter, chosen.m_alignment, None)
    # what the hybrid call's GEMMs run on in each layout: the synced call's masked Dispatch may refine "auto"
    routing = scatter.count_local_experts(inp.topk_ids, ep_rank=0, num_local_experts=case.num_local_experts,
                                          num_experts=s.num_experts)
    masked = for_dispatch(chosen, scatter.scatter_masked(inp.x, routing, alignment=chosen.m_alignment), s.hidden,
                          s.inter)
    by_layout = {str(Layout.MASKED): masked.name, str(Layout.CONTIGUOUS): chosen.name}
    point = dict(
        case=case.name, shape=s.name, hidden=s.hidden, inter=s.inter, ep_size=case.ep_size, routing=case.routing,
        tokens=tokens, slots=slots,
        active_experts=len(active), max_count=max(counts), mean_rows=slots / max(len(active), 1),
        flops=2 * slots * s.hidden * 3 * s.inter,
        weight_bytes=len(active) * 3 * s.hidden * s.inter * 2,
        io_bytes=2 * tokens * s.hidden * 2 + 2 * slots * s.hidden * 2,  # x in, out; the slots' rows scattered/gathered
        masked_block_bytes=masked_block_bytes(counts, s.hidden, s.inter, chosen.m_alignment),
        auto_backend=by_layout[str(auto_layout)], auto_backends=by_layout,
        auto_layout=str(auto_layout),
        ms={}, accuracy={}, errors={},
    )
    refs = [moe_reference(*args, **kw, mode=m).float() for m in ("faithful", "exact")]
    runs = {f"whole/{b}/{layout}": (lambda b=b, layout=layout: moe_expert_forward(*args, **kw, layout=layout, gemm=b))
            for b in backends for layout in map(str, LAYOUTS)}
    runs["hybrid"] = lambda: moe_expert_forward(*args, **kw)
    if torch.device(case.device).type == "cuda" and tokens <= DECODE_MAX_TOKENS:
        runs["decode"] = lambda: moe_expert_forward(*args, **kw, sync="after")
        try:
            captured = GraphedExpertStage(*args, **kw)
            runs["graphed"] = lambda: (captured.graph.replay(), captured.out)[1]
        except Exception as exc:
            point["errors"]["graphed"] = f"{type(exc).__name__}: {exc}"
    runs["torch_native"] = lambda: torch_native_forward(*args, **kw)
    judged_by = {}
    for name, (impl, rounding) in (impls or {}).items():
        runs[f"impl/{name}"] = lambda impl=impl: impl(*args, **kw)
        judged_by[f"impl/{name}"] = rounding
        point.setdefault("rounding", {})[f"impl/{name}"] = rounding.name
    for name, fn in runs.items():
        try:
            out = fn()
        except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
            point["errors"][name] = f"{type(exc).__name__}: {exc}"
            continue
        faithful = refs[0] if name not in judged_by else moe_reference(*args, **kw, mode="faithful",
                                                                        rounding=judged_by[name]).float()
        m = compare(out.float(), faithful, refs[1], inp.local_ids)
        findings = bands.judge(m, bands.bands_for(s.hidden, s.inter))
        expert = next(f for f in findings if f.metric == "expert_err")
        point["accuracy"][name] = dict(row_u=m.row_err / bands.U_BF16, expert_u=expert.value / bands.U_BF16,
                                       l2_u=m.rel_l2 / bands.U_BF16, verdict=worst(findings).name)
        point["ms"][name] = (timers.gpu if name == "graphed" else timers.eager)(fn)
    point["ms"].update(_stage_times(case, inp, backends, timers))
    for stage, moved in report.MOVED_BYTES.items():  # a copy of the bytes each memory-bound stage moves
        copy = sm_copy(torch.empty(max(-(-moved(point) // 16), 1), dtype=torch.int64, device=case.device))
        point["ms"][f"copy/{stage}"] = timers.gpu(gpu_work(copy, case.device))
        if torch.device(case.device).type == "cuda":
            point["ms"][f"kernels/copy/{stage}"] = kernel_span_ms(copy, case.device)
    point["ms"]["reference"] = timers.eager(lambda: moe_reference(*args, **kw, mode="faithful"))
    a = torch.randn(slots, s.hidden, device=case.device, dtype=torch.bfloat16)
    b1 = torch.randn(s.hidden, 2 * s.inter, device=case.device, dtype=torch.bfloat16)
    a2 = torch.randn(slots, s.inter, device=case.device, dtype=torch.bfloat16)
    b2 = torch.randn(s.inter, s.hidden, device=case.device, dtype=torch.bfloat16)
    point["ms"]["dense"] = timers.gpu(lambda: (a @ b1, a2 @ b2))
    return point


def sm_copy(words: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A copy of the int64 tensor `words` into a new one, by a kernel on the SMs as the stages copy (an elementwise
    kernel): each call returns the copy. Not `Tensor.copy_`: captured in a graph it is a memcpy node, which moved the
    bytes of the DeepSeek-like M = 4096 scatter at 2.5 TB/s on an H200, slower than the scatter itself (3.7 TB/s; an
    eager 1 GB copy: 4.2 TB/s), a known divergence between captured and eager copies (pytorch/pytorch#191284)."""
    dst = torch.empty_like(words)
    return lambda: torch.bitwise_or(words, 0, out=dst)


def kernel_span_ms(fn: Callable, device, runs: int = 10) -> float:
    """The median GPU span of the work one call of `fn` queues (its first kernel's start to its last one's end, in the
    profiler's CUPTI trace), L2 flushed before every call: the time of the kernels themselves, without the launch
    that precedes the first one, as DeepGEMM's and DeepEP's `bench_kineto` time kernels. A stage captured alone and
    replayed pays a graph launch (4.2 us on an H200) that a pipeline's graph pays once for all its stages: a quarter
    of a 4096-token Qwen3-like scatter's replay."""
    flush = torch.empty(64 << 20, dtype=torch.int32, device=device)  # 256 MB, five times an H200's L2
    fn()
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            torch.bitwise_not(flush, out=flush)  # the flush, and the mark between two calls in the trace
            fn()
        torch.cuda.synchronize(device)
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    calls: list[list] = []
    for e in events:
        if "bitwise_not" in e.name:
            calls.append([])
        elif calls:
            calls[-1].append(e)
    spans = [max(e.time_range.end for e in c) - min(e.time_range.start for e in c) for c in calls if c]
    if len(spans) != runs:
        raise RuntimeError(f"kernel_span_ms: the profiler's trace holds {len(spans)} calls' kernels, not {runs}")
    return statistics.median(spans) / 1e3


def ceilings(device: str, bench: Callable[[Callable], float]) -> dict:
    """The two roofs, measured now: device-to-device copy (bytes read + written per second) and a dense bf16 matmul."""
    gpu = torch.device(device).type == "cuda"
    n, size = (8192, 1 << 30) if gpu else (512, 1 << 24)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(200 if gpu else 1):  # about a second of work first: clocks up before anything is timed
        a @ b
    copy_ms = bench(lambda: dst.copy_(src))
    mm_ms = bench(lambda: a @ b)
    roofs = dict(copy_gbps=2 * size / copy_ms / 1e6, copy_bytes=size, peak_tflops=2 * n**3 / mm_ms / 1e9, matmul_n=n)
    if gpu:  # the copy timed as the stages' kernels are (kernel_span_ms), for the bandwidths read that way
        roofs["copy_kernel_gbps"] = 2 * size / kernel_span_ms(lambda: dst.copy_(src), device) / 1e6
    return roofs


def available_backends(case: BenchCase, names=None) -> list[str]:
    """The backends timed on `case`: `names` (--backends), else every available one (the loop on a CPU only), and in
    either case those gemm="auto" may pick (`kernels.gemm.auto_backends`), which the hybrid call runs and the report
    reads. UsageError naming --backends when one of `names` cannot run the case (silently timing another backend
    instead once passed for a DeepGEMM run)."""
    auto = auto_backends(case.device, case.shape.hidden, case.shape.inter)
    if names:
        for name in names:
            ok, why = availability(name, case.device, case.shape.hidden, case.shape.inter)
            if not ok:
                raise UsageError(f"--backends {name}: {why} (case {case.name})")
        return list(names) + [name for name in auto if name not in names]
    names = [b for b in BACKENDS if b != "loop" or torch.device(case.device).type == "cpu"]
    return [b for b in names if availability(b, case.device, case.shape.hidden, case.shape.inter)[0]]


def rounding_of(case: BenchCase, impl: Implementation, tokens: int, weights) -> Rounding:
    """The profile an outside implementation matches on this case (one run at `tokens`, as the sweep finds it)."""
    inp = case.received(tokens, weights)
    s = case.shape
    args = (inp.x, inp.topk_ids, inp.topk_weights, inp.w13, inp.w2)
    kw = dict(ep_size=case.ep_size, ep_rank=0, num_experts=s.num_experts)
    view = RankView(case.ep_size, 0, s.num_experts, inp.x, inp.topk_ids, inp.topk_weights,
                    torch.arange(tokens, device=case.device),
                    expert_counts(inp.local_ids, case.num_local_experts).to(torch.int32))
    references = tuple(moe_reference(*args, **kw, mode=m) for m in ("faithful", "exact"))
    return detect_rounding(Trial(impl, view, inp.w13, inp.w2, None, 0, references=references)).profile


def run_case(case: BenchCase, tokens, backends, rep_ms: int, on_point: Callable[[dict], None],
             impls: dict[str, Implementation] | None = None) -> None:
    """Measure each M of the case; hand every point to `on_point` as soon as it is measured. Outside `impls` are
    judged by the rounding profile they match at the case's smallest M."""
    timers, weights = Timers.on(case.device, rep_ms), case.draw_weights()
    judged = {name: (impl, rounding_of(case, impl, min(tokens), weights)) for name, impl in (impls or {}).items()}
    for m in tokens:
        point = measure_point(case, m, weights, backends, timers, impls=judged)
        print(report.point_line(point), flush=True)
        on_point(point)


def warm(case: BenchCase, tokens, backends) -> None:
    """Run every configuration once, untimed: compiles (and caches) each JIT kernel the timed run will meet."""
    weights = case.draw_weights()
    for m in tokens:
        inp = case.received(m, weights)
        args = (inp.x, inp.topk_ids, inp.topk_weights, inp.w13, inp.w2)
        for b in backends:
            for layout in LAYOUTS:
                moe_expert_forward(*args, ep_size=case.ep_size, num_experts=case.shape.num_experts, layout=str(layout),
                                   gemm=b)


def warm_in_parallel(names: list[str], jobs: int) -> None:
    """`warm` each case in its own process, `jobs` at a time (JIT compilers run on the host's cores)."""
    done = procs.run_modules([["-m", "verify.bench", "--case", n, "--warm-only"] for n in names], jobs)
    for name, proc in zip(names, done, strict=True):
        print(f"warmed {name}: rc {proc.returncode}" + (f"\n{proc.stderr[-2000:]}" if proc.returncode else ""),
              flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m verify.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", choices=BENCH_CASES, help="a bench case (repeatable); default: every "
                   "one for this machine's device")
    p.add_argument("--tokens", type=int, nargs="+", help="M values (tokens received per rank); default: the case's")
    p.add_argument("--backends", nargs="+", choices=sorted(BACKENDS), help="GEMM backends (each must be "
                   "available; the one gemm='auto' picks is timed too); default: every available one")
    p.add_argument("--impl", action="append", default=[], metavar="MODULE:CALLABLE", help="also time this outside "
                   "implementation (JAX included) at every point, beside ours (repeatable)")
    p.add_argument("--rep-ms", type=int, default=30, help="time spent per timing (ms)")
    p.add_argument("--json", help="write the results here (written again after every point)")
    p.add_argument("--plot", help="write the roofline and masked-vs-contiguous plot (PNG) here")
    p.add_argument("--from-json", help="no measuring: report (tables, targets, fit, --plot) from a saved --json")
    p.add_argument("--warm-only", action="store_true", help="run each configuration once, untimed (JIT warm-up)")
    p.add_argument("--jobs", type=int, default=1, help="warm the cases in this many processes before timing")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    else:
        device = default_device()
        names = args.case or [n for n, c in BENCH_CASES.items()
                              if torch.device(c.device).type == torch.device(device).type]
        cases = [BENCH_CASES[n] for n in names]
        elsewhere = [f"{c.name} ({c.device})" for c in cases if c.device != device]
        if elsewhere:
            print(f"verify.bench: --case {', '.join(elsewhere)} cannot run on this {device} machine", file=sys.stderr)
            return 2
        try:
            impls = {spec: load(spec) for spec in args.impl}
            backends = {c.name: available_backends(c, args.backends) for c in cases}
        except UsageError as exc:
            print(f"verify.bench: error: {exc}", file=sys.stderr)
            return 2
        if args.warm_only:
            for c in cases:
                warm(c, args.tokens or c.tokens, backends[c.name])
            return 0
        if args.jobs > 1:
            warm_in_parallel(names, args.jobs)
        cpus = procs.shared_cpus(torch.device(device).type)
        results = dict(provenance("Speed targets (verify.bench)", "bench", device, "python -m verify.bench", argv),
                       torch=torch.__version__, triton=triton.__version__, rep_ms=args.rep_ms, cpus=cpus,
                       cases={c.name: c.describe() for c in cases}, points=[])

        def save(point):
            results["points"].append(point)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)

        with procs.pinned(cpus):  # host-bound timings follow the core: every point on the same two (as the gate's)
            results["ceilings"] = ceilings(device, Timers.on(device, args.rep_ms).gpu)
            print(f"{results['card']}: copy {results['ceilings']['copy_gbps']:.0f} GB/s, dense bf16 matmul "
                  f"{results['ceilings']['peak_tflops']:.0f} TFLOP/s; timed on CPUs {cpus}", flush=True)
            for c in cases:
                print(c.describe(), flush=True)
                run_case(c, args.tokens or c.tokens, backends[c.name], args.rep_ms, save, impls)
    results["report"] = report.report(results)
    print(report.format_report(results))
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        report.plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
