"""fp32 -> bf16 / fp16 / float8_e4m3fn / float8_e5m2 rounding, nearest-even or stochastic.

The rule (same as csrc/include/lowbit/formats.h): on the fp32 bits, drop the s significand bits
the target cannot hold; nearest-even adds one unit if the dropped part is above half (or exactly
half with an odd kept part); stochastic adds one unit iff (r >> 8) < dropped / 2**s * 2**24, r
being the element's Philox word. Results above the largest finite value become the format's
overflow value: +-inf, or +-448 for float8_e4m3fn (no infinity; torch's cast saturates).
NaN -> canonical NaN (sign kept except bf16); +-inf -> the overflow value.
"""
import torch

from .philox import philox_word0

# name: (torch dtype, width, mantissa bits, emin, max finite bits, overflow bits, nan bits,
#        nan keeps sign)
FORMATS = {
    torch.bfloat16: (16, 7, -126, 0x7F7F, 0x7F80, 0x7FC0, False),
    torch.float16: (16, 10, -14, 0x7BFF, 0x7C00, 0x7E00, True),
    torch.float8_e4m3fn: (8, 3, -6, 0x7E, 0x7E, 0x7F, True),  # saturating, like torch's cast
    torch.float8_e5m2: (8, 2, -14, 0x7B, 0x7C, 0x7F, True),
}
_BITS_VIEW = {16: torch.int16, 8: torch.int8}


def round_to_format(x: torch.Tensor, dtype: torch.dtype, r: torch.Tensor | None = None):
    """Round fp32 `x` into `dtype`: nearest-even if r is None, else stochastically with the
    per-element Philox words `r` (uint32 values in int64). Returns a tensor of `dtype`."""
    width, mbits, emin, max_finite, overflow, nan, nan_sign = FORMATS[dtype]
    b = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = (b >> 31) << (width - 1)
    a = b & 0x7FFFFFFF
    E = a >> 23
    M = torch.where(E > 0, (a & 0x7FFFFF) | 0x800000, a)
    Eu = torch.clamp(E, min=1) - 127
    s = 23 - mbits + torch.clamp(emin - Eu, min=0)
    s_c = torch.clamp(s, max=62)  # beyond 24 nothing of the significand is kept anyway
    q = M >> s_c
    base = torch.clamp(Eu - emin, min=0) << mbits
    dropped = M & ((1 << s_c) - 1)
    if r is None:
        half = 1 << (s_c - 1)
        inc = (dropped > half) | ((dropped == half) & ((q & 1) == 1))
    else:
        threshold = torch.where(s_c <= 24, dropped << torch.clamp(24 - s_c, min=0),
                                M >> torch.clamp(s_c - 24, min=0))
        inc = (r >> 8) < threshold
    mag = base + q + inc.to(torch.int64)
    mag = torch.where(mag > max_finite, torch.full_like(mag, overflow), mag)
    out = mag | sign
    out = torch.where(a == 0x7F800000, overflow | sign, out)
    out = torch.where(a > 0x7F800000, (nan | sign) if nan_sign else torch.full_like(out, nan), out)
    # reinterpret the low `width` bits as the target dtype
    out = torch.where(out >= 1 << (width - 1), out - (1 << width), out)
    return out.to(_BITS_VIEW[width]).view(dtype).reshape(x.shape)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int, offset: int = 0):
    """Stochastically round fp32 `x` to `dtype`; element i (row-major) uses the Philox word of
    counter offset + i under key `seed`."""
    counters = offset + torch.arange(x.numel(), dtype=torch.int64)
    r = philox_word0(seed, counters).reshape(x.shape)
    return round_to_format(x, dtype, r)
