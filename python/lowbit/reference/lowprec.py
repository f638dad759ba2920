"""Scaled low-precision quantizers for simulated low-precision training (the spec for lowbit.nn).

A tensor is seen as a matrix: rows = all leading dimensions flattened, columns = the last (inner)
dimension. Each element is divided by the scale of its group, rounded onto the format's grid and
(for fake quant) multiplied back by the same scale.

Formats (the value grid before scaling; FMT_MAX is the largest magnitude):
  int8   integers in [-127, 127]  (symmetric; -128 unused so +-absmax are both exact)
  int4   integers in [-7, 7]      (symmetric, same reason; 15 of the 16 codes)
  e4m3   torch.float8_e4m3fn values, max 448
  e5m2   torch.float8_e5m2 values, max 57344
  e2m1   FP4: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} (OCP MX E2M1; 1 sign, 2 exponent, 1 mantissa bit)

Scaling (which elements share one scale):
  block  groups of `block_size` consecutive elements along the last dimension; a last dimension
         that is not a multiple of block_size ends in a short block (exactly what zero padding
         would give: zeros do not change an absmax)
  row    one scale per row (the whole last dimension)
  column one scale per column (over all rows)
  tensor one scale for the tensor

Scale rule: absmax = max |x| of the group. fp32 scales: scale = absmax / FMT_MAX (IEEE fp32
division). e8m0 scales (microscaling-style, a power of two stored as an 8-bit biased exponent
e + 127): scale = 2**ceil(log2(absmax / FMT_MAX)), i.e. rounded UP so that absmax / scale <=
FMT_MAX and nothing saturates (the OCP MX v1.0 reference instead uses floor(log2(absmax)) -
emax_elem and clamps, which can clip the top of a block). e is clamped to [-127, 127]; an
all-zero group stores e = -127. A group with a non-finite absmax gets a NaN scale (e8m0 code
255) and dequantizes to NaN.

Quantize: y = x / scale (IEEE fp32 division; 0 where scale == 0), clamped to [-FMT_MAX, FMT_MAX]
(saturation: only reachable through the rounding of absmax / FMT_MAX), then rounded onto the grid:
  nearest    round to nearest, ties to even (even integer; even mantissa bit for e4m3/e5m2/e2m1)
  stochastic between the two neighbouring grid values lo <= y <= hi, up iff
             (word >> 8) * 2**-24 < (y - lo) / (hi - lo), `word` element i's Philox4x32-10
             word under key `seed`, i = offset + (row-major element index): word i % 4 of
             counter i // 4 (philox.philox_word_of) — the optimizer write-back's four-word
             stream (lowbit.rounding), so one Philox evaluation serves four elements. P(up) is
             the covered fraction rounded up to a multiple of 2**-24, so E[q] = y up to 2**-24
             of a grid step per element.
Dequantize: q * scale in fp32 (a NaN result is the canonical 0x7FC00000), then cast to the input
dtype (nearest-even; a NaN becomes lowbit's canonical bf16 / fp16 NaN, see cast_from_f32).
Inputs of any float dtype are first cast to fp32 (exact for bf16/fp16).
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .philox import philox_word_of, uniform24
from .rounding import round_to_format

FORMATS = ("int8", "int4", "e4m3", "e5m2", "e2m1")
SCALINGS = ("block", "row", "column", "tensor")
SCALE_FORMATS = ("fp32", "e8m0")
ROUNDINGS = ("nearest", "stochastic")
# The kernels' integer ids (csrc/include/lowbit/lowprec.h LpFormat / LpScaling): index in these.
FORMAT_IDS = {name: i for i, name in enumerate(FORMATS)}
SCALING_IDS = {name: i for i, name in enumerate(SCALINGS)}

FMT_MAX = {"int8": 127.0, "int4": 7.0, "e4m3": 448.0, "e5m2": 57344.0, "e2m1": 6.0}
_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# E2M1 magnitudes by bit pattern (exponent, mantissa) = index 0..7; index parity = mantissa bit.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: format, scaling, block size, scale storage and rounding."""
    format: str
    scaling: str = "block"
    block_size: int = 32
    scale_format: str = "fp32"
    rounding: str = "nearest"

    def __post_init__(self):
        _check_choice("format", self.format, FORMATS)
        _check_choice("scaling", self.scaling, SCALINGS)
        _check_choice("scale_format", self.scale_format, SCALE_FORMATS)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")


class Quantized(NamedTuple):
    """codes: int8 integers (int8/int4), float8 tensors (e4m3/e5m2), or uint8 E2M1 bit patterns
    sign<<3 | exponent<<1 | mantissa (e2m1; one code per byte, not packed), shaped like x.
    scales: fp32 or uint8 e8m0 codes, shaped (*lead, n_blocks) for block, (*lead, 1) for row,
    (C,) for column, () for tensor."""
    codes: torch.Tensor
    scales: torch.Tensor


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def check_float(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float64, bfloat16, "
                        f"float16), got {t.dtype}")
    return t


def _matrix_shape(shape) -> tuple[int, int]:
    # (rows, cols) explicitly: reshape(-1, cols) is ambiguous for empty tensors
    return (math.prod(shape[:-1]), shape[-1]) if len(shape) else (1, 1)


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).reshape(_matrix_shape(x.shape))


def group_absmax(x2: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """absmax per group, shaped so that expand_groups broadcasts it back: (R, nb), (R, 1),
    (1, C) or (1, 1). NaN-propagating (torch.amax)."""
    a = x2.abs()
    if spec.scaling == "row":
        return a.amax(dim=1, keepdim=True) if a.shape[1] else a.new_zeros(a.shape[0], 1)
    if spec.scaling == "column":
        return a.amax(dim=0, keepdim=True) if a.shape[0] else a.new_zeros(1, a.shape[1])
    if spec.scaling == "tensor":
        return (a.amax() if a.numel() else a.new_zeros(())).reshape(1, 1)
    rows, cols = a.shape
    nb = -(-cols // spec.block_size)
    padded = a.new_zeros(rows, nb * spec.block_size)
    padded[:, :cols] = a
    return padded.view(rows, nb, spec.block_size).amax(dim=2) if rows * nb else \
        a.new_zeros(rows, nb)


def expand_groups(g: torch.Tensor, shape2, spec: QuantSpec) -> torch.Tensor:
    """A per-group tensor broadcast to one value per element of the (R, C) matrix."""
    rows, cols = shape2
    if spec.scaling == "block":
        g = g.repeat_interleave(spec.block_size, dim=1)[:, :cols]
    return g.expand(rows, cols)


def _div(a: torch.Tensor, b) -> torch.Tensor:
    # IEEE fp32 division: float64 then one rounding is exact for a quotient of fp32 values.
    return (a.double() / (b.double() if isinstance(b, torch.Tensor) else b)).float()


def scale_of(absmax: torch.Tensor, spec: QuantSpec):
    """(scale as fp32 values, stored form). Stored form is the fp32 scale or the e8m0 code."""
    fmax = FMT_MAX[spec.format]
    finite = torch.isfinite(absmax)
    if spec.scale_format == "fp32":
        scale = torch.where(finite, _div(absmax, fmax), torch.full_like(absmax, float("nan")))
        return scale, scale
    # ceil(log2(r)) for r = absmax / fmax: the float64 quotient is correctly rounded and cannot
    # land on a power of two unless r is one (absmax and fmax * 2**e are both fp32), so the test
    # "mantissa == 0.5" below is exact.
    r = absmax.double() / fmax
    mant, ex = torch.frexp(torch.where(finite & (r > 0), r, torch.ones_like(r)))
    e = torch.where(mant == 0.5, ex - 1, ex)
    e = torch.where(r > 0, e, torch.full_like(e, -127)).clamp(-127, 127)
    code = torch.where(finite, e + 127, torch.full_like(e, 255)).to(torch.uint8)
    return e8m0_to_float(code), code


def e8m0_to_float(code: torch.Tensor) -> torch.Tensor:
    """2**(code - 127) as fp32 (2**-127 is an fp32 subnormal, exact); code 255 -> NaN."""
    c = code.to(torch.int64)
    val = torch.ldexp(torch.ones(c.shape, dtype=torch.float64), c - 127).float()
    return torch.where(c == 255, torch.full_like(val, float("nan")), val)


def philox_uniform(seed: int, offset: int, n: int) -> torch.Tensor:
    """The Philox words of elements offset .. offset + n - 1: element i takes word i % 4 of
    counter i // 4 (the optimizer write-back's stream: a quarter of the Philox evaluations of one
    counter per element). Every kernel backend draws exactly these words."""
    return philox_word_of(seed, offset + torch.arange(n, dtype=torch.int64))


def _round_int(y: torch.Tensor, words) -> torch.Tensor:
    if words is None:
        return torch.round(y)                      # half to even
    lo = torch.floor(y)
    return lo + (uniform24(words) < (y - lo)).to(y.dtype)   # y - lo exact (|y| <= 127)


def _round_e2m1(y: torch.Tensor, words) -> torch.Tensor:
    """Round |y| <= 6 onto the E2M1 grid; returns the bit pattern (int64)."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    a = y.abs()
    lo = (torch.searchsorted(grid, a, right=True) - 1).clamp(0, 6)
    glo, ghi = grid[lo], grid[lo + 1]
    d, gap = a - glo, ghi - glo                    # exact: glo <= a < 2 * glo or glo == 0
    if words is None:
        up = (2 * d > gap) | ((2 * d == gap) & (lo % 2 == 1))
    else:
        up = uniform24(words) < d / gap            # gap is a power of two: exact quotient
    mag = lo + up.to(torch.int64)
    sign = (torch.signbit(y) & (mag > 0)).to(torch.int64)   # no negative zero code
    return (sign << 3) | mag


def e2m1_to_float(code: torch.Tensor) -> torch.Tensor:
    c = code.to(torch.int64)
    mag = torch.tensor(E2M1_VALUES, dtype=torch.float32)[c & 7]
    return torch.where((c >> 3) & 1 == 1, -mag, mag)


def decode(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Grid values (fp32, before scaling) of the codes of format `fmt`."""
    if fmt == "e2m1":
        return e2m1_to_float(codes)
    return codes.to(torch.float32)


def quantize(x: torch.Tensor, spec: QuantSpec, seed: int = 0, offset: int = 0) -> Quantized:
    """Codes and scales of x under `spec` (see the module docstring for every rule)."""
    check_float("x", x)
    x2 = _as_matrix(x)
    scale, stored = scale_of(group_absmax(x2, spec), spec)
    s = expand_groups(scale, x2.shape, spec)
    fmax = FMT_MAX[spec.format]
    y = torch.where(s > 0, _div(x2, s), torch.zeros_like(x2)).clamp(-fmax, fmax)
    y = torch.where(torch.isnan(s), s, y)     # a non-finite group stays NaN
    words = None
    if spec.rounding == "stochastic":
        words = philox_uniform(seed, offset, x2.numel()).view(x2.shape)
    if spec.format in _FP8:
        codes = round_to_format(y, _FP8[spec.format], words)
    elif spec.format == "e2m1":
        codes = _round_e2m1(torch.nan_to_num(y), words).to(torch.uint8)
    else:
        codes = _round_int(torch.nan_to_num(y), words).to(torch.int8)
    return Quantized(codes.reshape(x.shape), _scales_shape(stored, x, spec))


def _scales_shape(stored: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    lead = tuple(x.shape[:-1])
    if spec.scaling == "column":
        return stored.reshape(-1)
    if spec.scaling == "tensor":
        return stored.reshape(())
    return stored.reshape(lead + (stored.shape[1],))


def dequantize(q: Quantized, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q.codes' grid values times their group's scale (one fp32 product), cast to `dtype`."""
    shape = q.codes.shape
    rows, cols = _matrix_shape(shape)
    vals = decode(q.codes, spec.format).reshape(rows, cols)
    sc = q.scales if spec.scale_format == "fp32" else e8m0_to_float(q.scales)
    per_row = {"block": -(-cols // spec.block_size), "row": 1}
    sc = sc.reshape(rows, per_row[spec.scaling]) if spec.scaling in per_row else \
        sc.reshape(1, -1)
    out = canonical_nan(vals * expand_groups(sc, vals.shape, spec))
    return cast_from_f32(out.reshape(shape), dtype)


def cast_from_f32(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> dtype, nearest-even, by lowbit's own rounding rule for bf16 / fp16 (formats.h):
    torch's cast agrees on every number but not on NaN (it gives bf16 0xFFFF)."""
    if dtype in (torch.bfloat16, torch.float16):
        return round_to_format(t, dtype)
    return t.to(dtype)


def canonical_nan(t: torch.Tensor) -> torch.Tensor:
    """NaNs replaced by the one fp32 NaN 0x7FC00000: the bits of a NaN product depend on which
    operand's NaN torch's vectorized body or scalar tail passes on (and differ on GPUs), so the
    spec fixes them."""
    return torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)


def fake_quant(x: torch.Tensor, spec: QuantSpec, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """Quantize then dequantize: the values a low-precision kernel would see, in x's dtype."""
    return dequantize(quantize(x, spec, seed, offset), spec, x.dtype)
