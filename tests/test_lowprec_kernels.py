"""lowbit.lowprec on every kernel backend against the reference, bit for bit: codes and scales of
every format x scaling x scale format x rounding, the fused fake quantization (with and without a
Hadamard rotation) and the block Hadamard transform, on awkward shapes with outliers, all-zero
groups and non-finite groups; plus the argument errors of the public entry points."""
import math

import pytest
import torch

import lowbit
from lowbit import lowprec
from lowbit.reference import hadamard as ref_hadamard, lowprec as ref
from lowbit.reference.lowprec import FORMATS, QuantSpec

from conftest import kernel_backend_params

BACKENDS = [pytest.param("reference", id="reference")] + kernel_backend_params()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def awkward(rows, cols, dtype, seed, specials=False):
    """Normal values with per-row magnitudes from 2**-20 to 2**20, a few large outliers, an
    all-zero row and (specials, fp32/fp16) an inf and a NaN in separate rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(
        torch.randint(-20, 20, (rows, 1), generator=g).float())
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=g)
    flat[idx] *= 300.0
    if rows > 2:
        x[1] = 0.0
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4) * 2.0**-10   # inside fp16's range
    if specials and rows > 4:
        x[2, cols // 2] = float("inf")
        x[3, 0] = float("nan")
    return x.to(dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as bit patterns (NaN == NaN of the same pattern)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(view), b.contiguous().view(view))


def assert_backend_matches(x, spec, hb, seed, offset, backend):
    """Codes, scales (of x rotated by hb, when hb) and the fused fake quant of `backend` equal the
    reference's, bit for bit."""
    want = ref.quantize(ref_hadamard.block_hadamard(x.float(), hb) if hb else x, spec, seed,
                        offset)
    got = lowprec.quantize(x, spec, seed, offset, hadamard_block=hb, backend=backend)
    assert bits_equal(got.codes, want.codes)
    assert bits_equal(got.scales, want.scales)
    want = ref_hadamard.rotated_fake_quant(x, spec, hb, seed, offset)
    got = lowprec.fake_quant(x, spec, seed, offset, hadamard_block=hb, backend=backend)
    assert bits_equal(got, want)


SPECS = [QuantSpec(fmt, scaling, block, sf, rnd)
         for fmt in FORMATS
         for scaling, block in (("block", 32), ("block", 48), ("row", 32), ("column", 32),
                                ("tensor", 32))
         for sf in ("fp32", "e8m0")
         for rnd in ("nearest", "stochastic")]


def spec_id(s):
    return f"{s.format}-{s.scaling}{s.block_size if s.scaling == 'block' else ''}-" \
           f"{s.scale_format}-{s.rounding[:2]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_quantize_codes_and_scales_match_the_reference(backend, spec):
    for i, (shape, dtype) in enumerate([((7, 100), torch.float32), ((3, 2, 40), torch.bfloat16),
                                        ((5, 17), torch.float16)]):
        x = awkward(math.prod(shape[:-1]), shape[-1], dtype, seed=i,
                    specials=dtype != torch.bfloat16).view(shape)
        seed, offset = 1234 + i, 77 * i
        want = ref.quantize(x, spec, seed, offset)
        got = lowprec.quantize(x, spec, seed, offset, backend=backend)
        assert bits_equal(got.codes, want.codes), (shape, dtype)
        assert bits_equal(got.scales, want.scales), (shape, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hadamard", [0, 16])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.block_size == 32], ids=spec_id)
def test_fake_quant_matches_the_reference(backend, dtype, hadamard, spec):
    x = awkward(9, 64, dtype, seed=5, specials=dtype != torch.bfloat16)
    want = ref_hadamard.rotated_fake_quant(x, spec, hadamard, seed=99, offset=3)
    got = lowprec.fake_quant(x, spec, 99, 3, hadamard_block=hadamard, backend=backend)
    assert bits_equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [1, 2, 32, 128])
def test_block_hadamard_matches_the_reference(backend, dtype, block):
    x = awkward(5, 256, dtype, seed=block)
    got = lowprec.block_hadamard(x, block, backend=backend)
    assert bits_equal(got, ref_hadamard.block_hadamard(x, block))
    special = awkward(6, 256, dtype, seed=block, specials=dtype != torch.bfloat16)
    special[0, :2] = torch.tensor([float("inf"), float("-inf")])    # inf - inf: a NaN
    assert bits_equal(lowprec.block_hadamard(special, block, backend=backend),
                      ref_hadamard.block_hadamard(special, block))
    if dtype == torch.float32:
        # the normalized Hadamard matrix, and its own inverse
        h = ref_hadamard.hadamard_matrix(block)
        explicit = (x.double().view(5, -1, block) @ h).view(5, 256)
        torch.testing.assert_close(got.double(), explicit, rtol=1e-6, atol=1e-6 * x.abs().max())
        back = lowprec.block_hadamard(got, block, backend=backend)
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-6 * x.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_one_element_inputs(backend):
    spec = QuantSpec("int4", "column", 32)
    for shape in [(0, 8), (4, 0), (1, 1), ()]:
        x = torch.randn(shape)
        want = ref.quantize(x, spec)
        got = lowprec.quantize(x, spec, backend=backend)
        assert bits_equal(got.codes, want.codes) and bits_equal(got.scales, want.scales), shape
        assert bits_equal(lowprec.fake_quant(x, spec, backend=backend), ref.fake_quant(x, spec))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_nonfinite_group_gives_the_canonical_nan(backend, fmt):
    # a long row (torch's vector body and scalar tail both) whose scale is NaN
    x = torch.randn(3, 100)
    x[1, 37] = float("nan")
    x[2, 99] = float("inf")
    spec = QuantSpec(fmt, "row")
    got = lowprec.fake_quant(x, spec, backend=backend)
    assert bits_equal(got, ref.fake_quant(x, spec))
    assert (got[1:].view(torch.int32) == 0x7FC00000).all() and torch.isfinite(got[0]).all()


def test_float64_runs_on_the_reference():
    x = torch.randn(4, 32, dtype=torch.float64)
    spec = QuantSpec("e4m3", "row")
    assert bits_equal(lowprec.fake_quant(x, spec), ref.fake_quant(x, spec))
    assert bits_equal(lowprec.block_hadamard(x, 8), ref_hadamard.block_hadamard(x, 8))


def test_bad_arguments_name_themselves():
    x = torch.randn(4, 48)
    spec = QuantSpec("int4")
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        QuantSpec("int3")
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        lowprec.quantize(torch.ones(4, 48, dtype=torch.int32), spec)
    with pytest.raises(TypeError, match="spec must be"):
        lowprec.fake_quant(x, "int4")
    with pytest.raises(ValueError, match=r"multiple of the hadamard block \(32\)"):
        lowprec.fake_quant(x, spec, hadamard_block=32)
    with pytest.raises(ValueError, match="power of two"):
        lowprec.block_hadamard(x, 3)
    with pytest.raises(ValueError, match="larger than the kernels' 4096"):
        lowprec.block_hadamard(torch.randn(2, 8192), 8192)
    with pytest.raises(ValueError, match="seed must be an int"):
        lowprec.fake_quant(x, spec, seed=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        lowprec.fake_quant(x, spec, backend="gpu")
    assert "cpu" in lowbit.available_backends()
