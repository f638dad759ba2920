// Rank-1 normalisation of a non-negative matrix state (the 4-bit Adam second moment viewed as
// [R, C]): one maximum per row and per column instead of one absmax per block. The rules every
// backend follows exactly (spec: lowbit.reference.rank1):
//   r_i, c_j  = max over the row / column of |v| on the fp32 bit patterns as unsigned integers
//               (exact, order-free, NaN-propagating: the block absmax rule of quant.h). Because
//               the patterns are non-negative, a maximum across CUDA blocks is an atomicMax on
//               the uint32 bits.
//   M_ij      = min(r_i, c_j) on the bit patterns (a NaN maximum loses to a number).
//   encode    = nearest code of v_ij * unit_scale(M_ij), as quantization with absmax M_ij.
//   decode    = dequant_value(code, M_ij).
// The reciprocal may instead be taken once per row and per column: unit_scale(min(r, c)) equals
// max(unit_scale(r), unit_scale(c)) whenever r and c are both > 0 (1/x is decreasing and
// rounding to nearest is monotonic, so RN(1/min) = max(RN(1/r), RN(1/c)), 1/inf = 0 included) or
// either is NaN (unit_scale(NaN) = 0 and the bit-min picks the other). When one of them is 0 the
// whole row or column is +0, so v_ij = +0 and its scaled value is 0 (or NaN when the other
// reciprocal overflows to inf); both give code 0, the same code as the spec's 0 * 0.
#pragma once
#include "hd.h"
#include "quant.h"

namespace lowbit {

// Scale of element (i, j) from its row and column maxima.
LOWBIT_HD float rank1_scale(float r, float c) {
  const uint32_t rb = f32_bits(r), cb = f32_bits(c);
  return bits_f32(rb < cb ? rb : cb);
}

// unit_scale(rank1_scale(r, c)) from the per-row and per-column reciprocals inv_r =
// unit_scale(r), inv_c = unit_scale(c) (never NaN), equal in the codes it produces (above).
LOWBIT_HD float rank1_unit_scale(float inv_r, float inv_c) { return inv_r > inv_c ? inv_r : inv_c; }

// Row and column of element begin + i of a matrix with C columns, given begin's (row0, col0) and
// i < 4096 (a quantization block): one comparison when rows are at least a block long, a 32-bit
// division otherwise (no 64-bit division per element on the GPU).
LOWBIT_HD void rank1_locate(int64_t row0, int64_t col0, int i, int64_t C, int64_t& row,
                            int64_t& col) {
  const int64_t rel = col0 + i;
  if (C >= 4096) {
    const bool wrap = rel >= C;
    row = row0 + (wrap ? 1 : 0);
    col = wrap ? rel - C : rel;
  } else {
    const uint32_t q = (uint32_t)rel / (uint32_t)C;
    row = row0 + q;
    col = rel - (int64_t)q * C;
  }
}

}  // namespace lowbit
