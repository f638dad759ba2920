"""The Triton lowprec kernel's own paths against the reference, bit for bit: the pass plan (fused
or absmax + quantize), multi-program grids (the interpreter's tile lowered, so programs split
rows and row segments, and scale groups straddle programs), edge shapes, and the NaN bits of the
Hadamard butterfly on non-finite input. tests/test_lowprec_kernels.py covers every format,
scaling and dtype on one-program grids."""
import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs the triton package (CI installs it)")

from lowbit import lowprec  # noqa: E402
from lowbit.reference import hadamard as ref_hadamard, lowprec as ref  # noqa: E402
from lowbit.reference.lowprec import QuantSpec  # noqa: E402
from lowbit.triton_kernels import lowprec as tk  # noqa: E402

from test_lowprec_kernels import assert_backend_matches, awkward, bits_equal  # noqa: E402


def _check(x, spec, hb, seed=7, offset=11):
    assert_backend_matches(x, spec, hb, seed, offset, "triton")


@pytest.mark.parametrize("scaling,block,hb,want", [
    ("block", 32, 0, ([tk.PASS_FUSED], 32, 32, 1)),
    ("block", 48, 16, ([tk.PASS_FUSED], 48, 64, 1)),      # padded group of 3 rotation blocks
    ("block", 8, 32, ([tk.PASS_FUSED], 32, 32, 4)),       # 4 groups per rotation block
    ("block", 500, 0, ([tk.PASS_FUSED], 160, 256, 1)),    # a block of >= C columns: the row
    ("row", 0, 32, ([tk.PASS_FUSED], 160, 256, 1)),
    ("block", 24, 16, ([tk.PASS_ABSMAX, tk.PASS_QUANT], 64, 64, 1)),  # groups straddle blocks
    ("column", 0, 16, ([tk.PASS_ABSMAX, tk.PASS_QUANT], 64, 64, 1)),
    ("tensor", 0, 0, ([tk.PASS_ABSMAX, tk.PASS_QUANT], 64, 64, 1)),
])
def test_pass_plan(scaling, block, hb, want):
    s = ref.SCALING_IDS[scaling]
    assert tk._plan(6, 160, 0, s, block, hb)[:4] == want


CASES = [  # (spec, hadamard block), on (6, 160): every plan, every format
    (QuantSpec("int8", "block", 32, "fp32", "nearest"), 0),
    (QuantSpec("e4m3", "block", 48, "e8m0", "stochastic"), 16),
    (QuantSpec("e2m1", "block", 8, "e8m0", "nearest"), 32),
    (QuantSpec("int4", "block", 24, "fp32", "stochastic"), 16),
    (QuantSpec("e5m2", "row", 32, "fp32", "nearest"), 32),
    (QuantSpec("e2m1", "column", 32, "fp32", "stochastic"), 16),
    (QuantSpec("int8", "tensor", 32, "e8m0", "nearest"), 0),
    (QuantSpec("e4m3", "tensor", 32, "fp32", "nearest"), 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec,hb", CASES, ids=lambda c: getattr(c, "format", None) and
                         f"{c.format}-{c.scaling}{c.block_size}-{c.scale_format}")
def test_multi_program_grids(monkeypatch, spec, hb, dtype):
    monkeypatch.setattr(tk, "interp_max_tile", 128)  # grids of about 6 x 2 programs
    _check(awkward(6, 160, dtype, seed=3, specials=dtype == torch.float32), spec, hb)


@pytest.mark.parametrize("scaling", ["row", "block"])
def test_groups_larger_than_a_program(monkeypatch, scaling):
    # rows (and blocks) above MAX_FUSED_GROUP take the absmax pass
    monkeypatch.setattr(tk, "interp_max_tile", 128)
    monkeypatch.setattr(tk, "MAX_FUSED_GROUP", 64)
    assert tk._plan(5, 192, 0, ref.SCALING_IDS[scaling], 96, 32)[0] == [tk.PASS_ABSMAX,
                                                                        tk.PASS_QUANT]
    spec = QuantSpec("e4m3", scaling, 96, "e8m0", "stochastic")
    _check(awkward(5, 192, torch.float16, seed=4, specials=True), spec, 32)


@pytest.mark.parametrize("shape,spec,hb", [
    ((1, 1), QuantSpec("int8", "block", 1), 0),
    ((1, 1), QuantSpec("e2m1", "column", 1, "e8m0"), 1),
    ((3, 5), QuantSpec("e5m2", "block", 1, "e8m0", "stochastic"), 1),
    ((3, 64), QuantSpec("int4", "block", 7, "fp32", "stochastic"), 0),
    ((2, 64), QuantSpec("e4m3", "block", 64, "fp32"), 64),
    ((2, 64), QuantSpec("e2m1", "tensor", 32, "e8m0", "stochastic"), 64),
])
def test_edge_shapes(shape, spec, hb):
    _check(awkward(*shape, torch.float32, seed=1), spec, hb)


def _with_bits(x, pos, bits):
    x.view(-1).view(torch.int32)[pos] = torch.tensor(bits, dtype=torch.int64).to(torch.int32)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("block", [2, 16, 64])
def test_hadamard_nan_bits_follow_the_reference(dtype, block):
    # +-inf meeting in a butterfly (the default NaN 0xFFC00000), NaNs of both signs (and, in
    # fp32, distinct payloads) meeting each other and finite values, a signalling NaN (made
    # quiet). No fp16 payloads: the one cast to fp16 gives the canonical NaN (formats.h, as on
    # every backend) where torch's cast keeps payload bits.
    x = torch.randn(4, 128)
    x[0, 0] = x[0, 1] = float("inf")
    x[1, 3] = float("-inf")
    x[1, 5] = float("inf")
    payload = 0xFFC12345 if dtype == torch.float32 else 0xFFC00000
    x = _with_bits(x, [2 * 128 + 0, 2 * 128 + 1, 2 * 128 + 66, 3 * 128 + 9],
                   [0x7FC00001 if dtype == torch.float32 else 0x7FC00000, payload, 0x7F800001,
                    0xFFC00000]).to(dtype)
    got = lowprec.block_hadamard(x, block, backend="triton")
    assert bits_equal(got, ref_hadamard.block_hadamard(x, block))
