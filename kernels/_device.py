"""Where the Triton kernels run: compiled on a CUDA GPU, or through the Triton interpreter on a CPU-only machine.

TRITON_INTERPRET must be in the environment before `import triton`; every entry point (kernels/__init__, the root
conftest.py, verify/__init__) calls `configure_triton()` first. This module itself never imports triton.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch


def gpu_present() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def configure_triton() -> None:
    """Select the Triton interpreter when no GPU is present (an explicit TRITON_INTERPRET is left alone)."""
    if "TRITON_INTERPRET" in os.environ or gpu_present():
        return
    if "triton" in sys.modules:
        warnings.warn("triton was imported before moe-verify could set TRITON_INTERPRET=1: kernels will not launch "
                      "on this CPU-only machine; import kernels (or set TRITON_INTERPRET=1) first", stacklevel=2)
    os.environ["TRITON_INTERPRET"] = "1"


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors, no bf16 arithmetic). Read from the environment at
    each call (microseconds: the stages ask at every call, to pick their block sizes) until triton is imported, which
    fixes it: @triton.jit reads TRITON_INTERPRET when a kernel is defined."""
    global _interpreting
    if _interpreting is not None:
        return _interpreting
    value = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if "triton" in sys.modules:
        _interpreting = value
    return value


_interpreting: bool | None = None


def default_device() -> str:
    return "cuda" if gpu_present() else "cpu"
