"""Block-wise codebook quantization, the readable spec (rules in csrc/include/lowbit/quant.h).

Per block of `block_size` consecutive elements of the flattened (row-major) input:
absmax = max |x| taken on the fp32 bit patterns (NaN-propagating); y = x * (1 / absmax) (the
reciprocal by IEEE division once per block, 0 when absmax is not > 0); nearest code = number of fp32 midpoints strictly below y (ties to the lower
code); stochastic: between the two neighbouring codes, up with probability equal to the
fractional distance, using the element's Philox word. 4-bit codes: element 2j in the high nibble.
"""
import torch

from .philox import philox_word0, uniform24
from .rounding import round_to_format


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """(code[k] + code[k+1]) * 0.5 in fp32: the decision boundaries of nearest rounding."""
    return (code[:-1] + code[1:]) * 0.5


def block_absmax(x32: torch.Tensor, block_size: int) -> torch.Tensor:
    n = x32.numel()
    nblocks = -(-n // block_size)
    bits = x32.reshape(-1).view(torch.int32) & 0x7FFFFFFF
    padded = torch.zeros(nblocks * block_size, dtype=torch.int32)
    padded[:n] = bits
    return padded.view(nblocks, block_size).amax(dim=1).view(torch.float32) if n else \
        torch.empty(0, dtype=torch.float32)


def _divide_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # IEEE fp32 division. Computing in float64 and rounding once is exact for division (53 >=
    # 2*24+2 bits) and sidesteps torch turning a broadcast divisor into a reciprocal multiply.
    return (a.double() / b.double()).float()


def unit_scale(absmax: torch.Tensor) -> torch.Tensor:
    """inv = 1 / absmax per block (IEEE division), 0 where absmax is not > 0."""
    inv = _divide_exact(torch.ones_like(absmax), absmax)
    return torch.where(absmax > 0, inv, torch.zeros_like(inv))


def scale_to_unit(x32: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """y = x * inv, one rounded fp32 product per element."""
    n = x32.numel()
    inv = unit_scale(absmax).repeat_interleave(block_size)[:n]
    return x32.reshape(-1) * inv


def nearest_codes(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    idx = torch.searchsorted(midpoints(code), y, right=False)   # count of mids < y
    return torch.where(torch.isnan(y), torch.zeros_like(idx), idx)


def stochastic_codes(y: torch.Tensor, code: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    ncode = code.numel()
    lo = torch.searchsorted(code, y, right=True) - 1             # count of code <= y, minus 1
    lo = torch.where(torch.isnan(y), torch.zeros_like(lo), lo).clamp(0, ncode - 2)
    c_lo, c_hi = code[lo], code[lo + 1]
    p = _divide_exact(y - c_lo, c_hi - c_lo)
    counters = offset + torch.arange(y.numel(), dtype=torch.int64)
    u = uniform24(philox_word0(seed, counters))
    return torch.where(u < p, lo + 1, lo)


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, element 2j in the high nibble; an odd tail gets a 0 low nibble."""
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    pairs = idx.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.to(torch.int64)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block_size: int,
                       stochastic: bool = False, seed: int = 0, offset: int = 0):
    """Returns (codes uint8, absmax float32[ceil(n / block_size)]). 8-bit codebooks (256
    entries) give one byte per element in x's shape; 4-bit ones (16 entries) a flat packed
    buffer of ceil(n / 2) bytes."""
    x32 = x.detach().to(torch.float32).contiguous().reshape(-1)
    code = code.to(torch.float32)
    absmax = block_absmax(x32, block_size)
    y = scale_to_unit(x32, absmax, block_size)
    idx = stochastic_codes(y, code, seed, offset) if stochastic else nearest_codes(y, code)
    if code.numel() == 16:
        return pack_nibbles(idx), absmax
    return idx.to(torch.uint8).reshape(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         block_size: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """value = code[c] * absmax[block] in fp32 (NaN -> the canonical 0x7FC00000), then rounded to
    dtype with nearest-even."""
    n = 1
    for d in shape:
        n *= d
    if code.numel() == 16:
        idx = unpack_nibbles(codes.reshape(-1), n)
    else:
        idx = codes.reshape(-1).to(torch.int64)
    per_elem = absmax.repeat_interleave(block_size)[:n]
    value = code.to(torch.float32)[idx] * per_elem
    canonical_nan = torch.tensor(0x7FC00000, dtype=torch.int32).view(torch.float32)
    value = torch.where(torch.isnan(value), canonical_nan, value)
    if dtype == torch.float32:
        return value.reshape(shape)
    # the documented nearest-even rule, with its canonical NaN (torch's own casts give different
    # NaN payloads on their scalar and vector paths)
    return round_to_format(value, dtype).reshape(shape)
