"""The CPU lowprec kernel's own paths, against the reference bit for bit: sizes that run it on
several threads, rows split into several segments, the two-pass path (column and tensor scaling,
very long rows, a block whose lcm with the rotation block exceeds a segment), the E2M1 and float8
roundings of lowbit/lowprec.h on sweeps of bit patterns, and the AVX2 and scalar clones (forced
through LOWBIT_CPU_ISA in a subprocess, as test_cpu_isa_clones.py does)."""
import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit import lowprec
from lowbit.reference import hadamard as ref_hadamard, lowprec as ref
from lowbit.reference.lowprec import QuantSpec

from test_lowprec_kernels import assert_backend_matches, awkward, bits_equal

pytestmark = pytest.mark.skipif("cpu" not in lowbit.available_backends(),
                                reason="lowbit._C is not built")

# (rows, cols, dtype, spec, hadamard block): each crosses a path or boundary of the kernel
CASES = [
    # > 1M elements: OpenMP, items prefetching their successors; the one-pass block path, rotated
    (300, 4096, torch.float32, QuantSpec("e2m1", "block", 32, "e8m0"), 32),
    (300, 4096, torch.float32, QuantSpec("int4", "block", 256, "fp32", "stochastic"), 0),
    (300, 4096, torch.bfloat16, QuantSpec("e4m3", "row"), 128),
    # large fp32 outputs go out by non-temporal stores: rows of 1027 start unaligned (the
    # streamed copy's head and tail), the SR E2M1 preset streams its rotation back
    (1031, 1027, torch.float32, QuantSpec("int4", "block", 256), 0),
    (1031, 1027, torch.float32, QuantSpec("e4m3", "row"), 0),
    (260, 4096, torch.float32, QuantSpec("e2m1", "block", 32, "e8m0", "stochastic"), 32),
    # blocks of 48 in segments of 4080 (a row of 10000 ends in a short segment and a short block)
    (40, 10000, torch.float16, QuantSpec("int8", "block", 48, "e8m0", "stochastic"), 0),
    # rotation blocks above 64 (stages outside registers), the largest the kernels take
    (20, 8192, torch.float32, QuantSpec("e5m2", "block", 64), 4096),
    # two passes: column (tall tiles, atomic maxima) and tensor scaling
    (700, 1000, torch.float32, QuantSpec("int8", "column", 32, "fp32", "stochastic"), 0),
    (300, 4096, torch.float32, QuantSpec("e2m1", "column", 32, "e8m0"), 16),
    (1, 300000, torch.float32, QuantSpec("int4", "column"), 0),
    (257, 4096, torch.bfloat16, QuantSpec("e4m3", "tensor", 32, "e8m0"), 64),
    # two passes for block and row scaling: lcm(6000, 4096) and a row above 16384 elements
    (3, 16384, torch.float32, QuantSpec("int8", "block", 6000), 4096),
    (5, 40000, torch.float32, QuantSpec("e2m1", "row", 32, "fp32", "stochastic"), 8),
]


def case_id(c):
    rows, cols, dtype, s, hb = c
    return f"{rows}x{cols}-{str(dtype)[6:]}-{s.format}-{s.scaling}{s.block_size}-" \
           f"{s.scale_format}-{s.rounding[:2]}-h{hb}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_large_and_multi_segment_shapes_match_the_reference(case):
    rows, cols, dtype, spec, hb = case
    x = awkward(rows, cols, dtype, seed=rows + cols, specials=dtype != torch.bfloat16)
    seed, offset = 4321, 2**40 + 5   # counters beyond 32 bits
    assert_backend_matches(x, spec, hb, seed, offset, "cpu")


# The stochastic words come four per Philox counter (element i: word i % 4 of counter i // 4)
# while segments start anywhere (offset + r * cols + c0): misaligned offsets on rows shorter than
# the words left in the first counter, rows of 37, and a long row split into segments, in the
# one-pass (block, row) and two-pass (column, tensor) paths, the float8 path included.
@pytest.mark.parametrize("shape", [(37,), (9, 1), (13, 3), (6, 37), (3, 9000)], ids=str)
@pytest.mark.parametrize("offset", [5, 2**34 + 6, 3])
def test_stochastic_stream_on_misaligned_segments_matches_the_reference(shape, offset):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(offset % 100))
    for spec in (QuantSpec("int8", "block", 4, "fp32", "stochastic"),
                 QuantSpec("e2m1", "row", 32, "e8m0", "stochastic"),
                 QuantSpec("e4m3", "column", 32, "fp32", "stochastic"),
                 QuantSpec("int4", "tensor", 32, "fp32", "stochastic")):
        want = ref.quantize(x, spec, 77, offset)
        got = lowprec.quantize(x, spec, 77, offset, backend="cpu")
        assert bits_equal(got.codes, want.codes), spec
        assert bits_equal(lowprec.fake_quant(x, spec, 77, offset, backend="cpu"),
                          ref.fake_quant(x, spec, 77, offset)), spec


# large (threads, straight from x into out) and rows that are no multiple of 16 (no in-register
# stages)
@pytest.mark.parametrize("shape", [(260, 4096, 4), (260, 4096, 64), (260, 4096, 512),
                                   (7, 40, 8), (5, 24, 8), (3, 6, 2)], ids=str)
def test_block_hadamard_shapes_match_the_reference(shape):
    rows, cols, block = shape
    x = awkward(rows, cols, torch.float32, seed=block)
    assert bits_equal(lowprec.block_hadamard(x, block, backend="cpu"),
                      ref_hadamard.block_hadamard(x, block))
    spec = QuantSpec("int8", "row")
    assert bits_equal(lowprec.fake_quant(x, spec, hadamard_block=block, backend="cpu"),
                      ref_hadamard.rotated_fake_quant(x, spec, block))


CHECK = r"""
import sys, torch
sys.path.insert(0, TESTS)
from lowbit import _ext, lowprec
from lowbit.reference import hadamard as H, lowprec as ref
from lowbit.reference.lowprec import FORMATS, QuantSpec
from test_lowprec_kernels import assert_backend_matches, awkward, bits_equal
print(_ext.C.isa())
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = awkward(33, 96, dtype, seed=3, specials=dtype != torch.bfloat16)
    for fmt in FORMATS:
        for scaling, sf, rnd, hb in (("block", "e8m0", "nearest", 32),
                                     ("row", "fp32", "stochastic", 0),
                                     ("column", "fp32", "nearest", 8),
                                     ("tensor", "e8m0", "stochastic", 2)):
            spec = QuantSpec(fmt, scaling, 32, sf, rnd)
            want = H.rotated_fake_quant(x, spec, hb, 7, 11)
            got = lowprec.fake_quant(x, spec, 7, 11, hadamard_block=hb, backend="cpu")
            assert bits_equal(got, want), (dtype, spec, hb)
            w = ref.quantize(H.block_hadamard(x.float(), hb) if hb else x, spec, 7, 11)
            g = lowprec.quantize(x, spec, 7, 11, hadamard_block=hb, backend="cpu")
            assert bits_equal(g.codes, w.codes) and bits_equal(g.scales, w.scales), (dtype, spec)
    for cols, blocks in ((128, (1, 2, 4, 8, 16, 32, 64, 128)), (40, (2, 8))):
        x = awkward(5, cols, dtype, seed=4)
        for block in blocks:
            assert bits_equal(lowprec.block_hadamard(x, block, backend="cpu"),
                              H.block_hadamard(x, block)), (dtype, cols, block)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_forced_isa_clone_lowprec_matches_reference(isa):
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, LOWBIT_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", f"TESTS = {tests!r}\n" + CHECK], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    chosen, status = res.stdout.split()[-2:]
    if isa == "avx2" and chosen == "scalar":
        pytest.skip("this CPU has no AVX2; the scalar clone is covered by the other case")
    assert chosen == isa and status == "ok"


def bit_pattern_sweep(fmt):
    """Every 4096th fp32 bit pattern from 0 up to the format's maximum (all values with few
    mantissa bits, so every grid point and tie), a random sample of the rest, both signs, and the
    maximum itself last."""
    g = torch.Generator().manual_seed(1)
    fmax = torch.tensor([ref.FMT_MAX[fmt]], dtype=torch.float32)
    top = int(fmax.view(torch.int32))
    bits = torch.cat([torch.arange(0, top + 1, 4096), torch.randint(0, top + 1, (200000,),
                                                                     generator=g)])
    x = bits.to(torch.int32).view(torch.float32)
    return torch.cat([x, -x, fmax])


# (stochastic float8 keeps the three-loop path, which test_float_rounding_on_a_sweep_of_bit_patterns
# sweeps)
@pytest.mark.parametrize("fmt, rounding",
                         [(f, "nearest") for f in ref.FORMATS] +
                         [(f, "stochastic") for f in ("int8", "int4", "e2m1")])
def test_fake_quant_on_a_sweep_of_bit_patterns(fmt, rounding):
    """fake_quant without codes runs one loop that rounds onto the grid straight from the fp32
    bits (lowprec.h lp_grid_nearest / lp_grid_stochastic; e8m0 scales multiply by the inverse
    instead of dividing): on the sweep, in the one-pass path (blocks of 32, each holding the
    maximum, so every scale is exactly 1) and the two-pass path (tensor scaling)."""
    x = bit_pattern_sweep(fmt)
    if rounding == "stochastic":  # every 8th value: the reference's Philox draws are slow; the
        x = torch.cat([x[:-1:8], x[-1:]])  # thresholds were checked exhaustively in C (lowprec.h)
    body = x[:-1][: (x.numel() - 1) // (31 * 128) * (31 * 128)].view(-1, 31)
    blocks = torch.cat([x[-1:].expand(body.shape[0], 1), body], 1).reshape(-1, 4096)
    for t, scaling in ((blocks, "block"), (x, "tensor")):
        for sf in ("fp32", "e8m0"):
            spec = QuantSpec(fmt, scaling, 32, sf, rounding)
            assert bits_equal(lowprec.fake_quant(t, spec, 3, 5, backend="cpu"),
                              ref.fake_quant(t, spec, 3, 5))
            # and with scales that are not 1 (e8m0: a power of two far from 1)
            y = t * 2.0**-100
            assert bits_equal(lowprec.fake_quant(y, spec, 3, 5, backend="cpu"),
                              ref.fake_quant(y, spec, 3, 5))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", ["e2m1", "e4m3", "e5m2"])
def test_float_rounding_on_a_sweep_of_bit_patterns(fmt, rounding):
    """lowprec.h rounds E2M1 (both roundings) and float8 (nearest) with its own fp32 arithmetic,
    not by grid comparisons or round_to_fmt: every 4096th bit pattern up to the format's maximum
    (all values with few mantissa bits, so every tie), a random sample of the rest, both signs; a
    maximum in the tensor makes the scale exactly 1 (fp32 and e8m0)."""
    x = bit_pattern_sweep(fmt)
    for sf in ("fp32", "e8m0"):
        spec = QuantSpec(fmt, "tensor", 32, sf, rounding)
        want = ref.quantize(x, spec, 5, 9)
        got = lowprec.quantize(x, spec, 5, 9, backend="cpu")
        assert bits_equal(got.scales, want.scales) and bits_equal(got.codes, want.codes)
