"""The fp8 block-scaled reference (reference/fp8.py): its e4m3 rounding against the format's own table and torch's
cast, the scale recipes (fp32 and power-of-two), the quantizers' error bounds and edge groups, and the whole fp8 stage
against its independent NumPy oracle (reference/oracle_np.py), exact and faithful, both recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import fp8
from reference.oracle_np import moe_oracle_fp8, round_to_e4m3
from verify.cases import Sizes, random_problem


def _awkward_values(n: int = 20000) -> torch.Tensor:
    """Random magnitudes over the whole e4m3 range and past it, every exact tie, zero, the edges."""
    g = torch.Generator().manual_seed(3)
    values = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-12, 10, (n,), generator=g))
    table = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    ties = (table[1:] + table[:-1]) / 2  # halfway between neighbours: the tie rule decides
    edges = torch.tensor([0.0, 448.0, 449.0, 464.0, 465.0, 1e6, 2.0**-6, 2.0**-9, 2.0**-10, 1.5 * 2.0**-10])
    return torch.cat([values, ties, -ties, edges, -edges])


def test_e4m3_rounding_is_the_formats_nearest_value_ties_to_even_saturated():
    v = _awkward_values()
    np.testing.assert_array_equal(fp8.round_e4m3(v).numpy(), round_to_e4m3(v.numpy()))
    in_range = v.abs() <= 448
    torch.testing.assert_close(fp8.round_e4m3(v[in_range]), v[in_range].to(torch.float8_e4m3fn).double(),
                               rtol=0, atol=0)  # torch's cast rounds to nearest even too (and is not saturating)
    assert float(fp8.round_e4m3(torch.tensor([1e9]))) == 448.0 and torch.isnan(fp8.round_e4m3(torch.tensor([np.nan])))


@pytest.mark.parametrize("scale", fp8.SCALES)
def test_a_quantized_group_errs_by_half_an_e4m3_step_and_its_amax_reaches_448(scale):
    x = (torch.randn(64, 320, dtype=torch.float64) * torch.exp2(torch.randint(-8, 8, (64, 1)))).to(torch.bfloat16)
    q, s = fp8.quantize_per_token(x, scale)
    assert s.shape == (64, 3) and bool((q.abs() <= 448).all())
    back = fp8.dequantize_per_token(q, s)
    groups = torch.nn.functional.pad(x.double(), (0, 64)).view(64, 3, 128)
    amax = groups.abs().amax(-1)
    if scale == "ue8m0":  # powers of two, never below amax / 448: the largest value is at most 448
        assert bool((torch.frexp(s)[0] == 0.5).all()) and bool((s >= amax.float() / 448).all())
    else:  # the largest value of each group lands on 448 itself
        top = q.abs().view(64, -1)[:, :320]
        assert all(float(top[r, g * 128:(g + 1) * 128].max()) == 448.0 for r in range(64) for g in range(3))
    bound = (2.0**-4 * x.double().abs()).clamp(min=2.0**-10 * s.double().repeat_interleave(128, 1)[:, :320])
    assert bool(((back - x.double()).abs() <= bound).all())


def test_an_all_zero_group_gets_a_finite_scale_and_zeros():
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    x[1, 128:] = 1.0
    q, s = fp8.quantize_per_token(x)
    assert bool(torch.isfinite(s).all()) and float(s[0, 0]) == pytest.approx(1e-4 / 448) and not q[0].any()
    w = torch.zeros(1, 256, 128, dtype=torch.bfloat16)
    qw, sw = fp8.quantize_per_block(w, "ue8m0")
    assert sw.shape == (1, 2, 1) and bool(torch.isfinite(sw).all()) and not qw.any()


def _fp8_problem(seed: int, scale: str):
    p = random_problem(Sizes(24, 256, 128, 8, 3), "skewed", seed)
    q13, s13 = fp8.quantize_per_block(p.w13[4:], scale)
    q2, s2 = fp8.quantize_per_block(p.w2[4:], scale)
    to_fp8 = lambda q: q.to(torch.float8_e4m3fn)  # noqa: E731  (exact: q holds e4m3 values)
    return p, (to_fp8(q13), s13, to_fp8(q2), s2)


@pytest.mark.parametrize("scale", fp8.SCALES)
@pytest.mark.parametrize("mode", ["exact", "faithful"])
def test_the_fp8_stage_is_its_numpy_oracle(seed, scale, mode):
    p, weights = _fp8_problem(seed, scale)
    args = (p.x, p.routing.topk_ids, p.routing.topk_weights, *weights)
    ours = fp8.moe_reference_fp8(*args, ep_size=2, ep_rank=1, mode=mode, scale=scale)
    oracle = moe_oracle_fp8(*args, ep_size=2, ep_rank=1, mode=mode, scale=scale)
    if mode == "faithful":  # the same roundings in the same order: the same bits
        np.testing.assert_array_equal(ours.numpy(), oracle.astype(np.float32))
    else:  # float64 sums in other orders
        np.testing.assert_allclose(ours.numpy(), oracle, rtol=1e-6, atol=1e-6 * float(np.abs(oracle).max()))
    assert float(ours.abs().max()) > 0  # routed rows exist: the comparison compared something


def test_x_handed_over_in_fp8_is_the_x_the_stage_would_have_quantized(seed):
    p, weights = _fp8_problem(seed, "fp32")
    q, s = fp8.quantize_per_token(p.x)
    args = (p.routing.topk_ids, p.routing.topk_weights, *weights)
    given = fp8.moe_reference_fp8(q.to(torch.float8_e4m3fn), *args, x_scales=s, ep_size=2, ep_rank=1, mode="faithful")
    assert torch.equal(given, fp8.moe_reference_fp8(p.x, *args, ep_size=2, ep_rank=1, mode="faithful"))


def test_the_faithful_fp8_stage_errs_like_its_quantization_against_the_exact_one(seed):
    p, weights = _fp8_problem(seed, "fp32")
    args = (p.x, p.routing.topk_ids, p.routing.topk_weights, *weights)
    exact = fp8.moe_reference_fp8(*args, ep_size=2, ep_rank=1, mode="exact").double()
    error = (fp8.moe_reference_fp8(*args, ep_size=2, ep_rank=1, mode="faithful").double() - exact).norm() / exact.norm()
    assert 2.0**-9 < float(error) < 2.0**-4  # a's e4m3 rounding (2^-4 relative at most) dominates, above bf16's


def test_bad_fp8_inputs_are_refused_naming_the_argument():
    p, (q13, s13, q2, s2) = _fp8_problem(0, "fp32")
    args = (p.x, p.routing.topk_ids, p.routing.topk_weights)
    rank = dict(ep_size=2, ep_rank=1)  # the problem's weights are rank 1's of 2
    with pytest.raises(ValueError, match="w13's scales must be float32"):
        fp8.moe_reference_fp8(*args, q13, s13[:, :1], q2, s2, **rank)
    with pytest.raises(ValueError, match="w2's scales must be finite"):
        fp8.moe_reference_fp8(*args, q13, s13, q2, s2 * float("nan"), **rank)
    with pytest.raises(ValueError, match="w2 must have dtype torch.float8_e4m3fn"):
        fp8.moe_reference_fp8(*args, q13, s13, q2.float(), s2, **rank)
    with pytest.raises(ValueError, match="scale must be one of"):
        fp8.moe_reference_fp8(*args, q13, s13, q2, s2, scale="e5m2", **rank)
    with pytest.raises(ValueError, match="topk_ids must lie in"):  # the bf16 reference's routing checks
        fp8.moe_reference_fp8(*args, q13, s13, q2, s2)
