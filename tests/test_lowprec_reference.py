"""lowbit.reference.lowprec (scaled INT8/INT4/FP8/FP4 quantizers) and reference.hadamard: exact
values, tie and saturation rules, the e8m0 scale rule, shapes, stochastic rounding's
unbiasedness and the Philox stream contract, and the block Walsh–Hadamard transform."""
import math
from fractions import Fraction

import pytest
import torch

from lowbit.reference.hadamard import block_hadamard, hadamard_matrix
from lowbit.reference.lowprec import (E2M1_VALUES, FMT_MAX, FORMATS, QuantSpec, decode,
                                      dequantize, e8m0_to_float, fake_quant, philox_uniform,
                                      quantize)


def grid(fmt):
    """Every non-negative finite value of a format's grid, as fp32."""
    if fmt in ("int8", "int4"):
        return torch.arange(0, FMT_MAX[fmt] + 1)
    if fmt == "e2m1":
        return torch.tensor(E2M1_VALUES)
    dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    v = torch.arange(0, 128, dtype=torch.uint8).view(dtype).float()
    return v[torch.isfinite(v)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale_format", ["fp32", "e8m0"])
@pytest.mark.parametrize("power", [0, -5, 9])
def test_representable_values_are_exact(fmt, scale_format, power):
    # absmax = FMT_MAX * 2**power makes the scale exactly 2**power under both rules.
    g = grid(fmt)
    x = torch.cat([g, -g]) * 2.0**power
    spec = QuantSpec(fmt, scaling="row", scale_format=scale_format)
    q = quantize(x.view(1, -1), spec)
    assert torch.equal(fake_quant(x.view(1, -1), spec).view(-1), x)
    assert torch.equal(decode(q.codes, fmt).view(-1) * 2.0**power, x)


@pytest.mark.parametrize("fmt, ties, expected", [
    ("int4", [0.5, 1.5, 2.5, -0.5, -2.5, 6.5], [0, 2, 2, 0, -2, 6]),
    ("int8", [0.5, 1.5, 126.5, -3.5], [0, 2, 126, -4]),
    ("e2m1", [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25],
     [0, 1, 1, 2, 2, 4, 4, -4, 0]),
    ("e4m3", [17.0, 19.0, 0.5 + 2**-5, 416 + 16], [16, 20, 0.5, 448]),
    ("e5m2", [9.0, 11.0, 49152 + 4096], [8, 12, 49152]),   # 1.10b vs 1.11b * 2**15
])
def test_nearest_ties_go_to_even(fmt, ties, expected):
    # the first element pins absmax = FMT_MAX, so the scale is exactly 1
    x = torch.tensor([[FMT_MAX[fmt]] + ties])
    out = fake_quant(x, QuantSpec(fmt, scaling="row"))
    assert out[0, 1:].tolist() == expected


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale_format", ["fp32", "e8m0"])
def test_no_overflow_and_absmax_hits_the_top(fmt, scale_format):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g) * torch.exp2(torch.randint(-40, 40, (300, 1),
                                                                     generator=g).float())
    spec = QuantSpec(fmt, block_size=16, scale_format=scale_format)
    q = quantize(x, spec)
    vals = decode(q.codes, fmt)
    assert torch.isfinite(vals).all() and vals.abs().max() <= FMT_MAX[fmt]
    top = vals.abs().view(300, 4, 16).amax(dim=2)
    if scale_format == "fp32":
        # x / (absmax / FMT_MAX) can round a hair above FMT_MAX: it saturates to FMT_MAX
        assert torch.equal(top, torch.full_like(top, FMT_MAX[fmt]))
    else:
        # rounding the scale up to a power of two leaves the top within (FMT_MAX/2, FMT_MAX]
        assert (top > FMT_MAX[fmt] / 2 - 1).all()


def test_fp32_scale_saturates_a_quotient_above_the_max():
    # absmax / 7 rounds down for this absmax, so absmax / scale rounds above 7 in fp32
    found = None
    for k in range(1, 20000):
        a = torch.tensor([1.0 + k * 2**-23])
        s = (a.double() / 7).float()
        if (a.double() / s.double()).float().item() > 7.0:
            found = a.item()
            break
    assert found is not None
    out = quantize(torch.tensor([[found, -found]]), QuantSpec("int4", scaling="row"))
    assert out.codes.tolist() == [[7, -7]]


def test_e8m0_scale_rounds_up_to_a_power_of_two():
    fmax = FMT_MAX["e2m1"]
    g = torch.Generator().manual_seed(1)
    absmax = torch.cat([torch.rand(200, generator=g) * torch.exp2(
        torch.randint(-60, 60, (200,), generator=g).float()),
        torch.tensor([6.0, 12.0, 3.0, 6.0 * 2**-20, 6.0 + 2**-21, 6.0 - 2**-21])])
    x = torch.stack([absmax, absmax / 3], dim=1)
    q = quantize(x, QuantSpec("e2m1", scaling="row", scale_format="e8m0"))
    assert q.scales.dtype == torch.uint8 and q.scales.shape == (206, 1)
    for a, code in zip(absmax.tolist(), q.scales.view(-1).tolist()):
        r = Fraction(a) / Fraction(fmax)
        e = math.ceil(math.log2(r))
        e += (Fraction(2) ** e < r) - (Fraction(2) ** (e - 1) >= r)   # guard log2 rounding
        assert code == max(e, -127) + 127, (a, code, e)
    assert q.scales.view(-1)[-6:-3].tolist() == [127, 128, 126]
    # one fp32 ulp above 6 needs the next power of two; one below still fits scale 1
    assert q.scales.view(-1)[-2:].tolist() == [128, 127]


def test_zero_and_nonfinite_groups():
    x = torch.tensor([[0.0, 0.0], [1.0, float("inf")], [float("nan"), 2.0]])
    for sf in ("fp32", "e8m0"):
        spec = QuantSpec("int4", scaling="row", scale_format=sf)
        q = quantize(x, spec)
        out = dequantize(q, spec)
        assert torch.equal(out[0], torch.zeros(2))
        assert torch.isnan(out[1:]).all()
        if sf == "e8m0":
            assert q.scales.view(-1).tolist() == [0, 255, 255]
    assert torch.isnan(e8m0_to_float(torch.tensor([255], dtype=torch.uint8))).all()


@pytest.mark.parametrize("cols", [1, 31, 32, 33, 70])
def test_block_tail_equals_zero_padding(cols):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, cols, generator=g)
    spec = QuantSpec("int4", block_size=32)
    q = quantize(x, spec)
    assert q.codes.shape == x.shape and q.scales.shape == (3, 5, -(-cols // 32))
    padded = torch.nn.functional.pad(x, (0, 96 - cols))
    assert torch.equal(fake_quant(padded, spec)[..., :cols], fake_quant(x, spec))


@pytest.mark.parametrize("shape", [(0, 32), (4, 0), (0,), (1,), (), (2, 0, 5)], ids=str)
@pytest.mark.parametrize("scaling", ["block", "row", "column", "tensor"])
def test_empty_and_tiny_shapes(shape, scaling):
    x = torch.full(shape, 0.75)
    for sf in ("fp32", "e8m0"):
        spec = QuantSpec("e2m1", scaling=scaling, scale_format=sf, rounding="stochastic")
        out = fake_quant(x, spec, seed=1)
        assert out.shape == x.shape and torch.equal(out, x)   # 0.75 = absmax: exact


def test_row_column_tensor_scalings():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=g)
    row = QuantSpec("e4m3", scaling="row")
    assert torch.equal(fake_quant(x, row), fake_quant(x, QuantSpec("e4m3", block_size=64)))
    col = QuantSpec("e4m3", scaling="column")
    assert torch.equal(fake_quant(x, col), fake_quant(x.t().contiguous(), row).t())
    assert quantize(x, col).scales.shape == (40,)
    t = quantize(x, QuantSpec("int8", scaling="tensor"))
    assert t.scales.shape == () and t.scales.item() == (x.abs().max().double() / 127).float().item()


def test_output_dtype_follows_input():
    x = torch.randn(4, 32)
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        assert fake_quant(x.to(dt), QuantSpec("e2m1")).dtype == dt


def sr_gap_bound(fmt, y):
    """An upper bound on the grid step around unscaled values y (|y| <= FMT_MAX)."""
    if fmt in ("int4", "int8"):
        return torch.ones_like(y)
    m, emin = {"e2m1": (1, 0), "e4m3": (3, -6), "e5m2": (2, -14)}[fmt]
    return torch.clamp(y.abs(), min=2.0**emin) * 2.0**-m


@pytest.mark.parametrize("fmt", ["int4", "e2m1", "e4m3"])
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(fmt):
    # Each of N rows is the same vector; distinct counters give independent Philox draws. With
    # per-element variance <= gap**2 / 4 the mean of N draws is within 5 * gap / (2 sqrt N).
    fmax, n = FMT_MAX[fmt], 4000
    g = grid(fmt)
    lo = g[:-1][torch.arange(40) % (len(g) - 1)]
    gaps = (g[1:] - g[:-1])[torch.arange(40) % (len(g) - 1)]
    y = torch.cat([torch.tensor([fmax]), lo + 0.3 * gaps])    # 0.3 of the way up: RTN goes down
    x = y.repeat(n, 1)
    sr = fake_quant(x, QuantSpec(fmt, scaling="row", rounding="stochastic"), seed=11).mean(0)
    rn = fake_quant(x[:1], QuantSpec(fmt, scaling="row"))[0]
    bound = 5 * sr_gap_bound(fmt, y) / (2 * math.sqrt(n)) + 1e-6
    assert ((sr - y).abs() <= bound).all()
    assert ((rn - y).abs()[1:] > bound[1:]).all()            # RTN bias 0.3 gap >> bound
    assert torch.allclose((rn - y)[1:], -0.3 * gaps, rtol=1e-5)


def test_stochastic_stream_contract():
    x = torch.randn(8, 32)
    spec = QuantSpec("e2m1", scaling="row", rounding="stochastic")
    a = quantize(x, spec, seed=5)
    assert torch.equal(a.codes, quantize(x, spec, seed=5).codes)
    assert not torch.equal(a.codes, quantize(x, spec, seed=6).codes)
    # element i = offset + position draws word i % 4 of counter i // 4: rows 1.. quantized at
    # offset 32 draw the same words
    assert torch.equal(quantize(x[1:], spec, seed=5, offset=32).codes, a.codes[1:])


_M32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 on plain Python ints (Salmon et al., SC'11), written apart from
    lowbit.reference.philox so that the stream layout is checked against an independent
    generator."""
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & _M32, (p0 >> 32) ^ c[3] ^ k[1], p0 & _M32]
        k = [(k[0] + 0x9E3779B9) & _M32, (k[1] + 0xBB67AE85) & _M32]
    return c


def test_independent_philox_gives_the_random123_answers():
    # Random123's known-answer vectors for philox4x32_10
    assert philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                  0x9B00DBD8]
    assert philox4x32_10([_M32] * 4, [_M32, _M32]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                      0x6D5451FD]
    assert philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
                         [0xA4093822, 0x299F31D0]) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420,
                                                       0x24126EA1]


def stream_words(seed, offset, n):
    """The lowprec stochastic stream: element i = offset + position takes word i % 4 of Philox
    counter (lo32(i // 4), hi32(i // 4), 0, 0) under key (lo32(seed), hi32(seed))."""
    key = [seed & _M32, seed >> 32]
    return [philox4x32_10([(i >> 2) & _M32, i >> 34, 0, 0], key)[i & 3]
            for i in range(offset, offset + n)]


# misaligned offsets (the stream starts inside a counter's four words), one whose counters need
# their high 32 bits, and a seed whose high 32 bits are set
@pytest.mark.parametrize("seed, offset", [(5, 5), (2**40 + 17, 2**34 + 7), (3, 0)])
def test_stochastic_words_are_word_i_mod_4_of_counter_i_div_4(seed, offset):
    n = 37
    want = stream_words(seed, offset, n)
    assert philox_uniform(seed, offset, n).tolist() == want
    # and quantize rounds with exactly those words: int8 with absmax 127 (scale exactly 1), so
    # y = x and element j rounds up iff (word >> 8) < (y - floor(y)) * 2**24 (exact in floats)
    g = torch.Generator().manual_seed(offset % 1000)
    y = torch.floor(torch.rand(n, generator=g) * 200 - 100) + torch.rand(n, generator=g)
    y[0], y[1], y[2] = 127.0, -2.5, 3.0
    spec = QuantSpec("int8", scaling="tensor", rounding="stochastic")
    q = quantize(y, spec, seed=seed, offset=offset)
    assert q.scales.item() == 1.0
    lo = [math.floor(v) for v in y.tolist()]
    up = [(w >> 8) < (v - f) * 2**24 for w, v, f in zip(want, y.tolist(), lo)]
    assert q.codes.tolist() == [f + u for f, u in zip(lo, up)]
    assert 0 < sum(up) < n - 2              # both directions drawn


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="format 'int3'"):
        QuantSpec("int3")
    with pytest.raises(ValueError, match="scaling"):
        QuantSpec("int4", scaling="channel")
    with pytest.raises(ValueError, match="rounding"):
        QuantSpec("int4", rounding="up")
    with pytest.raises(ValueError, match="scale_format"):
        QuantSpec("int4", scale_format="e4m3")
    with pytest.raises(ValueError, match="block_size"):
        QuantSpec("int4", block_size=0)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        fake_quant(torch.ones(4, dtype=torch.int32), QuantSpec("int4"))
    with pytest.raises(ValueError, match="power of two"):
        block_hadamard(torch.ones(12), 12)
    with pytest.raises(ValueError, match="multiple of the hadamard block"):
        block_hadamard(torch.ones(3, 24), 16)
    with pytest.raises(TypeError, match="x must be"):
        block_hadamard(torch.ones(16, dtype=torch.int64), 16)


@pytest.mark.parametrize("block", [1, 2, 4, 8, 32, 128])
def test_hadamard_equals_the_explicit_matrix_and_is_its_own_inverse(block):
    g = torch.Generator().manual_seed(block)
    x = torch.randn(3, 2, 2 * block, dtype=torch.float64, generator=g)
    h = hadamard_matrix(block)
    assert torch.equal(h, h.t()) and torch.allclose(h @ h, torch.eye(block, dtype=torch.float64),
                                                    atol=1e-14)
    want = (x.view(3, 2, 2, block) @ h.t()).view_as(x)
    y = block_hadamard(x, block)
    assert torch.allclose(y, want, rtol=0, atol=1e-12)
    assert torch.allclose(block_hadamard(y, block), x, rtol=0, atol=1e-12)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13)
    # explicit Sylvester entries: H[i, j] = (-1)^popcount(i & j) / sqrt(block)
    sign = 1 - 2 * (torch.tensor([[bin(a & b).count("1") % 2 for b in range(block)]
                                  for a in range(block)]))
    assert torch.allclose(h, sign.double() / math.sqrt(block), atol=1e-15)


def test_hadamard_low_precision_dtypes():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = block_hadamard(x, 32)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), block_hadamard(x.float(), 32), atol=1e-2)
