"""The Triton interpreter made to round as a GPU does, for every kernel the tester runs on a CPU.

Under TRITON_INTERPRET=1 (Triton 3.x) bf16 is held as raw uint16, and two of its operations differ from a GPU's:
- an fp32 -> bf16 conversion (`x.to(tl.bfloat16)`, a store of fp32 values into a bf16 tensor) truncates, where a
  GPU rounds to nearest even: an honest kernel would show a bias of about -u/2 per rounding and fail as a scale error;
- `tl.dot` on bf16 operands multiplies their raw bits as integers.
`round_as_gpu()` replaces both in the interpreter (ties to even, NaN kept quiet; the operands' values multiplied in
fp32), so an outside Triton kernel is judged on the CPU by what it computes on a GPU. It also makes two things
cheaper that give the same bits: bf16 -> fp32 conversions (exact: the bf16 bits are fp32's upper half) and calls of
@triton.jit helpers inside a kernel, which the interpreter re-patches triton.language for at every call although
the kernel's launch already did (a fifth of the interpreter's time in this project's pipeline). Arithmetic on bf16
tensors (`a + b` with both bf16) stays wrong in the interpreter: kernels compute in fp32 there, as ours do. This
project's kernels round by hand under the interpreter (kernels/_details/common.py), so their bits do not change.
"""

from __future__ import annotations

import numpy as np

from kernels._device import interpreting


def _bf16_rne(bits32: np.ndarray) -> np.ndarray:
    """fp32 bit patterns -> the bf16 bit patterns of their nearest bf16 values (ties to even; NaN stays NaN)."""
    bits = np.asarray(bits32, dtype=np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)  # no carry out of 32 bits but NaN's
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded) if nan.any() else rounded


def _bf16_values(data: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> their values as float32."""
    return (data.astype(np.uint32) << 16).view(np.float32)


def round_as_gpu() -> bool:
    """Patch the interpreter (once per process; nothing without TRITON_INTERPRET). True when it is patched."""
    if not interpreting():
        return False
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_rounds_as_gpu", False):
        return True
    convert = interpreter._convert_float

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            bits = np.frombuffer(np.ascontiguousarray(input).tobytes(), dtype=np.uint32)
            return _bf16_rne(bits).reshape(input.shape)
        if input_dtype == tl.bfloat16 and output_dtype == tl.float32:
            return np.asarray(input).astype(np.uint32) << 16
        return convert(input, input_dtype, output_dtype, rounding_mode)

    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    patched: list[set | None] = []  # per launch in progress: the language modules its own patch covered

    def languages(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def patch_lang_once(fn):
        if patched and patched[-1] is not None and languages(fn) <= patched[-1]:
            return None  # a helper called inside a launch whose patch covers its modules (the result is unused)
        scope = patch_lang(fn)
        if patched and patched[-1] is None:  # the launch's own patch
            patched[-1] = languages(fn)
        return scope

    def launch_patched_once(self, *args, **kwargs):
        patched.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a_data = _bf16_values(a.data) if a.dtype.scalar == tl.bfloat16 else a.data.astype(np.float32)
            b_data = _bf16_values(b.data) if b.dtype.scalar == tl.bfloat16 else b.data.astype(np.float32)
            product = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype)
            return interpreter.TensorHandle(product + d.data, d.dtype.scalar)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter._convert_float = convert_float
    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = launch_patched_once
    interpreter._rounds_as_gpu = True
    return True
