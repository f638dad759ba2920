"""Public API of block-wise quantization: accuracy bars, layout, state, and errors."""
import pytest
import torch

import lowbit
from lowbit import QuantState


def _roundtrip_errors(x, code, block_size):
    qs = lowbit.quantize_blockwise(x, code, block_size)
    y = lowbit.dequantize_blockwise(qs).float()
    diff = (x.float() - y).abs()
    return diff.mean().item(), (diff / (x.float().abs() + 1e-8)).mean().item()


# bitsandbytes' own test bars (research/bitsandbytes.md §4.1), averaged over iterations there.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_8bit_roundtrip_meets_bitsandbytes_bars(dtype):
    abs_n, rel_n, abs_s, rel_s, abs_u, rel_u = [], [], [], [], [], []
    for _ in range(3):
        a, r = _roundtrip_errors(torch.randn(1024, 1024, dtype=dtype), "dynamic", 256)
        abs_n.append(a), rel_n.append(r)
        u = torch.rand(1024, 1024, dtype=dtype)
        a, r = _roundtrip_errors(u, "dynamic", 256)
        abs_s.append(a), rel_s.append(r)
        a, r = _roundtrip_errors(u, "udynamic", 256)
        abs_u.append(a), rel_u.append(r)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(abs_n) < 0.011 and mean(rel_n) < 0.018
    assert mean(abs_s) < 0.0036 and mean(rel_s) < 0.015
    assert mean(abs_u) < 0.0023 and mean(rel_u) < 0.012


# bitsandbytes' 4-bit bars: mean + 7 sd of their measured error (research §4.2).
FOUR_BIT_BARS = {  # block: (fp4 err, fp4 rel, nf4 err, nf4 rel) as (mean, sd)
    32: ((0.088925, 9.1e-5), (0.242443, 3.30e-4), (0.067746, 6.9e-5), (0.189726, 3.04e-4)),
    64: ((0.096543, 1.11e-4), (0.260125, 3.79e-4), (0.072798, 7.4e-5), (0.203339, 3.40e-4)),
    256: ((0.108684, 1.82e-4), (0.289831, 4.97e-4), (0.080337, 1.02e-4), (0.226105, 3.98e-4)),
    4096: ((0.129536, 6.12e-4), (0.337169, 1.239e-3), (0.092547, 3.60e-4), (0.262473, 9.99e-4)),
}


@pytest.mark.parametrize("block_size", sorted(FOUR_BIT_BARS))
def test_4bit_roundtrip_meets_bitsandbytes_bars(block_size):
    fp4_err, fp4_rel, nf4_err, nf4_rel = FOUR_BIT_BARS[block_size]
    x = torch.randn(1024, 1024)
    for code, (m_e, s_e), (m_r, s_r) in (("fp4", fp4_err, fp4_rel), ("nf4", nf4_err, nf4_rel)):
        qs = lowbit.quantize_blockwise(x, code, block_size)
        diff = (x - lowbit.dequantize_blockwise(qs)).abs()
        assert diff.mean().item() < m_e + 7 * s_e, code
        assert (diff / (x.abs() + 1e-8)).mean().item() < m_r + 7 * s_r, code


def test_stochastic_quantization_is_unbiased():
    # One block of values repeated 2000 times: every copy has the same absmax and draws its own
    # Philox words, so the mean over copies converges to x. Per-value sd <= gap/2/sqrt(2000),
    # with the largest dynamic-map gap 0.0141 * absmax; the bound is 6 sd.
    x = torch.randn(256)
    reps = 2000
    qs = lowbit.quantize_blockwise(x.repeat(reps), "dynamic", 256, stochastic=True, seed=3)
    mean = lowbit.dequantize_blockwise(qs).double().view(reps, 256).mean(0)
    bound = 6 * 0.0141 * x.abs().max().item() / 2 / reps ** 0.5
    assert ((mean - x.double()).abs() < bound).all()
    nearest = lowbit.dequantize_blockwise(lowbit.quantize_blockwise(x, "dynamic", 256)).double()
    assert ((nearest - x.double()).abs() > 0).any()   # the test is not vacuous
    # and the probability of rounding up is the fractional distance, value by value
    book = lowbit.codebook("dynamic").double()
    y = x.double() / x.abs().max()
    hi_idx = torch.searchsorted(book, y).clamp(1, 255)
    lo, hi = book[hi_idx - 1], book[hi_idx]
    p_up = (y - lo) / (hi - lo)
    ups = (qs.codes.view(reps, 256).long() == hi_idx).double().mean(0)
    exact = (y == lo) | (y == hi)
    assert ((ups - p_up).abs()[~exact] < 6 * (p_up * (1 - p_up) / reps).sqrt()[~exact] + 1e-3).all()


def test_layout_and_nibble_order():
    x = torch.tensor([-1.0, 1.0, 0.0])
    qs = lowbit.quantize_blockwise(x, "nf4", 32, backend="reference")
    assert qs.codes.tolist() == [(0 << 4) | 15, 7 << 4]   # element 2j in the high nibble
    assert qs.absmax.tolist() == [1.0]
    q8 = lowbit.quantize_blockwise(torch.randn(5, 7), "dynamic", 32)
    assert q8.codes.shape == (5, 7) and q8.codes.dtype == torch.uint8
    assert q8.absmax.shape == (2,)


def test_state_is_plain_tensors_and_dequantizes_after_save(tmp_path):
    x = torch.randn(300, dtype=torch.bfloat16)
    qs = lowbit.quantize_blockwise(x, "dynamic4", 128)
    torch.save({"codes": qs.codes, "absmax": qs.absmax}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    qs2 = QuantState(loaded["codes"], loaded["absmax"], "dynamic4", 128, x.shape, x.dtype)
    assert torch.equal(lowbit.dequantize_blockwise(qs2), lowbit.dequantize_blockwise(qs))


def test_user_codebook_and_out_argument():
    book = torch.sort(torch.rand(256) * 2 - 1).values
    x = torch.randn(1000)
    qs = lowbit.quantize_blockwise(x, book, 64)
    ref = lowbit.quantize_blockwise(x, book, 64, backend="reference")
    assert torch.equal(qs.codes, ref.codes)
    out = torch.empty(1000, dtype=torch.float16)
    res = lowbit.dequantize_blockwise(qs, out=out)
    assert res is out
    assert torch.equal(out, lowbit.dequantize_blockwise(qs, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64, torch.bool])
def test_non_float_inputs_are_rejected(dtype):
    with pytest.raises(TypeError, match="x must have dtype float32, bfloat16, float16"):
        lowbit.quantize_blockwise(torch.zeros(10, dtype=dtype))


def test_complex_and_sparse_inputs_are_rejected():
    with pytest.raises(TypeError, match="x must be real"):
        lowbit.quantize_blockwise(torch.zeros(10, dtype=torch.complex64))
    with pytest.raises(ValueError, match="dense"):
        lowbit.quantize_blockwise(torch.eye(4).to_sparse())


@pytest.mark.parametrize("bs", [16, 48, 8192, 256.0, True])
def test_bad_block_size(bs):
    with pytest.raises(ValueError, match="block_size must be a power of two from 32 to 4096"):
        lowbit.quantize_blockwise(torch.randn(10), block_size=bs)


def test_mismatched_quant_state_is_rejected():
    qs = lowbit.quantize_blockwise(torch.randn(1000), "dynamic", 256)
    bad = QuantState(qs.codes, qs.absmax[:-1], "dynamic", 256, qs.shape, qs.dtype)
    with pytest.raises(ValueError, match="absmax must be float32 with 4 entries"):
        lowbit.dequantize_blockwise(bad)
    wrong_bs = QuantState(qs.codes, qs.absmax, "dynamic", 128, qs.shape, qs.dtype)
    with pytest.raises(ValueError, match="another block_size"):
        lowbit.dequantize_blockwise(wrong_bs)
    wrong_codes = QuantState(qs.codes[:10], qs.absmax, "dynamic", 256, qs.shape, qs.dtype)
    with pytest.raises(ValueError, match="QuantState.codes has 10 elements"):
        lowbit.dequantize_blockwise(wrong_codes)


def test_bad_backend_and_seed():
    with pytest.raises(ValueError, match="backend must be one of"):
        lowbit.quantize_blockwise(torch.randn(10), backend="tpu")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        lowbit.quantize_blockwise(torch.randn(10), stochastic=True, seed=-1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lowbit.quantize_blockwise([1.0, 2.0])


def test_stochastic_round_rejects_bad_arguments():
    with pytest.raises(TypeError, match="x must have dtype float32"):
        lowbit.stochastic_round(torch.randn(4, dtype=torch.bfloat16), torch.float16, seed=1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        lowbit.stochastic_round(torch.randn(4), torch.int8, seed=1)
    with pytest.raises(TypeError, match="offset must be an int"):
        lowbit.stochastic_round(torch.randn(4), torch.float16, seed=1, offset=1.5)


def test_seed_none_follows_torch_manual_seed():
    x = torch.randn(1000)
    torch.manual_seed(5)
    a = lowbit.quantize_blockwise(x, stochastic=True)
    torch.manual_seed(5)
    b = lowbit.quantize_blockwise(x, stochastic=True)
    assert torch.equal(a.codes, b.codes)


def test_custom_ops_pass_opcheck():
    from lowbit import ops
    from lowbit.reference.quant import midpoints
    code = lowbit.codebook("dynamic")
    x = torch.randn(300)
    torch.library.opcheck(ops.quantize_blockwise, (x, code, midpoints(code), 64, False, 0, 0, "cpu"))
    out = torch.empty(300)
    codes, absmax = ops.quantize_blockwise(x, code, midpoints(code), 64, False, 0, 0, "cpu")
    torch.library.opcheck(ops.dequantize_blockwise, (codes, absmax, code, 64, 300, out, "cpu"))
    torch.library.opcheck(ops.stochastic_round,
                          (x, torch.empty(300, dtype=torch.bfloat16), 3, 0, "cpu"))


def test_shapes_beyond_int32_on_meta_tensors():
    # More than 2**31 elements without allocating them: the fake implementations give the
    # layout (the kernels index with int64 on every backend).
    n = 2**31 + 5
    x = torch.empty(n, device="meta", dtype=torch.bfloat16)
    q8 = lowbit.quantize_blockwise(x, "dynamic", 4096)
    assert q8.codes.shape == (n,) and q8.absmax.shape == (-(-n // 4096),)
    q4 = lowbit.quantize_blockwise(x, "nf4", 64)
    assert q4.codes.shape == ((n + 1) // 2,) and q4.absmax.shape == (-(-n // 64),)
    assert lowbit.dequantize_blockwise(q4).shape == (n,)
    assert lowbit.stochastic_round(torch.empty(n, device="meta"), torch.bfloat16, seed=1).shape == (n,)
