"""The reference rounding rule itself: nearest-even must equal torch's casts bit for bit (which
validates the shared integer routine), and stochastic rounding must be unbiased with the
documented probabilities and special values."""
import math

import pytest
import torch

import lowbit
from lowbit.reference import philox_word0, round_to_format
from lowbit.reference.rounding import FORMATS

TARGETS = list(FORMATS)
WIDTH_VIEW = {16: torch.int16, 8: torch.uint8}


def bits(t):
    return t.view(WIDTH_VIEW[t.element_size() * 8]).to(torch.int64) & ((1 << t.element_size() * 8) - 1)


def all_fp32_classes(n=200_000):
    """Random fp32 bit patterns from every class: normals of every exponent, subnormals, zeros,
    infinities, NaNs, and values near the narrow formats' limits."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    raw = torch.where(raw >= 2**31, raw - 2**32, raw).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45,
                            65504.0, 65519.99, 65520.0, 65536.0, 448.0, 464.0, 470.0, 480.0,
                            57344.0, 61440.0, 3.3895e38, -3.3895e38, 5.96e-8, 2.98e-8, 2**-14,
                            2**-6, 2**-9, 2**-16, 2**-17, 1.0 + 2**-8])
    scaled = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 20, (n,), generator=g))
    return torch.cat([raw, special, -special, scaled])


@pytest.mark.parametrize("dtype", TARGETS, ids=str)
def test_nearest_even_equals_torch_cast(dtype):
    x = all_fp32_classes()
    ours = round_to_format(x, dtype)
    theirs = x.to(dtype)
    nan = torch.isnan(x)
    assert torch.equal(bits(ours)[~nan], bits(theirs)[~nan])
    assert torch.isnan(ours.float()[nan]).all()


@pytest.mark.parametrize("dtype", TARGETS, ids=str)
def test_stochastic_result_is_a_neighbour_and_exact_values_stay(dtype):
    x = all_fp32_classes(50_000)
    x = x[torch.isfinite(x)]
    sr = lowbit.stochastic_round(x, dtype, seed=7, backend="reference").float()
    lo_hi = torch.stack([round_to_format(x, dtype, torch.zeros_like(x, dtype=torch.int64)).float(),
                         round_to_format(x, dtype, torch.full_like(x, 0xFFFFFFFF, dtype=torch.int64)).float()])
    # r = 0 always rounds up unless exact, r = 2**32-1 never rounds up: the two neighbours
    assert ((sr == lo_hi[0]) | (sr == lo_hi[1]) | (torch.isnan(sr) & torch.isnan(lo_hi[0]))).all()
    representable = x.to(dtype).float() == x
    assert torch.equal(sr[representable], x[representable])


def test_stochastic_probability_equals_fractional_distance():
    # bf16 neighbours of 1 are 1 and 1 + 2**-7; x = 1 + k/256 * 2**-7 must round up with
    # probability k/256. 40 000 draws: binomial sd <= 0.0025, bound at 5 sd.
    n = 40_000
    for k in (1, 64, 128, 200, 255):
        x = torch.full((n,), 1.0 + k / 256 * 2**-7)
        up = (lowbit.stochastic_round(x, torch.bfloat16, seed=11 + k, backend="reference").float() > 1.0)
        p = k / 256
        assert abs(up.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("dtype", TARGETS, ids=str)
def test_stochastic_rounding_is_unbiased(dtype):
    # 64 values, each rounded 4096 times (distinct offsets): the mean converges to x. The sd of
    # the mean is <= gap / 2 / sqrt(4096); the bound is 6 sd of the worst value.
    reps = 4096
    finfo = torch.finfo(dtype)
    x = (torch.rand(64) * 2 - 1) * min(finfo.max / 4, 100.0)
    xs = x.repeat(reps)
    sr = lowbit.stochastic_round(xs, dtype, seed=3, backend="reference").float().view(reps, 64)
    lo = round_to_format(x, dtype, torch.full_like(x, 0xFFFFFFFF, dtype=torch.int64)).float()
    hi = round_to_format(x, dtype, torch.zeros_like(x, dtype=torch.int64)).float()
    gap = (hi - lo).abs()
    err = (sr.double().mean(0) - x.double()).abs()
    assert (err <= 6 * gap.double() / 2 / math.sqrt(reps) + 1e-12).all()


@pytest.mark.parametrize("dtype", TARGETS, ids=str)
def test_stochastic_special_values(dtype):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3e38, -3e38])
    out = lowbit.stochastic_round(x, dtype, seed=1, backend="reference").float()
    assert torch.isnan(out[0])
    if dtype == torch.float8_e4m3fn:  # no infinity in the format: it saturates, like torch
        assert out[1] == 448 and out[2] == -448 and out[5] == 448 and out[6] == -448
    else:
        assert out[1] == math.inf and out[2] == -math.inf
        if dtype != torch.bfloat16:
            assert out[5] == math.inf and out[6] == -math.inf
    assert out[3] == 0 and math.copysign(1, out[3]) == 1
    assert out[4] == 0 and math.copysign(1, out[4]) == -1


def test_seed_and_offset_select_disjoint_streams():
    x = torch.full((1000,), 1.0 + 2**-9)
    a = lowbit.stochastic_round(x, torch.bfloat16, seed=1, offset=0, backend="reference")
    b = lowbit.stochastic_round(x, torch.bfloat16, seed=2, offset=0, backend="reference")
    c = lowbit.stochastic_round(x[:500], torch.bfloat16, seed=1, offset=500, backend="reference")
    assert not torch.equal(a, b)
    assert torch.equal(a[500:], c)  # offset continues the stream: element i uses counter off+i


def test_philox_counter_uses_both_words():
    counters = torch.tensor([5, 5 + 2**32, 2**40 + 3], dtype=torch.int64)
    r = philox_word0(123, counters)
    assert len(set(r.tolist())) == 3
    assert ((r >= 0) & (r < 2**32)).all()
