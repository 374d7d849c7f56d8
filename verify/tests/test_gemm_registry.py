"""The GEMM backend registry and the deep_gemm wrapper's semantics (rtp-llm's), tested with a fake deep_gemm module
on any machine: lazy import retried until it succeeds, tolerant bf16 symbols, compiled_dims, the alignment check."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from kernels._device import interpreting
from kernels.dispatch import Dispatch, Layout
from kernels.gemm import AUTO_ORDER, BACKENDS, availability, deep_gemm, select


@pytest.fixture
def fresh_wrapper(monkeypatch):
    """The wrapper with its caches cleared, and no real deep_gemm importable unless the test installs a fake."""
    monkeypatch.setattr(deep_gemm, "_module", None)
    monkeypatch.setattr(deep_gemm, "_bf16", None)
    monkeypatch.setitem(sys.modules, "deep_gemm", None)  # `import deep_gemm` raises ImportError
    return deep_gemm


def fake_deep_gemm(alignment=128, with_masked=True, legacy_masked=False):
    calls = []
    mod = types.ModuleType("deep_gemm")
    mod.m_grouped_bf16_gemm_nt_contiguous = lambda *a: calls.append(("contiguous", a))
    masked = lambda *a: calls.append(("masked", a))  # noqa: E731
    if with_masked:
        setattr(mod, "bf16_m_grouped_gemm_nt_masked" if legacy_masked else "m_grouped_bf16_gemm_nt_masked", masked)
    mod.get_mk_alignment_for_contiguous_layout = lambda: alignment
    return mod, calls


def test_has_deep_gemm_retries_until_the_import_succeeds_then_caches(fresh_wrapper, monkeypatch):
    assert not fresh_wrapper.has_deep_gemm()
    assert not fresh_wrapper.has_deep_gemm()  # still looking
    mod, _ = fake_deep_gemm()
    monkeypatch.setitem(sys.modules, "deep_gemm", mod)  # e.g. a spawned process whose sys.path came late
    assert fresh_wrapper.has_deep_gemm()
    monkeypatch.setitem(sys.modules, "deep_gemm", None)
    assert fresh_wrapper.has_deep_gemm()  # cached True


def test_bf16_symbols_are_resolved_tolerantly(fresh_wrapper, monkeypatch):
    mod, _ = fake_deep_gemm(with_masked=False)
    monkeypatch.setitem(sys.modules, "deep_gemm", mod)
    assert fresh_wrapper.has_deep_gemm() and not fresh_wrapper.has_deep_gemm_bf16_grouped()


def test_legacy_masked_name_is_accepted(fresh_wrapper, monkeypatch):
    mod, calls = fake_deep_gemm(legacy_masked=True)
    monkeypatch.setitem(sys.modules, "deep_gemm", mod)
    assert fresh_wrapper.has_deep_gemm_bf16_grouped()
    fresh_wrapper.m_grouped_bf16_gemm_nt_masked(1, 2, 3, 4, 5)
    assert calls == [("masked", (1, 2, 3, 4, 5))]


def test_has_deep_gemm_bf16_grouped_never_raises(fresh_wrapper, monkeypatch):
    class Exploding(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError("broken build")

    monkeypatch.setitem(sys.modules, "deep_gemm", Exploding("deep_gemm"))
    assert fresh_wrapper.has_deep_gemm_bf16_grouped() is False


def test_non_default_compiled_dims_is_rejected(fresh_wrapper, monkeypatch):
    mod, calls = fake_deep_gemm()
    monkeypatch.setitem(sys.modules, "deep_gemm", mod)
    with pytest.raises(ValueError, match="compiled_dims"):
        fresh_wrapper.m_grouped_bf16_gemm_nt_contiguous(1, 2, 3, 4, compiled_dims="mn")
    with pytest.raises(ValueError, match="compiled_dims"):
        fresh_wrapper.m_grouped_bf16_gemm_nt_masked(1, 2, 3, 4, 5, compiled_dims="k")
    assert calls == []


def _dispatch(alignment):
    rows = torch.zeros(alignment, 64, dtype=torch.bfloat16)
    return Dispatch(Layout.CONTIGUOUS, rows, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
                    (1,), alignment, torch.zeros(alignment, dtype=torch.int32))


def test_alignment_mismatch_is_caught_at_first_use(fresh_wrapper, monkeypatch):
    mod, calls = fake_deep_gemm(alignment=256)
    monkeypatch.setitem(sys.modules, "deep_gemm", mod)
    backend = deep_gemm.DeepGemm()
    with pytest.raises(RuntimeError, match="alignment is 256"):
        backend.m_grouped_gemm_nt_contiguous(torch.zeros(128, 64, dtype=torch.bfloat16),
                                             torch.zeros(1, 64, 64, dtype=torch.bfloat16), _dispatch(128),
                                             torch.empty)
    assert calls == []


def test_deep_gemm_is_unavailable_off_hopper_with_a_reason():
    ok, why = availability("deep_gemm", "cpu")
    assert not ok and "CUDA" in why
    assert BACKENDS["deep_gemm"].shape_problem(2880, 2880) is None
    assert "K % 64" in BACKENDS["deep_gemm"].shape_problem(2880 + 32, 768)


# On a CPU: what each backend must answer, and a word its reason must hold.
ON_A_CPU = {
    "deep_gemm": (False, "CUDA"),
    "grouped_mm": (True, "torch._grouped_mm on cpu"),
    "triton": (True, "interpreter") if interpreting() else (False, "TRITON_INTERPRET"),
    "loop": (True, "everywhere"),
}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_says_whether_it_runs_on_a_cpu_and_why(name):
    runs, word = ON_A_CPU[name]
    ok, why = availability(name, "cpu", 128, 64)
    assert ok is runs and word in why, (ok, why)


def test_a_shape_the_backend_cannot_take_is_unavailable_with_the_sizes_named():
    if not interpreting():
        pytest.skip("the Triton backend runs on a CPU only under the interpreter")
    ok, why = availability("triton", "cpu", 120, 64)
    assert not ok and "H=120" in why
    assert availability("loop", "cpu", 120, 64)[0]  # the loop backend takes any shape


def test_auto_picks_loop_on_a_cpu_and_says_why():
    backend, why = select("auto", "cpu", 128, 64)
    assert backend.name == "loop" == AUTO_ORDER["cpu"][0] and "auto -> loop" in why


def test_explicit_unavailable_backend_names_the_argument():
    with pytest.raises(ValueError, match="gemm='deep_gemm'"):
        select("deep_gemm", "cpu", 128, 64)


def test_select_remembers_only_choices_that_cannot_change(monkeypatch):
    """auto's first backend, or a named one, is asked once; a choice made past an unavailable backend is asked again,
    and changes as soon as that backend becomes available (deep_gemm importing late, say)."""
    import kernels.gemm as registry

    monkeypatch.setattr(registry, "_CHOSEN", {})
    monkeypatch.setitem(AUTO_ORDER, "cpu", ("deep_gemm", "loop"))
    asked, available = [], {"deep_gemm": False, "loop": True}

    def fake_availability(name, device, hidden=None, inter=None):
        asked.append(name)
        return available[name], f"{name} {'runs' if available[name] else 'is absent'}"

    monkeypatch.setattr(registry, "availability", fake_availability)
    assert [select("auto", "cpu", 128, 64)[0].name for _ in range(2)] == ["loop", "loop"]
    assert asked == ["deep_gemm", "loop"] * 2  # not remembered: deep_gemm was skipped
    available["deep_gemm"] = True
    asked.clear()
    assert [select("auto", "cpu", 128, 64)[0].name for _ in range(2)] == ["deep_gemm", "deep_gemm"]
    assert [select("loop", "cpu", 128, 64)[0].name for _ in range(2)] == ["loop", "loop"]
    assert asked == ["deep_gemm", "loop"]  # each remembered after its first answer


def _sized_dispatch(device, layout=Layout.MASKED, counts_host=None, block_rows=128, num_tokens=8, topk=2):
    """A Dispatch of 4 experts with H = 128 (contents unused: only what the choice reads)."""
    rows = torch.zeros(4, block_rows, 128, dtype=torch.bfloat16, device=device)
    index = torch.zeros(num_tokens, topk, dtype=torch.int32, device=device)
    return Dispatch(layout, rows, index, torch.zeros(4, dtype=torch.int32, device=device), counts_host, 128)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_auto_gives_decode_sized_masked_blocks_to_the_skinny_kernel_on_a_gpu_only(device):
    """for_dispatch: on a GPU a masked block whose fullest expert is expected to hold at most SKINNY_MAX_ROWS rows (the
    counts' maximum when on the host, else `Dispatch.rows_hint`'s estimate) runs on the Triton skinny kernel; anything
    else, and anything on a CPU, keeps the backend chosen for the shapes."""
    from kernels.gemm import for_dispatch
    from kernels.gemm.triton import SKINNY_MAX_ROWS

    chosen = select("auto", device, 128, 64)[0]
    skinny = BACKENDS["triton"] if device == "cuda" else chosen
    assert for_dispatch(chosen, _sized_dispatch(device), 128, 64) is skinny  # decode: 4 rows per expert on average
    most, past = ((rows, 0, 0, 0) for rows in (SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1))
    assert for_dispatch(chosen, _sized_dispatch(device, counts_host=most, block_rows=256), 128, 64) is skinny
    assert for_dispatch(chosen, _sized_dispatch(device, counts_host=past, block_rows=256), 128, 64) is chosen
    assert for_dispatch(chosen, _sized_dispatch(device, block_rows=1024, num_tokens=1024, topk=8), 128, 64) is chosen
    assert for_dispatch(chosen, _sized_dispatch(device, Layout.CONTIGUOUS, (1, 0, 0, 0)), 128, 64) is chosen


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_auto_backends_name_what_auto_may_run(device):
    """kernels.gemm.auto_backends (what the bench times as "auto"): select's choice, and on a GPU the skinny kernel's
    backend that for_dispatch can refine it to; a shape Triton refuses adds nothing."""
    from kernels.gemm import auto_backends

    chosen = select("auto", device, 128, 64)[0].name
    skinny = ["triton"] if device == "cuda" and chosen != "triton" else []
    assert auto_backends(device, 128, 64) == [chosen, *skinny]
    assert auto_backends(device, 120, 64) == [select("auto", device, 120, 64)[0].name]  # H % 16 != 0
