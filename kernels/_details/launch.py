"""`Launcher(kernel)[grid](*args, **meta)`: a Triton kernel launched as `kernel[grid](...)` is, for less host time.

Triton's `JITFunction.run` redoes per call what depends only on the arguments' types: it binds them to the
signature, asks its C++ `specialize_impl` for every one of them, builds a string key, finds the compiled kernel, and
checks the kernel's globals: in the host-bound decode path that is a sixth of the call (docs/design.md, "The stage
kernels' shapes and launches"). A Launcher does Triton's own launch the
first time it meets a specialisation (so Triton compiles, caches and checks it as usual), keeps the CompiledKernel
that launch returns, and launches it directly afterwards, as `JITFunction.run` itself ends:
`compiled.run(grid, stream, function, metadata, ..., *every argument in signature order)`.

Its key holds everything Triton specialises a launch on, or finer (`_key`): per tensor its dtype and whether its
address is a multiple of 16; per int whether it is 1, whether it is a multiple of 16, and its width (i32 / i64 / u64);
per bool its value; the keyword arguments (constexprs and options such as num_warps) by value; and the current device.
Two calls with one key therefore run one compiled kernel, as they would through `JITFunction.run`.

Triton's own path is taken, every time, in the interpreter (CPU), when a launch hook is set (a profiler such as
proton asks for launch metadata), for an argument of any other type, when this Triton lacks the pieces used here, and
when MOE_VERIFY_TRITON_LAUNCH=jit is set as kernels is imported (`JIT_ONLY`: an A/B switch, and a way out should a
Triton release change those pieces).
The launch arithmetic (`cdiv`, `next_power_of_2`) is here too, in plain Python.
"""

from __future__ import annotations

import inspect
import os

import torch

from kernels._device import interpreting

_I32, _I64 = 1 << 31, 1 << 63

# Triton's own launch at every call: an A/B switch, and a way out should a Triton release change the pieces used here.
# Read once, when kernels is imported (reading the environment at each launch cost a microsecond of host time).
JIT_ONLY = os.environ.get("MOE_VERIFY_TRITON_LAUNCH") == "jit"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a grid. triton.cdiv is a constexpr_function, whose call from the host costs microseconds."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for a block size (triton.next_power_of_2: as cdiv)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _key(args: tuple) -> tuple | None:
    """What Triton specialises the arguments on, or finer; None when one has a type the fast path does not know.
    Per tensor its dtype and whether its address is a multiple of 16; per int 1, or (multiple of 16) + its width
    (0: i32, 2: i64, 4: u64); per bool and float a mark of its own (a bool is never taken for the int 1)."""
    key = []
    for arg in args:
        kind = type(arg)
        if kind is int:
            key.append("1" if arg == 1 else (arg & 15 == 0) + (0 if -_I32 <= arg < _I32 else 2 if -_I64 <= arg < _I64
                                                                 else 4))
        elif isinstance(arg, torch.Tensor):
            key.append(arg.dtype)
            key.append(arg.data_ptr() & 15 == 0)
        elif kind is bool:
            key.append("T" if arg else "F")
        elif kind is float:
            key.append("f")
        else:
            return None
    return tuple(key)


def _triton_pieces():
    """(knobs.runtime, current device, current stream) of this Triton, or None where one is missing."""
    try:
        from triton import knobs
        from triton.runtime import driver

        active = driver.active
        return knobs.runtime, active.get_current_device, active.get_current_stream
    except (ImportError, AttributeError, RuntimeError):  # RuntimeError: no GPU driver
        return None


def _unhooked(hook) -> bool:
    """No launch hook set: None (older Triton) or an empty HookChain (newer)."""
    return hook is None or getattr(hook, "calls", None) == []


class Launcher:
    """A @triton.jit kernel, launched `launcher[grid](*args, **meta)` like the kernel itself (module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._params = tuple((p.name, p.default) for p in inspect.signature(kernel.fn).parameters.values())
        # key -> (CompiledKernel, the parameters after the positional ones, in signature order: keywords and defaults)
        self._compiled: dict[tuple, tuple[object, tuple]] = {}
        self._pieces = None  # Triton's pieces, () where the fast path can never be taken (the interpreter)

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
        pieces = self._pieces
        if pieces is None:
            pieces = self._pieces = () if interpreting() else _triton_pieces() or ()
        key = _key(args) if pieces and not JIT_ONLY and _unhooked(pieces[0].launch_enter_hook) \
            and _unhooked(pieces[0].launch_exit_hook) else None
        if key is None:
            self.kernel[grid](*args, **meta)
            return
        device = pieces[1]()
        key = (device, key, *meta.items())
        kept = self._compiled.get(key)
        if kept is None:  # Triton's own launch: compiles or finds the kernel, checks it, launches it
            tail = tuple(meta[name] if name in meta else default for name, default in self._params[len(args):])
            self._compiled[key] = self.kernel[grid](*args, **meta), tail
            return
        # every parameter in signature order, as JITFunction.run passes them (constexprs included, the launcher
        # skips them); the key fixed which are positional and which keywords, and the keywords' values
        compiled, tail = kept
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, pieces[2](device),
                     compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
