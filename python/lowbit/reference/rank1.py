"""Rank-1 normalisation of a non-negative state, the readable spec (rules in
csrc/include/lowbit/rank1.h). It is the 4-bit optimizer paper's "Rank-1/Linear" second moment
(Li, Chen, Zhu 2023; research/torchao_lpmm_sr.md §B2): instead of one absmax per block of 128
elements, a matrix state keeps one maximum per row and one per column, and each element is scaled
by the smaller of its two.

A state of n = R * C elements is the row-major matrix v[R, C] (the optimizer views a parameter as
(size(0), numel // size(0)); the paper generalises to a maximum per dimension of a p-D tensor, we
use that single matrix view).

  r_i   = max_j |v_ij|, c_j = max_i |v_ij|, taken on the fp32 bit patterns (bits & 0x7FFFFFFF) as
          unsigned integers, as block absmax is: exact, independent of the order of evaluation,
          and NaN-propagating.
  M_ij  = min(r_i, c_j), also on the bit patterns. A NaN maximum loses to a number, so only an
          element whose row and column both hold a NaN (the NaN element itself) gets M = NaN.
  y_ij  = v_ij * unit_scale(M_ij): unit_scale(M) = 1 / M by IEEE division, 0 when M is not > 0;
          one rounded fp32 product.
  code  = nearest code of y (the number of midpoints strictly below y: ties to the lower code,
          NaN -> 0), exactly as block-wise quantization; 4-bit codes packed two per byte with
          element 2j in the high nibble.
  value = dequant_value(code[c], M_ij): code * M in fp32, a NaN result canonical (0x7FC00000).

Kernels may compute unit_scale(M_ij) as max(unit_scale(r_i), unit_scale(c_j)) from one reciprocal
per row and per column (see rank1.h for why the codes are the same).
"""
import torch

from .quant import nearest_codes, pack_nibbles, unit_scale, unpack_nibbles

_CANONICAL_NAN = 0x7FC00000


def matrix_shape(n: int, cols: int) -> tuple:
    if cols <= 0 or n % cols:
        raise ValueError(f"a rank-1 state needs numel divisible by its columns: {n} vs {cols}")
    return n // cols, cols


def maxima(v: torch.Tensor, cols: int):
    """(row maxima [R], column maxima [C]) of the fp32 state v viewed as [R, C]."""
    rows, cols = matrix_shape(v.numel(), cols)
    bits = v.detach().float().contiguous().view(torch.int32).reshape(rows, cols) & 0x7FFFFFFF
    # |bits| < 2**31: the signed int32 max is the unsigned one
    return (bits.amax(dim=1).view(torch.float32), bits.amax(dim=0).view(torch.float32))


def scale(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """M[R, C] = min(r_i, c_j) on the bit patterns (r, c hold non-negative patterns)."""
    rb, cb = r.float().view(torch.int32), c.float().view(torch.int32)
    return torch.minimum(rb[:, None], cb[None, :]).view(torch.float32)


def quantize(v: torch.Tensor, cols: int, code: torch.Tensor):
    """(packed 4-bit codes, r, c) of the fp32 state v (n elements) viewed as [n // cols, cols]."""
    if code.numel() != 16:
        raise ValueError("rank-1 states use a 16-entry (4-bit) codebook")
    r, c = maxima(v, cols)
    x = v.detach().float().reshape(r.numel(), c.numel())
    y = x * unit_scale(scale(r, c))
    idx = nearest_codes(y.reshape(-1), code.float())
    return pack_nibbles(idx), r, c


def dequantize(codes: torch.Tensor, r: torch.Tensor, c: torch.Tensor, code: torch.Tensor,
               shape) -> torch.Tensor:
    """fp32 values shaped `shape` of the packed codes under row maxima r and column maxima c."""
    n = r.numel() * c.numel()
    idx = unpack_nibbles(codes.reshape(-1), n)
    value = code.float()[idx] * scale(r, c).reshape(-1)
    nan = torch.tensor(_CANONICAL_NAN, dtype=torch.int32).view(torch.float32)
    return torch.where(torch.isnan(value), nan, value).reshape(shape)


def unit_scale_from_reciprocals(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """max(unit_scale(r_i), unit_scale(c_j)): what the CPU kernel multiplies by. Equal to
    unit_scale(M_ij) wherever both maxima are > 0 or NaN; where one of them is 0 the element is 0
    and its code is 0 either way (rank1.h)."""
    return torch.maximum(unit_scale(r.float())[:, None], unit_scale(c.float())[None, :])


__all__ = ["matrix_shape", "maxima", "scale", "quantize", "dequantize",
           "unit_scale_from_reciprocals"]
