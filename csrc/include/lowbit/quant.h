// Block-wise codebook quantization of one value. The rules every backend follows exactly:
//   absmax  = max over the block of |x|, taken on the fp32 bit patterns (bits & 0x7FFFFFFF) as
//             unsigned integers: exact, order-independent, and NaN-propagating (a block holding a
//             NaN gets a NaN absmax and so dequantizes to NaN rather than to made-up numbers).
//   y       = x * inv with inv = 1 / absmax (one IEEE division per block), or inv = 0 when
//             absmax is not > 0 (all-zero and NaN blocks); the product is rounded once (no FMA).
//   nearest = number of midpoints strictly below y, where mids[k] = (code[k] + code[k+1]) * 0.5f is
//             computed once in fp32 on the host: ties go to the lower code; NaN y (from a NaN
//             or an inf element) gives index 0.
//   stochastic: lo = clamp(#{code[k] <= y} - 1, 0, n-2), hi = lo + 1,
//             p = (y - code[lo]) / (code[hi] - code[lo]), pick hi iff uniform24(r) < p — so the
//             expectation of the dequantized value is y (unbiased) inside the codebook's range,
//             and y outside the range saturates to the end code.
//   dequantize = code[c] * absmax in fp32; a NaN result is the canonical quiet NaN 0x7FC00000
//             (x86 and GPU arithmetic produce different NaN bits; this keeps backends identical).
//   4-bit codes are packed two per byte, element 2j in the high nibble (bitsandbytes' order).
#pragma once
#include "hd.h"
#include "philox.h"

namespace lowbit {

LOWBIT_HD uint32_t abs_bits(float x) { return f32_bits(x) & 0x7FFFFFFFu; }

LOWBIT_HD float dequant_value(float code_value, float absmax) {
  const float v = mul_rn(code_value, absmax);
  return v != v ? bits_f32(0x7FC00000u) : v;
}

// Per block: the multiplier that maps the block into [-1, 1].
LOWBIT_HD float unit_scale(float absmax) { return absmax > 0.0f ? div_rn(1.0f, absmax) : 0.0f; }

LOWBIT_HD float scale_to_unit(float x, float inv) { return mul_rn(x, inv); }

// count of mids[0..nmid) strictly below y (lower_bound); mids sorted ascending.
LOWBIT_HD int nearest_index(float y, const float* mids, int nmid) {
  int lo = 0, len = nmid;
  while (len > 0) {
    const int half = len >> 1;
    if (mids[lo + half] < y) { lo += half + 1; len -= half + 1; }
    else len = half;
  }
  return lo;
}

// count of code[0..ncode) that are <= y (upper_bound).
LOWBIT_HD int count_le(float y, const float* code, int ncode) {
  int lo = 0, len = ncode;
  while (len > 0) {
    const int half = len >> 1;
    if (code[lo + half] <= y) { lo += half + 1; len -= half + 1; }
    else len = half;
  }
  return lo;
}

LOWBIT_HD int stochastic_index(float y, const float* code, int ncode, uint32_t r) {
  int lo = count_le(y, code, ncode) - 1;
  lo = lo < 0 ? 0 : (lo > ncode - 2 ? ncode - 2 : lo);
  const float p = div_rn(y - code[lo], code[lo + 1] - code[lo]);
  return uniform24(r) < p ? lo + 1 : lo;
}

}  // namespace lowbit
