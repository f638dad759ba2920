"""csrc/cuda/lowprec.cu's tiling paths through the simulator, against the reference bit for bit.

tests/test_lowprec_kernels.py uses rows that fit one tile (<= 4096 elements). Here: rows of
several tiles (a short last one), scale blocks that straddle tiles (the two-launch path through
the absmax scratch: column and tensor scaling, rows longer than a tile, a scale block that does
not divide the tile), the largest Hadamard block, and more tiles than the kernel's grid (its
grid-stride loop)."""
import pytest
import torch

from lowbit import available_backends, lowprec
from lowbit.reference import hadamard as ref_hadamard, lowprec as ref
from lowbit.reference.lowprec import QuantSpec

from test_lowprec_kernels import awkward, bits_equal



def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """bits_equal with every NaN made canonical first. The kernels dequantize a group with a NaN
    scale to the canonical NaN; the reference's fp32 product (an e4m3/e5m2 NaN code's value times
    the NaN scale) takes either operand's NaN bits depending on whether torch's vectorized body or
    its scalar tail computed that element, i.e. on the element's position."""
    canon = lambda t: torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)  # noqa: E731
    return bits_equal(canon(a), canon(b))


pytestmark = pytest.mark.skipif("cuda_sim" not in available_backends(),
                                reason="lowbit._C_sim was not built (LOWBIT_SIM=1)")

# (rows, cols, hadamard block, scaling, scale block): one-launch and two-launch cases
CASES = [
    (3, 8288, 0, "block", 32),      # 3 tiles per row (4096, 4096, 96), one launch
    (3, 8288, 0, "block", 48),      # tile 4080 = 85 blocks of 48, one launch
    (3, 8288, 32, "block", 5000),   # blocks straddle tiles: two launches
    (3, 8288, 32, "row", 32),       # a row over three tiles: two launches
    (3, 8288, 0, "column", 32),
    (3, 8288, 32, "tensor", 32),
    (2, 8192, 4096, "block", 48),   # lcm(4096, 48) does not fit a tile: two launches
    (2, 8192, 4096, "block", 64),
    (1, 6000, 16, "column", 32),    # one row: every column group inside one tile
    (1, 5000, 0, "tensor", 32),     # one row, two tiles: two launches
]


def case_id(c):
    return f"{c[0]}x{c[1]}-h{c[2]}-{c[3]}{c[4] if c[3] == 'block' else ''}"


def specs(scaling, block):
    # every format once; scale storage and rounding alternate
    for i, fmt in enumerate(ref.FORMATS):
        yield QuantSpec(fmt, scaling, block, ("fp32", "e8m0")[i % 2],
                        ("nearest", "stochastic")[(i // 2) % 2])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_quantize_and_fake_quant_over_tiles(case):
    rows, cols, had, scaling, block = case
    for j, dtype in enumerate((torch.float32, torch.bfloat16)):
        x = awkward(rows, cols, dtype, seed=cols + j)
        if dtype == torch.float32:  # a non-finite value in the last tile of the first row
            x[0, cols - 5] = float("inf") if rows > 1 else float("nan")
            if rows > 2:
                x[2, 3] = float("nan")
        y = ref_hadamard.block_hadamard(x.float(), had) if had else x
        for spec in specs(scaling, block):
            want = ref.quantize(y, spec, 7, 11)
            got = lowprec.quantize(x, spec, 7, 11, hadamard_block=had, backend="cuda_sim")
            assert bits_equal(got.codes, want.codes), (spec, dtype)
            assert bits_equal(got.scales, want.scales), (spec, dtype)
            want = ref_hadamard.rotated_fake_quant(x, spec, had, seed=7, offset=11)
            got = lowprec.fake_quant(x, spec, 7, 11, hadamard_block=had, backend="cuda_sim")
            assert same_values(got, want), (spec, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_largest_hadamard_block(dtype):
    x = awkward(3, 8192, dtype, seed=1)
    got = lowprec.block_hadamard(x, 4096, backend="cuda_sim")
    assert bits_equal(got, ref_hadamard.block_hadamard(x, 4096))


def test_more_tiles_than_the_grid():
    # 70000 one-tile rows: more than the kernel's 65536 blocks, so blocks take several tiles
    x = awkward(70000, 2, torch.float32, seed=3)
    for spec in (QuantSpec("int8", "block", 2), QuantSpec("e2m1", "column", 32, "e8m0"),
                 QuantSpec("e4m3", "tensor", 32, "fp32", "stochastic")):
        want = ref.quantize(x, spec, 5, 9)
        got = lowprec.quantize(x, spec, 5, 9, backend="cuda_sim")
        assert bits_equal(got.codes, want.codes) and bits_equal(got.scales, want.scales), spec
    got = lowprec.fake_quant(x, QuantSpec("int4", "row"), hadamard_block=2, backend="cuda_sim")
    want = ref_hadamard.rotated_fake_quant(x, QuantSpec("int4", "row"), 2)
    assert bits_equal(got, want)
