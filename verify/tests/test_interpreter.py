"""The Triton interpreter, as the tester runs it (verify/interpreter.py), rounds fp32 -> bf16 to nearest even and
multiplies bf16 operands of tl.dot by their values, as a GPU does: an outside kernel's honest stores are not judged
as a scale error on the CPU."""

from __future__ import annotations

import pytest
import torch

from kernels._device import interpreting

if not interpreting():
    pytest.skip("the interpreter is in use only on a CPU-only machine", allow_module_level=True)

import triton  # noqa: E402  (after kernels._device chose the interpreter)
import triton.language as tl  # noqa: E402

from verify.interpreter import round_as_gpu  # noqa: E402


@triton.jit
def _dot_and_store(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
    rows = tl.arange(0, N)
    a = tl.load(a_ptr + rows[:, None] * N + rows[None, :])
    b = tl.load(b_ptr + rows[:, None] * N + rows[None, :])
    tl.store(out_ptr + rows[:, None] * N + rows[None, :], tl.dot(a, b))  # fp32 accumulator into a bf16 tensor


def test_an_outside_kernel_stores_and_multiplies_bf16_as_a_gpu_does():
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    want = (a.float() @ b.float()).to(torch.bfloat16)  # torch's conversion rounds to nearest even
    assert round_as_gpu()
    out = torch.full((16, 16), float("nan"), dtype=torch.bfloat16)
    _dot_and_store[(1,)](a, b, out, N=16)
    assert torch.equal(out, want)
    values = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, float("nan"), -(1 + 2**-8 + 2**-12)])
    from verify.interpreter import _bf16_rne

    bits = _bf16_rne(values.numpy().view("uint32"))
    assert torch.equal(torch.from_numpy(bits.view("int16")).view(torch.bfloat16)[[0, 1, 3]],
                       values[[0, 1, 3]].to(torch.bfloat16))
    assert torch.isnan(torch.from_numpy(bits.view("int16")).view(torch.bfloat16)[2])


@triton.jit
def _helper(x):
    return x * 0.5


@triton.jit
def _widen_and_call(x_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, _helper(tl.load(x_ptr + offsets).to(tl.float32)))


def test_every_bf16_widens_to_its_fp32_value_and_a_helper_inside_a_kernel_still_runs_interpreted():
    assert round_as_gpu()
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # every bit pattern
    out = torch.empty(1 << 16, dtype=torch.float32)
    _widen_and_call[(1,)](every, out, N=1 << 16)
    want = every.float() * 0.5
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out[~want.isnan()], want[~want.isnan()])


def test_the_fp32_to_bf16_rounding_is_torchs_on_a_million_bit_patterns():
    from verify.interpreter import _bf16_rne

    bits = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    values = bits.to(torch.int32).view(torch.float32)
    ours = torch.from_numpy(_bf16_rne(values.numpy().view("uint32")).view("int16")).view(torch.bfloat16)
    want = values.to(torch.bfloat16)
    assert torch.equal(ours.isnan(), want.isnan()) and torch.equal(ours[~want.isnan()], want[~want.isnan()])
