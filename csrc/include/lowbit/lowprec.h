// Per-element math of the scaled low-precision quantizers (lowbit.nn; the spec is
// python/lowbit/reference/lowprec.py): scale of a group from its absmax, quantization of one
// scaled value onto a format's grid (nearest-even or stochastic), decoding, and the constants of
// the block Hadamard rotation. CPU, CUDA and the sim compile this one source, so codes and
// dequantized values are bit-identical across backends.
#pragma once
#include <math.h>  // floorf, rintf, sqrt (host builds; nvcc provides their device versions)

#include "formats.h"
#include "philox.h"

namespace lowbit {

// Format ids (python/lowbit/reference/lowprec.py FORMAT_IDS); kLpNone = rotation only.
enum LpFormat : int { kLpNone = -1, kLpInt8 = 0, kLpInt4 = 1, kLpE4M3 = 2, kLpE5M2 = 3,
                      kLpE2M1 = 4 };
// Scaling ids: which elements share one scale.
enum LpScaling : int { kLpBlock = 0, kLpRow = 1, kLpColumn = 2, kLpTensor = 3 };

LOWBIT_HD float lp_fmax(int fmt) {
  switch (fmt) {
    case kLpInt8: return 127.0f;
    case kLpInt4: return 7.0f;
    case kLpE4M3: return 448.0f;
    case kLpE5M2: return 57344.0f;
    default: return 6.0f;  // e2m1
  }
}

LOWBIT_HD bool lp_finite(float v) { return (f32_bits(v) & 0x7F800000u) != 0x7F800000u; }

LOWBIT_HD uint64_t lp_f64_bits(double x) {
#if defined(__CUDA_ARCH__)
  return (uint64_t)__double_as_longlong(x);
#else
  uint64_t u;
  __builtin_memcpy(&u, &x, 8);
  return u;
#endif
}

// 2**(code - 127) as fp32 (2**-127 is the subnormal 0x00400000); code 255 is NaN.
LOWBIT_HD float e8m0_to_f32(uint8_t code) {
  if (code == 255) return bits_f32(0x7FC00000u);
  return bits_f32(code ? (uint32_t)code << 23 : 0x00400000u);
}

// The scale of a group with the given absmax. fp32 scales: absmax / FMT_MAX (IEEE division).
// e8m0 scales: 2**e with e = ceil(log2(absmax / FMT_MAX)) clamped to [-127, 127] (-127 for an
// all-zero group); *code receives e + 127. The quotient is formed in float64, where it is
// correctly rounded, and is never a power of two unless exactly one (absmax and FMT_MAX * 2**e
// are fp32 values), so its exponent and "mantissa == 0" decide the ceiling exactly. A non-finite
// absmax gives a NaN scale (e8m0 code 255). *code is untouched for fp32 scales.
LOWBIT_HD float lp_scale(float absmax, int fmt, bool e8m0, uint8_t* code) {
  const float fmax = lp_fmax(fmt);
  if (!lp_finite(absmax)) {
    if (e8m0) *code = 255;
    return bits_f32(0x7FC00000u);
  }
  if (!e8m0) return div_rn(absmax, fmax);
  int e = -127;
  if (absmax > 0.0f) {
#if defined(__CUDA_ARCH__)
    const double r = __ddiv_rn((double)absmax, (double)fmax);
#else
    const double r = (double)absmax / (double)fmax;
#endif
    const uint64_t b = lp_f64_bits(r);
    const int ex = (int)((b >> 52) & 0x7FF) - 1023;  // r is a normal double: absmax >= 2**-149
    e = ex + ((b & 0xFFFFFFFFFFFFFull) ? 1 : 0);
    e = e < -127 ? -127 : (e > 127 ? 127 : e);
  }
  *code = (uint8_t)(e + 127);
  return e8m0_to_f32((uint8_t)(e + 127));
}

// lp_scale's e8m0 code of a group with absmax bits `ab` (non-negative: an absmax), without the
// float64 division, so that a loop over many groups vectorizes (the CPU block path): with
// absmax = a * 2**ea and FMT_MAX = f * 2**ef (a, f in [1, 2)), absmax / FMT_MAX = (a / f) *
// 2**(ea - ef) with a / f in (1/2, 2), so ceil(log2) = ea - ef, plus one iff a > f. Subnormal
// absmaxes are normalized by an exact product with 2**64. Equal to lp_scale's code for every
// absmax bit pattern (checked exhaustively).
LOWBIT_HD uint32_t lp_e8m0_code(uint32_t ab, int fmt) {
  const uint32_t fb = f32_bits(lp_fmax(fmt));
  const uint32_t E = ab >> 23;
  const uint32_t nb = E ? ab : f32_bits(bits_f32(ab) * 18446744073709551616.0f);  // * 2**64
  const int ea = (int)(nb >> 23) - 127 - (E ? 0 : 64);
  int e = ea - ((int)(fb >> 23) - 127) + ((nb & 0x7FFFFFu) > (fb & 0x7FFFFFu) ? 1 : 0);
  e = ab == 0 ? -127 : e;
  e = e < -127 ? -127 : (e > 127 ? 127 : e);
  return ab >= 0x7F800000u ? 255u : (uint32_t)(e + 127);
}

// x / scale clamped to the format's range; 0 where the scale is 0 (an all-zero group with fp32
// scales), NaN where it is NaN (a group holding inf or NaN).
LOWBIT_HD float lp_scaled(float x, float scale, float fmax) {
  if (scale != scale) return scale;
  float y = scale > 0.0f ? div_rn(x, scale) : 0.0f;
  y = y > fmax ? fmax : y;
  return y < -fmax ? -fmax : y;
}

// E2M1 magnitudes by bit pattern (exponent, mantissa) = index 0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
// Built as fp32 bits rather than read from a table, so that CPU loops vectorize (gcc gives up on
// a local array) and CUDA needs no local memory: exponent e > 0 is 2**(e-1) * (1 + m/2), e = 0
// the subnormal m/2.
LOWBIT_HD float e2m1_magnitude(uint32_t i) {
  const uint32_t e = (i >> 1) & 3u, m = i & 1u;
  return bits_f32(e ? ((e + 126u) << 23) | (m << 22) : (m ? 0x3F000000u : 0u));
}

// The E2M1 magnitude index (0..7) of y (not NaN, |y| <= 6), rounded to nearest-even or
// stochastically: the definition in integer arithmetic, which the faster forms below
// (lp_e2m1_nearest, lp_e2m1_stochastic, lp_grid_*) were checked against; the kernels call
// those. E2M1 is a float format with one mantissa bit and exponent bias 1 (1.0 its
// smallest normal, 0.5 its one subnormal), so the rounding can work on |y|'s fp32
// representation instead of comparing it with the grid, as round_to_fmt does for float8:
// q = |y| truncated onto the grid, already laid out as (exponent, mantissa) bits once `base` is
// added, and rem / 2**s (exact) its position inside the gap to the next grid value.
//   nearest: up if rem is above half the gap, or exactly half and q is odd (ties to even)
//   stochastic: up iff uniform24(r) < rem / 2**s, i.e. (r >> 8) < ceil(rem * 2**(24 - s)) —
//     exact for every s, unlike round_to_fmt's truncated threshold
// Same results as comparing with the grid for every input (checked exhaustively), at a third of
// the cost once vectorized. (Unsigned arithmetic throughout: gcc 12 vectorizes other spellings
// of the same operations several times slower, or not at all.)
LOWBIT_HD uint32_t lp_e2m1_bits(float y, bool stochastic, uint32_t r) {
  const uint32_t a = f32_bits(y) & 0x7FFFFFFFu;
  const uint32_t E = a >> 23;
  const uint32_t M = E ? ((a & 0x7FFFFFu) | 0x800000u) : a;
  const uint32_t s = E < 127u ? 149u - (E ? E : 1u) : 22u;  // dropped bits: 22 - exponent
  const uint32_t q = s < 32u ? M >> s : 0u;
  const uint32_t rem = s < 32u ? M & ((1u << s) - 1u) : M;
  uint32_t inc;
  if (stochastic) {
    uint32_t t;
    if (s <= 24u) {
      t = rem << (24u - s);
    } else {
      const uint32_t k = s - 24u;
      t = (k < 32u ? rem >> k : 0u) + ((k < 32u ? rem & ((1u << k) - 1u) : rem) ? 1u : 0u);
    }
    inc = (r >> 8) < t ? 1u : 0u;
  } else {
    const uint32_t half = s <= 32u ? 1u << (s - 1u) : 0xFFFFFFFFu;
    inc = (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
  }
  const uint32_t mag = (E > 127u ? (E - 127u) << 1 : 0u) + q + inc;
  return mag < 7u ? mag : 7u;  // (|y| <= 6 never needs it)
}

// Nearest-even once more, cheaper: adding m = 2**(max(e, 0) + 22), e = |y|'s exponent, leaves one
// mantissa bit of |y| in the sum, the grid's spacing at |y| (0.5 below 1.0), so the fp32 addition
// itself rounds to the grid with ties to even (= the even mantissa bit); subtracting m is exact.
// Equal to lp_e2m1_bits(y, false, r) for every input (checked exhaustively).
LOWBIT_HD uint32_t lp_e2m1_nearest(float y) {
  const uint32_t a = f32_bits(y) & 0x7FFFFFFFu;
  const uint32_t E = a >> 23;
  const float m = bits_f32(((E > 127u ? E : 127u) + 22u) << 23);
  const uint32_t v = f32_bits((bits_f32(a) + m) - m);  // |y| on the grid
  const uint32_t mag =
      v >= 0x3F800000u ? (((v >> 23) - 126u) << 1) | ((v >> 22) & 1u) : (v ? 1u : 0u);
  return mag < 7u ? mag : 7u;
}

// Stochastic rounding once more, in fp32 arithmetic that vectorizes to about half the integer
// form's cost: with d the grid's spacing at |y| (2**(max(e, 0) - 1)), t = |y| / d, lo = floor(t)
// and the fraction t - lo are exact, and (r >> 8) < ceil(rem * 2**(24 - s)) above is exactly
// uniform24(r) < t - lo (both sides are rem / 2**s and (r >> 8) / 2**24 scaled alike; for s > 24
// an integer is below ceil(z) iff it is below z). Equal to lp_e2m1_bits(y, true, r) (checked on
// every |y| <= 6 with several words each, and on the words at each threshold).
LOWBIT_HD uint32_t lp_e2m1_stochastic(float y, uint32_t r) {
  const uint32_t a = f32_bits(y) & 0x7FFFFFFFu;
  const uint32_t E = a >> 23, Em = E > 127u ? E : 127u;
  const float d = bits_f32((Em - 1u) << 23), inv = bits_f32((255u - Em) << 23);
  const float t = mul_rn(bits_f32(a), inv);
  const float lo = floorf(t);
  const uint32_t v = f32_bits(mul_rn(lo + (uniform24(r) < t - lo ? 1.0f : 0.0f), d));
  const uint32_t mag =
      v >= 0x3F800000u ? (((v >> 23) - 126u) << 1) | ((v >> 22) & 1u) : (v ? 1u : 0u);
  return mag < 7u ? mag : 7u;
}

LOWBIT_HD uint32_t lp_e2m1_index(float y, bool stochastic, uint32_t r) {
  return stochastic ? lp_e2m1_stochastic(y, r) : lp_e2m1_nearest(y);
}

// Nearest-even float8 (e4m3fn, or e5m2) bits of y, |y| <= the format's largest finite value or
// NaN: round_to_fmt(f32_bits(y), fmt_of(...), false, 0)'s result for every such y (checked
// exhaustively), a third of its cost once vectorized. As in lp_e2m1_nearest, adding
// m = 2**(max(e, emin) + 23 - mbits) leaves the format's spacing at |y| (subnormals included) as
// the sum's last bit, so the fp32 addition rounds |y| onto the grid and subtracting m is exact;
// the grid value's fp32 bits then rearrange into the float8 bits. (|y| beyond the largest finite
// value, which lp_scaled's clamp rules out, would saturate.)
LOWBIT_HD uint32_t lp_fp8_nearest(float y, bool e4m3) {
  const uint32_t mbits = e4m3 ? 3u : 2u, emin = e4m3 ? 127u - 6u : 127u - 14u;  // biased fp32
  const uint32_t max_bits = e4m3 ? 0x43E00000u : 0x47600000u;                   // 448, 57344
  const uint32_t b = f32_bits(y), sign = (b >> 31) << 7;
  const uint32_t a = (b & 0x7FFFFFFFu) < max_bits ? b & 0x7FFFFFFFu : max_bits;
  const uint32_t E = a >> 23;
  const float m = bits_f32(((E > emin ? E : emin) + 23u - mbits) << 23);
  const float vf = (bits_f32(a) + m) - m;  // |y| on the grid
  const uint32_t v = f32_bits(vf);
  const uint32_t normal = (((v >> 23) - (emin - 1u)) << mbits) | ((v >> (23u - mbits)) &
                                                                  ((1u << mbits) - 1u));
  // a subnormal grid value is k * 2**(emin - 127 - mbits): k, exactly
  const uint32_t sub = (uint32_t)(int)(vf * bits_f32((127u + 127u + mbits - emin) << 23));
  const uint32_t mag = v >= (emin << 23) ? normal : sub;
  return ((b & 0x7FFFFFFFu) > 0x7F800000u ? 0x7Fu : mag) | sign;  // NaN keeps its sign
}

// The code of a scaled value y (|y| <= FMT_MAX or NaN) as one byte: two's complement for
// int8/int4, the float8 bit pattern for e4m3/e5m2, sign<<3 | exponent<<1 | mantissa for e2m1.
// r is the element's Philox word (philox_word_of's stream; ignored for nearest-even). NaN
// becomes code 0 for the integer and e2m1 formats (the reference's nan_to_num) and the float8
// NaN for e4m3/e5m2.
LOWBIT_HD uint8_t lp_encode(float y, int fmt, bool stochastic, uint32_t r) {
  if (fmt == kLpE4M3 || fmt == kLpE5M2) {
    if (!stochastic) return (uint8_t)lp_fp8_nearest(y, fmt == kLpE4M3);
    return (uint8_t)round_to_fmt(f32_bits(y), fmt_of(fmt == kLpE4M3 ? kE4M3FN : kE5M2), true, r);
  }
  if (y != y) y = 0.0f;
  if (fmt == kLpE2M1) {
    const uint32_t mag = lp_e2m1_index(y, stochastic, r);
    return (uint8_t)(mag ? ((f32_bits(y) >> 28) & 8u) | mag : 0u);  // no negative-zero code
  }
  float q;
  if (stochastic) {
    const float lo = floorf(y);
    q = lo + (uniform24(r) < y - lo ? 1.0f : 0.0f);  // y - lo exact: |y| <= 127
  } else {
    q = rintf(y);  // ties to even (the default rounding mode)
  }
  return (uint8_t)(int8_t)(int)q;
}

// float8_e4m3fn bits -> fp32 (no infinities; 0x7F / 0xFF are NaN).
LOWBIT_HD float e4m3_to_f32(uint8_t c) {
  const uint32_t sign = (uint32_t)(c & 0x80u) << 24;
  const uint32_t e = (c >> 3) & 0xFu, m = c & 7u;
  if (e == 0xFu && m == 7u) return bits_f32(sign | 0x7FC00000u);
  if (e == 0) return bits_f32(f32_bits((float)m * 0.001953125f) | sign);  // m * 2**-9, exact
  return bits_f32(sign | ((e + 120u) << 23) | (m << 20));
}

// The grid value (before scaling) of a code.
LOWBIT_HD float lp_decode(uint8_t c, int fmt) {
  if (fmt == kLpE4M3) return e4m3_to_f32(c);
  if (fmt == kLpE5M2) return f16_to_f32((uint16_t)((uint16_t)c << 8));  // e5m2 = fp16's top byte
  if (fmt == kLpE2M1) {
    const float m = e2m1_magnitude(c & 7u);
    return (c & 8u) ? -m : m;
  }
  return (float)(int8_t)c;
}

// The dequantized fp32 value of code c in a group of the given scale. A NaN scale (a non-finite
// group; always lp_scale's canonical 0x7FC00000, the reference's NaN) is returned as it is: for
// float8 formats the decoded code is a NaN too, and which NaN a product passes on depends on the
// hardware (GPUs return 0x7FFFFFFF) and, on x86, on the compiler's operand order.
LOWBIT_HD float lp_dequant(uint8_t c, float scale, int fmt) {
  const float v = mul_rn(lp_decode(c, fmt), scale);
  return scale != scale ? scale : v;
}

// The grid value of a scaled value y (finite, |y| <= FMT_MAX) under nearest-even rounding,
// straight from y's fp32 bits: lp_decode(lp_encode(y, fmt, false, 0), fmt) for every such y and
// format (checked exhaustively, both signs), at about half the cost of encoding and decoding —
// the CPU fake-quant loop needs no code. The addition trick of lp_e2m1_nearest / lp_fp8_nearest
// rounds |y| onto the grid; the sign follows the code's: e2m1 and the integer formats have no
// negative zero (code 0 decodes to +0; rintf(-0.3) + 0 is +0), float8 keeps it.
LOWBIT_HD float lp_grid_nearest(float y, int fmt) {
  if (fmt == kLpInt8 || fmt == kLpInt4) return rintf(y) + 0.0f;
  const uint32_t b = f32_bits(y), sign = b & 0x80000000u, a = b & 0x7FFFFFFFu;
  const uint32_t E = a >> 23;
  if (fmt == kLpE2M1) {
    // The magic number carries y's sign, so y rounds symmetrically in one add and one subtract;
    // a value rounding to zero comes out +0 (m - m), as code 0 decodes. (Its exponent is that
    // of max(|y|, 1), i.e. max(E, 127); checked against the unsigned form on every |y| <= 6,
    // both signs.)
    const float mx = bits_f32(a) > 1.0f ? bits_f32(a) : 1.0f;
    const float m = bits_f32(((f32_bits(mx) & 0x7F800000u) + (22u << 23)) | sign);
    return (y + m) - m;
  }
  const uint32_t mbits = fmt == kLpE4M3 ? 3u : 2u;
  const uint32_t emin = fmt == kLpE4M3 ? 127u - 6u : 127u - 14u;
  const float m = bits_f32(((E > emin ? E : emin) + 23u - mbits) << 23);
  return bits_f32(f32_bits((bits_f32(a) + m) - m) | sign);
}

// lp_grid_nearest's stochastic counterpart for the integer formats and E2M1 (float8 takes
// round_to_fmt): lp_decode(lp_encode(y, fmt, true, r), fmt) for y finite, |y| <= FMT_MAX
// (checked on every such y with several words each). The integers as lp_encode rounds them;
// E2M1 as lp_e2m1_stochastic, ending at the grid value instead of its index.
LOWBIT_HD float lp_grid_stochastic(float y, int fmt, uint32_t r) {
  if (fmt == kLpInt8 || fmt == kLpInt4) {
    const float lo = floorf(y);
    return lo + (uniform24(r) < y - lo ? 1.0f : 0.0f);  // (-1 + 1 is +0, as code 0 decodes)
  }
  const uint32_t b = f32_bits(y), a = b & 0x7FFFFFFFu;
  const uint32_t E = a >> 23, Em = E > 127u ? E : 127u;
  const float d = bits_f32((Em - 1u) << 23), inv = bits_f32((255u - Em) << 23);
  const float t = mul_rn(bits_f32(a), inv);
  const float lo = floorf(t);
  const uint32_t v = f32_bits(mul_rn(lo + (uniform24(r) < t - lo ? 1.0f : 0.0f), d));
  return bits_f32(v | (v ? b & 0x80000000u : 0u));
}

// 1 / s for an e8m0 scale s = 2**e, e in [-127, 127]: the power of two 2**-e, from the bits
// (2**-127 is the subnormal 0x00400000). x / s and x * (1 / s) then round the same exact
// quotient, so the multiply may stand in for lp_scaled's division. (A NaN s gives garbage; the
// caller returns the NaN scale for such groups.)
LOWBIT_HD float lp_e8m0_inverse(float s) {
  const uint32_t b = f32_bits(s), E = b >> 23;
  return bits_f32(b == 0x00400000u ? 0x7F000000u : E >= 254u ? 0x00400000u : (254u - E) << 23);
}

// One element quantized and dequantized in fp32 (before the cast to the output dtype).
LOWBIT_HD float lp_fake_quant(float x, float scale, int fmt, bool stochastic, uint32_t r,
                              uint8_t* code) {
  const uint8_t c = lp_encode(lp_scaled(x, scale, lp_fmax(fmt)), fmt, stochastic, r);
  *code = c;
  return lp_dequant(c, scale, fmt);
}

// The spec's one NaN (0x7FC00000) for a NaN v: which NaN operand an fp32 add passes on, and
// inf - inf's sign, differ between x86, GPUs and numpy.
LOWBIT_HD float lp_canonical_nan(float v) { return v != v ? bits_f32(0x7FC00000u) : v; }

// 1/sqrt(block) rounded to fp32: the factor the normalized Hadamard butterfly ends with (the
// reference multiplies its fp32 result by this Python float, which torch rounds to fp32).
LOWBIT_HD float hadamard_norm(int block) {
  return (float)(1.0 / sqrt((double)block));
}

}  // namespace lowbit
