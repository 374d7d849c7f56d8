"""python -m verify.bench: time the whole expert stage per GEMM backend and layout, with its accuracy, on a GPU.

For a realistic shape (`--shape`), each M (tokens RECEIVED by one rank), each available backend and each layout:
the median time of kernels.moe_expert_forward (triton.testing.do_bench, L2 flushed), its TFLOP/s on the real
(unpadded) rows, and its error against the faithful reference (row/u, l2/u as in verify.diff). Results print as a
table and go to --json with the card's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch

from kernels._device import configure_triton

configure_triton()

import triton  # noqa: E402

from kernels import moe_expert_forward  # noqa: E402
from kernels.gemm import BACKENDS, availability  # noqa: E402
from reference import moe_reference  # noqa: E402
from reference.routing import rank_view  # noqa: E402
from verify import bands  # noqa: E402
from verify.cases import Sizes, random_problem  # noqa: E402
from verify.metrics import compare  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    sizes: Sizes  # num_tokens is ignored: M comes from --tokens
    ep_size: int

    def describe(self) -> str:
        s = self.sizes
        return (f"{self.name}: E={s.num_experts} (E_local={s.num_experts // self.ep_size} at ep {self.ep_size}), "
                f"k={s.topk}, H={s.hidden}, I={s.inter}")


SHAPES = {
    "deepseek": Shape("deepseek", Sizes(0, 7168, 2048, 256, 8), ep_size=8),
    "qwen3": Shape("qwen3", Sizes(0, 2048, 768, 128, 8), ep_size=4),
    "gpt_oss": Shape("gpt_oss", Sizes(0, 2880, 2880, 128, 4), ep_size=4),
}


def received_view(shape: Shape, tokens: int, seed: int = 0):
    """A uniform routing whose rank-0 view holds exactly `tokens` rows, and rank 0's weights."""
    s = shape.sizes
    share = 1 - math.comb(s.num_experts - s.num_experts // shape.ep_size, s.topk) / math.comb(s.num_experts, s.topk)
    problem = random_problem(dataclasses.replace(s, num_tokens=int(tokens / share * 1.2) + 8), "uniform", seed,
                             "cuda")
    view = rank_view(problem.x, problem.routing, shape.ep_size, 0)
    keep = slice(0, tokens)
    view = dataclasses.replace(view, x=view.x[keep], topk_ids=view.topk_ids[keep],
                               topk_weights=view.topk_weights[keep], token_index=view.token_index[keep])
    return view, problem.rank_weights(shape.ep_size, 0)


def run(shape: Shape, tokens_list, backends, layouts, reps_ms: int) -> list[dict]:
    rows = []
    for tokens in tokens_list:
        view, (w13, w2) = received_view(shape, tokens)
        args = (view.x, view.topk_ids, view.topk_weights, w13, w2)
        kw = dict(ep_size=shape.ep_size, ep_rank=0, num_experts=shape.sizes.num_experts)
        refs = [moe_reference(*args, **kw, mode=m) for m in ("faithful", "exact")]
        local = view.local_ids()
        slots = int((local >= 0).sum())
        flops = 2 * slots * shape.sizes.hidden * 3 * shape.sizes.inter
        for backend in backends:
            for layout in layouts:
                def fn(layout=layout, backend=backend, args=args, kw=kw):
                    return moe_expert_forward(*args, **kw, layout=layout, gemm=backend)

                m = compare(fn().float(), *refs, local)
                ms = triton.testing.do_bench(fn, warmup=max(reps_ms // 4, 5), rep=reps_ms, return_mode="median")
                rows.append(dict(shape=shape.name, tokens=tokens, slots=slots, backend=backend, layout=layout, ms=ms,
                                 tflops=flops / ms / 1e9, row_u=m.row_err / bands.U_BF16,
                                 l2_u=m.rel_l2 / bands.U_BF16, exact_l2_u=m.exact_rel_l2 / bands.U_BF16,
                                 verdict=bands.judge(m, bands.bands_for(shape.sizes.hidden, shape.sizes.inter))[0]))
                r = rows[-1]
                print(f"{shape.name:9s} M={tokens:6d} slots={slots:7d} {backend:10s} {layout:10s} {ms:9.3f} ms "
                      f"{r['tflops']:7.1f} TFLOP/s  row/u={r['row_u']:.2f} l2/u={r['l2_u']:.3f} "
                      f"exact_l2/u={r['exact_l2_u']:.2f} {r['verdict']}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m verify.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="deepseek")
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 4096, 16384])
    p.add_argument("--backends", nargs="+", default=[b for b in BACKENDS if b != "loop"])
    p.add_argument("--layouts", nargs="+", default=["masked", "contiguous"])
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("verify.bench: needs a CUDA GPU")
        return 2
    shape = SHAPES[args.shape]
    s = shape.sizes
    backends = [b for b in args.backends if availability(b, "cuda", s.hidden, s.inter)[0]]
    card = torch.cuda.get_device_name()
    print(f"{card}: {shape.describe()}; backends {backends}")
    rows = run(shape, args.tokens, backends, args.layouts, args.rep_ms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "triton": triton.__version__,
                       "shape": shape.describe(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
