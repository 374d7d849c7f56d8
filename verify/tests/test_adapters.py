"""Outside implementations through the tester: transformers' experts classes pass under their own rounding profile
and fail production with a message that says the exact bands passed; both JAX implementations pass the catalogue
on this machine and a hand-broken one fails with rank and row named; the tester calls each with what it takes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from verify.cases import CASES
from verify.diff import main as diff_main
from verify.impls import implementation

# Found, not imported: every xdist worker collects this module, and importing jax and transformers here cost each
# of them 2.4 s of CPU. The tests import them through the adapters when they run.
for extra, module in (("hf", "transformers"), ("jax", "jax")):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the [{extra}] extra is not installed", allow_module_level=True)

from verify.adapters import hf  # noqa: E402  (imports transformers only when an adapter is built)


def run(capsys, tmp_path, *argv):
    path = tmp_path / "rows.json"
    code = diff_main([*argv, "--json", str(path)])
    return code, capsys.readouterr().out, json.loads(path.read_text())


# fed fp32 router weights (as the Mixtral and DeepSeek-V3 routers hand them over), the weights stay fp32 and the
# weighted slots are not rounded: conventions of the space that no profile names
FP32_WEIGHTS = {"eager": "silu=bf16,slot=bf16,accumulator=bf16,order=expert", "grouped_mm": "silu=bf16",
                "batched_mm": "silu=bf16"}


@pytest.mark.parametrize("name", [n for n in hf.ADAPTERS if not n.endswith("_fp32_weights")]
                         + [f"qwen3_moe_{i}_fp32_weights" for i in hf.IMPLEMENTATIONS])
def test_a_transformers_experts_class_passes_under_the_convention_it_rounds_by(capsys, tmp_path, name):
    code, out, result = run(capsys, tmp_path, "--case", "skewed", "--ep-size", "2", "--impl",
                            f"verify.adapters.hf:{name}")
    assert code == 0, out
    if name.endswith("_fp32_weights"):
        want = FP32_WEIGHTS[name.removesuffix("_fp32_weights").removeprefix("qwen3_moe_")]
    else:
        want = "hf_eager" if name.endswith("_eager") else "hf_grouped"
    assert result["rounding"]["profile"] == want and result["rounding"]["matched"], out
    assert all(r["id"].count("-") == 2 or r["id"].endswith("-raw") for r in result["rows"])  # no layout rows


def test_transformers_fails_production_and_the_message_says_the_exact_bands_passed(capsys, tmp_path):
    code, out, _ = run(capsys, tmp_path, "--case", "skewed", "--ep-size", "2", "--rank", "0", "--view", "deepep",
                       "--impl", "verify.adapters.hf:qwen3_moe_eager", "--rounding", "production")
    assert code == 1
    assert "matches no rounding profile" in out and "exact_row_err, exact_rel_l2" in out
    assert "closest profile hf_eager" in out


@pytest.mark.long
@pytest.mark.parametrize("case", [c.name if c.name == "skewed" else pytest.param(c.name, marks=pytest.mark.extended)
                                  for c in CASES])
@pytest.mark.parametrize("name", ["ragged", "masked"])
def test_a_jax_implementation_passes_the_catalogue(capsys, tmp_path, name, case):
    code, out, result = run(capsys, tmp_path, "--case", case, "--impl", f"verify.adapters.jax_moe:{name}")
    assert code == 0, out
    assert result["rounding"]["profile"] == "production"


def test_a_broken_jax_implementation_fails_with_rank_and_row_named(capsys, tmp_path):
    code, out, _ = run(capsys, tmp_path, "--case", "skewed", "--ep-size", "2",
                       "--impl", "verify.adapters.jax_moe:ragged_ignores_router_weight")
    assert code == 1
    assert "FAIL skewed-ep2-rank1:" in out and "worst: token" in out and "rank 1" in out


def test_the_framework_is_detected_and_only_accepted_keywords_are_passed():
    from verify.adapters import jax_moe

    impl = implementation(jax_moe.ragged)
    assert impl.framework == "jax" and not impl.has_layouts and impl.takes("gate_up_order")
    seen = {}

    def torch_impl(x, topk_ids, topk_weights, w13, w2, *, ep_rank=0):
        seen.update(ep_rank=ep_rank)
        return torch.zeros_like(x)

    plain = implementation(torch_impl)
    assert plain.framework == "torch" and not plain.has_layouts and plain.stages is None
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    plain(x, None, None, None, None, ep_rank=3, layout="masked", gemm="auto")
    assert seen == {"ep_rank": 3}


def test_a_jax_function_behind_a_thin_python_wrapper_is_recognised():
    import jax

    core = jax.jit(lambda x: x)

    def closure():
        inner = core
        return lambda x, topk_ids, topk_weights, w13, w2: inner(x)

    def calls(x, topk_ids, topk_weights, w13, w2):
        return closure()(x, topk_ids, topk_weights, w13, w2)

    def declared(x, topk_ids, topk_weights, w13, w2):
        return x

    declared.framework = "jax"
    assert [implementation(f).framework for f in (closure(), calls, declared)] == ["jax"] * 3


def test_an_implementation_that_imports_transformers_models_loads_with_nothing_to_call(tmp_path):
    """This project's kernels/ shares its import name with Hugging Face's hub-kernels package: transformers, finding
    ours, fails at its first model import, unless --impl's loading has told it that hub kernels are unavailable."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "userimpl.py").write_text("from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa\n"
                                          "def forward(x, topk_ids, topk_weights, w13, w2):\n    return x\n")
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": f"{tmp_path}:{root}", "PATH": "/usr/bin:/bin"}
    loaded = subprocess.run([sys.executable, "-c", "import kernels; from verify.impls import load; "
                             "print(load('userimpl:forward').name)"], env=env, capture_output=True, text=True)
    assert loaded.returncode == 0 and "userimpl:forward" in loaded.stdout, loaded.stderr


def test_vllms_fused_moe_triton_path_passes_as_its_convention_and_its_dropped_slot_is_named(capsys, tmp_path):
    code, out, result = run(capsys, tmp_path, "--case", "skewed", "--ep-size", "2", "--rank", "1", "--view",
                            "deepep", "--impl", "verify.adapters.vllm_fused_moe:fused_moe")
    assert code == 0, out
    assert result["rounding"]["profile"] == "vllm_fused_moe" and result["rounding"]["matched"]
    code, out, result = run(capsys, tmp_path, "--case", "skewed", "--ep-size", "2", "--rank", "1", "--view",
                            "deepep", "--impl", "verify.adapters.vllm_fused_moe:fused_moe_slot_dropped")
    assert code == 1
    failing = [f for f in result["rows"][0]["findings"] if f["verdict"] == "FAIL"]
    assert failing[0]["evidence"]["part"] == "slot" and failing[0]["evidence"]["index"] == 3, out
