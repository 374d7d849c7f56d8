"""`deep_gemm`: DeepGEMM's bf16 m-grouped GEMMs (SM90 / SM100 only), imported lazily and only when present.

Semantics kept from rtp-llm's DeepGEMM wrapper:
- `has_deep_gemm()` re-checks until the first successful import, then caches True (a spawned process whose
  sys.path is set up after this module was imported still finds it);
- symbols are resolved at first use, and the bf16 grouped symbols separately and tolerantly, under their current
  and legacy names: a build without them reports the bf16 path unavailable and nothing raises;
- `has_deep_gemm_bf16_grouped()` never raises;
- a non-default `compiled_dims` is rejected (ValueError) rather than silently ignored;
- usable only on SM 9.x / 10.x, with both GEMMs' K (H and I) multiples of 64 (under CUDA-graph capture too: the
  masked GEMM reads masked_m on the device and takes expected_m as a host hint; its JIT compile must have happened
  in an eager call first);
- at first use it checks that DeepGEMM's contiguous M alignment is the one the scatter laid segments out with.
"""

from __future__ import annotations

import functools
import importlib

import torch

from kernels.gemm.base import GroupedGemm

_BF16_SYMBOLS = {
    "contiguous": ("m_grouped_bf16_gemm_nt_contiguous",),
    "masked": ("m_grouped_bf16_gemm_nt_masked", "bf16_m_grouped_gemm_nt_masked"),
    "alignment": ("get_mk_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout"),
}
_module = None
_bf16: dict | None = None


def has_deep_gemm() -> bool:
    """True once `import deep_gemm` has succeeded; until then every call tries again."""
    global _module
    if _module is None:
        try:
            _module = importlib.import_module("deep_gemm")
        except Exception:
            return False
    return True


def _bf16_symbols() -> dict:
    """The bf16 grouped symbols (None where a build lacks them), resolved once, at first use."""
    global _bf16
    if _bf16 is None and has_deep_gemm():
        _bf16 = {role: next((getattr(_module, n) for n in names if hasattr(_module, n)), None)
                 for role, names in _BF16_SYMBOLS.items()}
    return _bf16 or {}


def has_deep_gemm_bf16_grouped() -> bool:
    """True when deep_gemm imports and has both bf16 m-grouped GEMMs. Never raises."""
    try:
        symbols = _bf16_symbols()
        return all(symbols.get(role) is not None for role in _BF16_SYMBOLS)
    except Exception:
        return False


def _check_compiled_dims(compiled_dims: str) -> None:
    if compiled_dims != "nk":
        raise ValueError(f"compiled_dims={compiled_dims!r} is not supported: the bf16 grouped path uses 'nk' only")


def m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices, compiled_dims: str = "nk") -> None:
    _check_compiled_dims(compiled_dims)
    _bf16_symbols()["contiguous"](a, b, d, m_indices)


def m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m: int, compiled_dims: str = "nk") -> None:
    _check_compiled_dims(compiled_dims)
    _bf16_symbols()["masked"](a, b, d, masked_m, expected_m)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    """A GPU's compute capability, asked once: every call of the stage checks it, and asking costs microseconds."""
    return torch.cuda.get_device_capability(index)


class DeepGemm(GroupedGemm):
    name = "deep_gemm"

    def __init__(self):
        self._alignment_checked = False

    def availability(self, device):
        try:
            device = torch.device(device)
            if device.type != "cuda":
                return False, "DeepGEMM runs on CUDA GPUs only"
            major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
            if major not in (9, 10):
                return False, f"DeepGEMM supports SM90 and SM100 only, this GPU is SM{major}{minor}"
            if not has_deep_gemm():
                return False, 'deep_gemm is not installed (see README.md, "Adding DeepGEMM")'
            if not has_deep_gemm_bf16_grouped():
                return False, "this deep_gemm build has no bf16 m-grouped GEMMs"
            return True, f"deep_gemm bf16 grouped GEMMs on SM{major}{minor}"
        except Exception as exc:  # availability never raises
            return False, f"deep_gemm availability check failed: {exc}"

    def shape_problem(self, hidden, inter):
        if hidden % 64 or inter % 64:
            return f"DeepGEMM needs K % 64 == 0 for both GEMMs: H={hidden} and I={inter}"
        return None

    def _check_alignment(self, dispatch) -> None:
        if not self._alignment_checked:
            theirs = _bf16_symbols()["alignment"]()
            if theirs != dispatch.alignment:
                raise RuntimeError(f"deep_gemm's contiguous M alignment is {theirs} but the scatter aligned segments "
                                   f"to {dispatch.alignment}: every expert's blocks would be misattributed")
            self._alignment_checked = True

    def m_grouped_gemm_nt_contiguous(self, a, b, dispatch, empty):
        self._check_alignment(dispatch)
        d = empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        m_grouped_bf16_gemm_nt_contiguous(a, b, d, dispatch.m_indices)
        return d

    def m_grouped_gemm_nt_masked(self, a, b, dispatch, empty):
        d = empty((*a.shape[:2], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        m_grouped_bf16_gemm_nt_masked(a, b, d, dispatch.counts, dispatch.expected_m)
        return d


BACKEND = DeepGemm()
