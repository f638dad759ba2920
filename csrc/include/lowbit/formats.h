// Narrow float formats and the one integer routine that rounds fp32 into any of them, either to
// nearest-even (used for ordinary casts, e.g. dequantizing into bf16) or stochastically.
//
// The rounding works on the fp32 bit pattern only (no float arithmetic), so it is bit-identical
// on CPU, CUDA, the sim, Triton and the torch reference by construction:
//   a  = |x| as bits; M = significand with the implicit bit; Eu = unbiased exponent of x
//   s  = number of fp32 significand bits the target cannot hold (more when the target value is
//        subnormal); q = M >> s is the value truncated toward zero, already laid out as the
//        target's (exponent, mantissa) bits once the exponent base is added
//   nearest-even: add 1 if the dropped bits are above half, or exactly half and q is odd
//   stochastic:   add 1 iff (r >> 8) < dropped/2^s * 2^24, so P(up) = distance to the lower
//                 neighbour / gap (exact while s <= 24, i.e. unbiased for every value the
//                 target can resolve; below that the probability is truncated to 2^-24 steps)
//   a result above the largest finite value becomes the format's overflow value: +-inf, except
//   float8_e4m3fn, which has no infinity and saturates to +-448 (torch's cast, CUDA's SATFINITE).
// NaN maps to the format's canonical NaN (sign kept except for bf16); +-inf maps to the overflow
// value (so +-448 for e4m3fn, as torch's cast gives).
#pragma once
#include "hd.h"

namespace lowbit {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kE4M3FN = 3, kE5M2 = 4 };

struct Fmt {
  int width;           // total bits
  int mbits;           // explicit mantissa bits
  int emin;            // unbiased exponent of the smallest normal
  uint32_t max_finite; // largest finite magnitude, as bits
  uint32_t overflow;   // magnitude bits for values beyond max_finite
  uint32_t nan;        // canonical NaN magnitude bits
  bool nan_keeps_sign;
};

LOWBIT_HD Fmt fmt_of(int dtype) {
  Fmt f;
  switch (dtype) {
    case kF16:    f = {16, 10, -14, 0x7BFFu, 0x7C00u, 0x7E00u, true}; break;
    case kE4M3FN: f = {8, 3, -6, 0x7Eu, 0x7Eu, 0x7Fu, true}; break;  // saturates
    case kE5M2:   f = {8, 2, -14, 0x7Bu, 0x7Cu, 0x7Fu, true}; break;
    default:      f = {16, 7, -126, 0x7F7Fu, 0x7F80u, 0x7FC0u, false}; break;  // bf16
  }
  return f;
}

// Round fp32 bits `b` into format `f`. `stochastic` selects the rule; `r` is the element's Philox
// word (ignored for nearest-even).
LOWBIT_HD uint32_t round_to_fmt(uint32_t b, const Fmt f, bool stochastic, uint32_t r) {
  const uint32_t sign = (b >> 31) << (f.width - 1);
  const uint32_t a = b & 0x7FFFFFFFu;
  // NaN and inf are selected at the end rather than returned early: no branch, so CPU loops
  // around this routine vectorize (the finite path below is well defined for them too).
  const uint32_t E = a >> 23;
  const uint32_t M = E ? ((a & 0x7FFFFFu) | 0x800000u) : a;
  const int Eu = (E ? (int)E : 1) - 127;
  const int extra = f.emin > Eu ? f.emin - Eu : 0;
  const int s = 23 - f.mbits + extra;  // >= 13 for every supported format
  const uint32_t q = s < 32 ? (M >> s) : 0u;
  const uint32_t base = (Eu > f.emin ? (uint32_t)(Eu - f.emin) : 0u) << f.mbits;
  uint32_t inc;
  if (stochastic) {
    uint32_t t;
    if (s <= 24) t = (M & ((1u << s) - 1u)) << (24 - s);
    else t = (s - 24) < 32 ? (M >> (s - 24)) : 0u;
    inc = (r >> 8) < t ? 1u : 0u;
  } else {
    const uint32_t rem = s < 32 ? (M & ((1u << s) - 1u)) : M;
    const uint32_t half = s <= 32 ? (1u << (s - 1)) : 0xFFFFFFFFu;
    inc = (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
  }
  uint32_t mag = base + q + inc;
  mag = mag > f.max_finite ? f.overflow : mag;
  const uint32_t nan = f.nan | (f.nan_keeps_sign ? sign : 0u);
  return a > 0x7F800000u ? nan : (a == 0x7F800000u ? (f.overflow | sign) : (mag | sign));
}

// round_to_fmt for bf16, in a few integer operations: bf16 keeps fp32's exponent range, so
// rounding only drops the low 16 bits (fp32 subnormals included: s = 16 for every finite input)
// and a carry out of the kept mantissa bumps the exponent (0x7F7F + 1 = inf, the overflow value).
// Same results as round_to_fmt(b, fmt_of(kBF16), stochastic, r) for every input.
LOWBIT_HD uint32_t round_to_bf16(uint32_t b, bool stochastic, uint32_t r) {
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;  // NaN: canonical, no sign (bf16 rule)
  const uint32_t low = b & 0xFFFFu;
  uint32_t inc;
  if (stochastic) inc = (r >> 8) < (low << 8) ? 1u : 0u;
  else inc = (low > 0x8000u || (low == 0x8000u && ((b >> 16) & 1u))) ? 1u : 0u;
  return (b >> 16) + inc;
}

// Exact widening of bf16 / fp16 bits to fp32.
LOWBIT_HD float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

LOWBIT_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  // All three cases computed, then selected: branch-free, so CPU loops vectorize.
  // inf, or NaN made quiet as hardware conversions (and torch's) do
  const uint32_t special = sign | 0x7F800000u | (m << 13) | (m ? 0x400000u : 0u);
  const uint32_t normal = sign | ((e + 112u) << 23) | (m << 13);
  // subnormal (or zero): m * 2^-24 is exact in fp32
  const uint32_t sub = f32_bits((float)m * 5.9604644775390625e-08f) | sign;
  return bits_f32(e == 0x1Fu ? special : (e != 0 ? normal : sub));
}

// Load element i of a buffer of the given input dtype (fp32, bf16, fp16) as fp32, exactly.
LOWBIT_HD float load_f32(const void* p, int dtype, int64_t i) {
  if (dtype == kBF16) return bf16_to_f32(((const uint16_t*)p)[i]);
  if (dtype == kF16) return f16_to_f32(((const uint16_t*)p)[i]);
  return ((const float*)p)[i];
}

// Store fp32 v into element i of a buffer of dtype fp32 / bf16 / fp16 with nearest-even rounding
// (torch's cast).
LOWBIT_HD void store_rne(void* p, int dtype, int64_t i, float v) {
  if (dtype == kF32) { ((float*)p)[i] = v; return; }
  ((uint16_t*)p)[i] = (uint16_t)round_to_fmt(f32_bits(v), fmt_of(dtype), false, 0u);
}

}  // namespace lowbit
