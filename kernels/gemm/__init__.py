"""Grouped-GEMM backends behind one interface (base.GroupedGemm) and the registry that picks one.

`availability(name, device, hidden, inter)` says whether a backend can run and why (never raises);
`select(gemm, device, hidden, inter)` resolves "auto" to the best available backend and says why it was chosen.
Order for "auto" on a GPU: deep_gemm, grouped_mm, triton (fastest first, as measured: docs/results/); on a CPU: loop.
`for_dispatch` refines "auto" once the layout is built: a decode-sized masked block runs on Triton's skinny kernel.
"""

from __future__ import annotations

import torch

from kernels.dispatch import Dispatch
from kernels.gemm import deep_gemm, grouped_mm, loop, triton
from kernels.gemm.base import GroupedGemm

BACKENDS: dict[str, GroupedGemm] = {b.name: b for b in (deep_gemm.BACKEND, grouped_mm.BACKEND, triton.BACKEND,
                                                          loop.BACKEND)}
AUTO_ORDER = {"cuda": ("deep_gemm", "grouped_mm", "triton"), "cpu": ("loop",)}


def availability(name: str, device, hidden: int | None = None, inter: int | None = None) -> tuple[bool, str]:
    """(ok, reason) for backend `name` on `device` and, when given, the shapes H and I."""
    if name not in BACKENDS:
        return False, f"unknown gemm backend {name!r}; known: {', '.join(BACKENDS)}"
    ok, reason = BACKENDS[name].availability(torch.device(device))
    if ok and hidden is not None and inter is not None:
        problem = BACKENDS[name].shape_problem(hidden, inter)
        if problem:
            return False, problem
    return ok, reason


def select(gemm: str, device, hidden: int, inter: int) -> tuple[GroupedGemm, str]:
    """The backend for `gemm` ("auto" or a name); raises ValueError naming `gemm`, H or I when it cannot run.

    Every call of the stage asks; a choice that cannot change is answered from memory: a named backend that is
    available, and "auto" when it chose the first backend of its order (a backend only ever becomes available, as
    deep_gemm does once it imports: a later choice could differ only where an earlier backend was skipped)."""
    device = torch.device(device)
    key = (gemm, device, hidden, inter)
    if key in _CHOSEN:
        return _CHOSEN[key]
    if gemm != "auto":
        ok, reason = availability(gemm, device, hidden, inter)
        if not ok:
            raise ValueError(f"gemm={gemm!r} cannot run here: {reason}")
        _CHOSEN[key] = BACKENDS[gemm], reason
        return _CHOSEN[key]
    skipped = []
    for name in AUTO_ORDER.get(device.type, ("loop",)):
        ok, reason = availability(name, device, hidden, inter)
        if ok:
            chosen = BACKENDS[name], f"auto -> {name}: {reason}" + (f" (skipped: {'; '.join(skipped)})" if skipped
                                                                     else "")
            if not skipped:
                _CHOSEN[key] = chosen
            return chosen
        skipped.append(f"{name}: {reason}")
    return BACKENDS["loop"], f"auto -> loop (skipped: {'; '.join(skipped)})"


_CHOSEN: dict[tuple, tuple[GroupedGemm, str]] = {}


def for_dispatch(backend: GroupedGemm, dispatch: Dispatch, hidden: int, inter: int) -> GroupedGemm:
    """gemm="auto" once the Dispatch is built: `backend` (what `select` chose for the shapes), except that on a GPU a
    masked block whose fullest expert is expected to hold few rows (decode: `triton.TritonGroupedGemm.runs_skinny`)
    goes to the Triton skinny kernel, faster there than DeepGEMM's masked GEMMs + silu and bitwise equal to them where
    measured (docs/design.md, "Decode-sized masked blocks run on a skinny Triton GEMM")."""
    if _skinny_may_serve(dispatch.rows.device, hidden, inter) and triton.BACKEND.runs_skinny(dispatch):
        return triton.BACKEND
    return backend


def _skinny_may_serve(device, hidden: int, inter: int) -> bool:
    """Whether `for_dispatch` may give these shapes on `device` to the skinny kernel (a GPU, shapes Triton takes)."""
    return torch.device(device).type == "cuda" and triton.BACKEND.shape_problem(hidden, inter) is None


def auto_backends(device, hidden: int, inter: int) -> list[str]:
    """Every backend gemm="auto" may run for these shapes on `device`: `select`'s choice and, where `for_dispatch`
    can refine it, the Triton skinny kernel's backend."""
    names = [select("auto", device, hidden, inter)[0].name]
    if _skinny_may_serve(device, hidden, inter) and triton.BACKEND.name not in names:
        names.append(triton.BACKEND.name)
    return names


__all__ = ["AUTO_ORDER", "BACKENDS", "GroupedGemm", "auto_backends", "availability", "for_dispatch", "select"]
