// The scaled low-precision quantizers and the block Hadamard rotation (lowbit.ops' lowprec
// contract; the spec is lowbit.backends.reference.lowprec). Included per ISA after
// kernels_impl.h (whose load_t, fill_philox4 and AVX-512 helpers it uses).
//
// Every row segment goes through a small fp32 buffer: load (widening bf16/fp16 exactly), rotate
// when had > 0, take each group's absmax and scale, quantize and dequantize in place (codes
// straight to memory), rotate back, store with one nearest-even cast. (Fake quantization without
// codes, lp_fake_segment, skips the buffer for an unrotated fp32 x and rounds straight onto the
// grid.) The rounding itself is lowbit/lowprec.h's, called per element, so codes and values are
// the CUDA kernels' bit for bit.
//   block and row scaling: one pass — a segment holds whole groups, whose absmax and scale come
//     from the buffer (unless a block and the rotation block have a huge lcm, or a row is very
//     long: then the two-pass path below)
//   column and tensor scaling: two passes over x — the first reduces each group's absmax (of the
//     rotated values) into the caller's zeroed scratch by atomic maxima on the bit patterns, the
//     second quantizes with the finished scales.
#include <vector>
#if defined(LOWBIT_ISA_AVX2)
#include <immintrin.h>
#endif

#include "lowbit/lowprec.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_ISA_NS {

// Elements of a work item (a row segment; the width of the two-pass tiles): the buffer stays in
// L1/L2 and there are enough items to share between threads.
static const int64_t kLpSeg = 4096;
// One-pass limit for a segment (a row, or lcm(block, rotation block)): longer groups would need
// buffers beyond L2, so they take the two-pass path.
static const int64_t kLpSegMax = 16384;

template <int DT>
static void lp_load(const void* __restrict x, int64_t begin, int64_t len, float* __restrict buf) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) buf[i] = load_t<DT>(x, begin + i);
}

// fp32 src -> dst; with `stream`, non-temporal stores for the 64-byte aligned part (AVX-512;
// plain copies otherwise). Large outputs take them (LpPlan::stream): a plain store first reads
// the line it overwrites, so each element crossed memory three times (x read, the output's line
// read, then written) instead of two. Measured on the FP4 preset's three fake quants
// (bench/run.py --families nn, whose malloc tuning reuses freed memory): 11.7 -> 8.2 ms. (Where
// every call's output is fresh memory from mmap, the page faults' zeroing dominates, 32-36 ms,
// and the streamed stores cost ~10% more there.)
static inline void lp_copy_out(const float* __restrict src, float* __restrict dst, int64_t len,
                               bool stream) {
#if defined(LOWBIT_ISA_AVX512)
  if (stream) {
    int64_t i = (int64_t)(((64 - ((uintptr_t)dst & 63)) & 63) / sizeof(float));
    if ((uintptr_t)dst % sizeof(float) || i > len) i = len;  // (fp32 outputs are 4-aligned)
    memcpy(dst, src, sizeof(float) * i);
    for (; i + 16 <= len; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    memcpy(dst + i, src + i, sizeof(float) * (len - i));
    return;
  }
#endif
  (void)stream;
  memcpy(dst, src, sizeof(float) * len);
}

// Orders this thread's non-temporal stores before the results are used (end of a parallel
// region).
static inline void lp_fence() {
#if defined(LOWBIT_ISA_AVX512) || defined(LOWBIT_ISA_AVX2)
  _mm_sfence();
#endif
}

// The one cast of the result to x's dtype (nearest-even, formats.h).
template <int DT>
static void lp_store(void* __restrict out, int64_t begin, int64_t len,
                     const float* __restrict buf, bool stream) {
  if (DT == kF32) {
    lp_copy_out(buf, (float*)out + begin, len, stream);
    return;
  }
  uint16_t* __restrict o = (uint16_t*)out + begin;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i)
    o[i] = (uint16_t)(DT == kBF16 ? round_to_bf16(f32_bits(buf[i]), false, 0u)
                                  : round_to_fmt(f32_bits(buf[i]), fmt_of(DT), false, 0u));
}

// Butterfly stages h = from, 2 from, ... < to over buf[0, len) (len a multiple of `to`): pairs
// (a, c) at distance h become (a + c, a - c), in this operand order (hadamard.py's). The last
// stage also multiplies by `norm` (rounded separately, as the reference's product).
static void lp_stages(float* __restrict buf, int64_t len, int from, int to, float norm) {
  for (int h = from; h < to; h *= 2) {
    const bool last = 2 * h >= to;
    for (int64_t base = 0; base < len; base += 2 * h) {
      float* __restrict lo = buf + base;
      float* __restrict hi = buf + base + h;
      if (last) {
#pragma omp simd
        for (int j = 0; j < h; ++j) {
          const float a = lo[j], c = hi[j];
          lo[j] = lp_canonical_nan(mul_rn(a + c, norm));
          hi[j] = lp_canonical_nan(mul_rn(a - c, norm));
        }
      } else {
#pragma omp simd
        for (int j = 0; j < h; ++j) {
          const float a = lo[j], c = hi[j];
          lo[j] = a + c;
          hi[j] = a - c;
        }
      }
    }
  }
}

// Vector types for the in-register Hadamard stages: W lanes, and stage(v, h) = one butterfly
// stage of distance h < W inside a vector: each lane meets its partner lane ^ h; lanes without
// bit h hold a (sum a + c), lanes with it hold c (difference a - c).
#if defined(LOWBIT_ISA_AVX512)
#define LOWBIT_LP_VEC 1
struct LpVec {
  typedef __m512 T;
  static const int W = 16;
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, T v) { _mm512_stream_ps(p, v); }  // (p 64-byte aligned)
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T canon(T v) {  // the spec's one NaN (lowprec.h lp_canonical_nan)
    return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                              _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
  }
  // v * (+-1) + p in one fused multiply-add: the product is exact, so the one rounding gives
  // a + c and a - c bit for bit (signed zeros included; NaNs are canonicalized at the end).
  // Two instructions a stage instead of three.
  static T stage(T v, int h) {
    // the partner lanes by immediate shuffles (in-lane for h < 4, whole 128-bit lanes above),
    // cheaper than a permute by an index vector: 6.2 -> 5.5 cycles per 16 values for h = 32
    const __m512 p = h == 1 ? _mm512_permute_ps(v, 0xB1)
                   : h == 2 ? _mm512_permute_ps(v, 0x4E)
                   : h == 4 ? _mm512_shuffle_f32x4(v, v, 0xB1)
                            : _mm512_shuffle_f32x4(v, v, 0x4E);
    // -1 on the lanes with bit h (literal constants: gcc rebuilt a blend of them every stage)
    const __m512 sign =
        h == 1   ? _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1)
        : h == 2 ? _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1)
        : h == 4 ? _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1)
                 : _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    return _mm512_fmadd_ps(v, sign, p);
  }
};
#elif defined(LOWBIT_ISA_AVX2)
#define LOWBIT_LP_VEC 1
struct LpVec {
  typedef __m256 T;
  static const int W = 8;
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, T v) { _mm256_stream_ps(p, v); }  // (p 32-byte aligned)
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T canon(T v) {  // the spec's one NaN (lowprec.h lp_canonical_nan)
    return _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                            _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  static T stage(T v, int h) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i hv = _mm256_set1_epi32(h);
    const __m256 p = _mm256_permutevar8x32_ps(v, _mm256_xor_si256(lane, hv));
    const __m256 upper = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(lane, hv), hv));
    return _mm256_blendv_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), upper);
  }
};
#endif

#if defined(LOWBIT_LP_VEC)
// The stages below min(h, 64) in registers, in one pass over chunks of NV vectors: the stages
// below IN = min(h, W) by lane permutes inside each vector (plain loops would run h < W
// elements per iteration), the others between whole vectors. WHOLE: that is the whole
// transform (h <= 64), so the pass also multiplies by the norm.
// NT: non-temporal stores (dst aligned to the vector). CANON: NaN results become the canonical
// one.
template <int IN, int NV, bool WHOLE, bool NT = false, bool CANON = true>
static void lp_hadamard_pass(const float* src, float* dst, int64_t len, float norm) {
  typedef LpVec V;
  const typename V::T vn = V::set1(norm);
  for (int64_t i = 0; i < len; i += V::W * NV) {
    typename V::T v[NV];
    for (int k = 0; k < NV; ++k) {
      v[k] = V::load(src + i + V::W * k);
      for (int s = 1; s < IN; s *= 2) v[k] = V::stage(v[k], s);
    }
    for (int s = 1; s < NV; s *= 2)
      for (int k = 0; k < NV; ++k)
        if (!(k & s)) {
          const typename V::T sum = V::add(v[k], v[k + s]);
          v[k + s] = V::sub(v[k], v[k + s]);
          v[k] = sum;
        }
    for (int k = 0; k < NV; ++k) {
      const typename V::T o = !WHOLE ? v[k] : CANON ? V::canon(V::mul(v[k], vn)) : V::mul(v[k], vn);
      if (NT) V::stream(dst + i + V::W * k, o);
      else V::store(dst + i + V::W * k, o);
    }
  }
}

template <int H, bool NT, bool CANON>
static void lp_hadamard_fixed(const float* src, float* dst, int64_t len, float norm) {
  lp_hadamard_pass<(H < LpVec::W ? H : LpVec::W), (H > LpVec::W ? H / LpVec::W : 1), true, NT,
                   CANON>(src, dst, len, norm);
}

// lp_hadamard_fixed for the block h picked at run time (len a multiple of W); false, doing
// nothing, for a block above 64 (stages outside registers).
template <bool NT, bool CANON>
static bool lp_hadamard_small(const float* src, float* dst, int64_t len, int h, float norm) {
  switch (h) {
    case 2: lp_hadamard_fixed<2, NT, CANON>(src, dst, len, norm); return true;
    case 4: lp_hadamard_fixed<4, NT, CANON>(src, dst, len, norm); return true;
    case 8: lp_hadamard_fixed<8, NT, CANON>(src, dst, len, norm); return true;
    case 16: lp_hadamard_fixed<16, NT, CANON>(src, dst, len, norm); return true;
    case 32: lp_hadamard_fixed<32, NT, CANON>(src, dst, len, norm); return true;
    case 64: lp_hadamard_fixed<64, NT, CANON>(src, dst, len, norm); return true;
    default: return false;
  }
}
#endif

// The normalized block-h Hadamard transform of every length-h block of src[0, len) into dst
// (len a multiple of h; dst may be src), as lowbit.reference.hadamard.block_hadamard computes
// it: all stages in fp32, then one product with hadamard_norm(h); a NaN result is the canonical
// one.
// (`stream`: the fp32 output of a large call, written with non-temporal stores where dst is
// aligned to the vector and h <= 64, as lp_copy_out explains. !canon: values about to be
// quantized, whose NaNs need no canonical form (a NaN makes its group's scale, so its every
// output, the canonical NaN), may keep theirs: two instructions less per vector for h 16..64.)
static void lp_hadamard(const float* src, float* dst, int64_t len, int h, bool stream = false,
                        bool canon = true) {
  const float norm = hadamard_norm(h);
  (void)stream, (void)canon;
#if defined(LOWBIT_LP_VEC)
  // (h >= W: W | len, as the fixed passes need)
  if (!canon && h >= LpVec::W && lp_hadamard_small<false, false>(src, dst, len, h, norm)) return;
  if (stream && h >= LpVec::W && (uintptr_t)dst % sizeof(LpVec::T) == 0 &&
      lp_hadamard_small<true, true>(src, dst, len, h, norm))
    return;
  // W | len holds whenever h >= W, and for smaller h on all but odd-sized rows.
  if (h > 1 && len % LpVec::W == 0) {
    if (lp_hadamard_small<false, true>(src, dst, len, h, norm)) return;
    lp_hadamard_pass<LpVec::W, 64 / LpVec::W, false>(src, dst, len, norm);
    lp_stages(dst, len, 64, h, norm);
    return;
  }
#endif
  if (h == 1) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dst[i] = lp_canonical_nan(mul_rn(src[i], norm));
    return;
  }
  if (dst != src) memcpy(dst, src, sizeof(float) * len);
  lp_stages(dst, len, 1, h, norm);
}

static inline uint32_t lp_absmax_bits(const float* __restrict v, int64_t len) {
  uint32_t m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t b = abs_bits(v[i]);
    m = b > m ? b : m;
  }
  return m;  // NaN bits order above inf: a NaN anywhere gives a NaN absmax, as torch.amax
}

// Per-thread buffers for one segment.
struct LpBufs {
  std::vector<float> x;        // the values
  std::vector<float> scale;    // each element's scale
  std::vector<uint32_t> r;     // each element's Philox word (stochastic)
  std::vector<uint32_t> wide;  // stochastic float8 codes as 32-bit lanes
  std::vector<uint8_t> codes;  // codes nobody asked for (fake quant) land here
  std::vector<uint32_t> gmax;  // per block of the segment: absmax bits (lp_block_scales)
  std::vector<float> gscale;   //   its scale
  std::vector<uint8_t> gcode;  //   its e8m0 code
  const char* next = nullptr;  // the next work item's input (lp_quantize prefetches it)
  int64_t next_bytes = 0;
  LpBufs(int64_t seg, bool st, bool fp8)
      : x(seg), scale(seg), r(st ? seg : 0), wide(st && fp8 ? seg : 0), codes(seg), gmax(seg),
        gscale(seg), gcode(seg) {}
};

// Quantize b.x[k0, k0 + len) in place to its dequantized values, codes to codes[k0 ..]: element
// i with b.scale[i] (callers spread each group's scale over its elements, so one long loop serves
// every scaling) and Philox word b.r[i] (stochastic). lp_fake_quant in three loops: gcc 12
// vectorizes each of them for every format, but not the fused body for some (it cannot mix the
// masks of the uint8 code's and the fp32 value's tests), and the three run faster than any fused
// pair. Stochastic float8 codes go through 32-bit lanes (round_to_fmt then vectorizes 16 lanes
// wide, not 64 with spills: 15% faster).
template <int FMT, bool ST>
static void lp_quant_chunk(LpBufs& b, int64_t k0, int64_t len, uint8_t* __restrict codes) {
  constexpr bool kWide = (FMT == kLpE4M3 || FMT == kLpE5M2) && ST;
  const float fmax = lp_fmax(FMT);
  float* __restrict x = b.x.data() + k0;
  const float* __restrict scale = b.scale.data() + k0;
  const uint32_t* __restrict r = b.r.data() + (ST ? k0 : 0);
  uint32_t* __restrict wide = b.wide.data() + (kWide ? k0 : 0);
  codes += k0;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) x[i] = lp_scaled(x[i], scale[i], fmax);
  if (kWide) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) wide[i] = lp_encode(x[i], FMT, ST, ST ? r[i] : 0u);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const uint8_t c = (uint8_t)wide[i];
      codes[i] = c;
      x[i] = lp_dequant(c, scale[i], FMT);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) codes[i] = lp_encode(x[i], FMT, ST, ST ? r[i] : 0u);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) x[i] = lp_dequant(codes[i], scale[i], FMT);
}

// One element of fake quantization without a code, for a group scale s > 0 (finite): x / s
// clamped to the format's range, onto the grid straight from the fp32 bits (lp_grid_nearest, or
// lp_grid_stochastic with Philox word r: integer formats and E2M1), times s — lp_dequant of
// lp_encode, bit for bit. With an e8m0 scale (inv = lp_e8m0_inverse(s)) the division is the
// exact product with the inverse, and no clamp is needed: s is a power of two >= absmax /
// FMT_MAX and the product is exact (or underflows towards 0), so |y| <= FMT_MAX already.
template <int FMT, bool E8, bool ST>
static inline float lp_fake_value(float x, float s, float inv, uint32_t r) {
  const float fmax = lp_fmax(FMT);
  float y;
  if (E8) {
    y = mul_rn(x, inv);
  } else {
    y = div_rn(x, s);
    y = y > fmax ? fmax : y;
    y = y < -fmax ? -fmax : y;
  }
  return mul_rn(ST ? lp_grid_stochastic(y, FMT, r) : lp_grid_nearest(y, FMT), s);
}

// lp_quant_chunk for fake quantization with nearest rounding, when nobody asked for the codes:
// one loop straight to the dequantized values (lp_fake_value), 1.5-2x faster than the three
// loops; with e8m0 scales another 1.3-1.8x for e2m1 (no division).
template <int FMT, bool E8>
static void lp_fake_chunk(LpBufs& b, int64_t k0, int64_t len, uint8_t*) {
  float* __restrict x = b.x.data() + k0;
  const float* __restrict scale = b.scale.data() + k0;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float s = scale[i];
    const float v = lp_fake_value<FMT, E8, false>(x[i], s, E8 ? lp_e8m0_inverse(s) : 0.0f, 0u);
    // a non-finite group: its NaN scale, as lp_dequant; an all-zero group (s = 0): +0, as
    // lp_scaled then lp_dequant give
    x[i] = s != s ? s : (s > 0.0f ? v : 0.0f);
  }
}

typedef void (*LpQuantFn)(LpBufs&, int64_t, int64_t, uint8_t*);

// fake: nearest rounding and no codes wanted; e8: e8m0 scales
static LpQuantFn lp_quant_fn(int fmt, bool st, bool fake, bool e8) {
#define LOWBIT_LP_FN(F)                                                         \
  return fake ? (e8 ? lp_fake_chunk<F, true> : lp_fake_chunk<F, false>)        \
              : (st ? lp_quant_chunk<F, true> : lp_quant_chunk<F, false>)
  switch (fmt) {
    case kLpInt8: LOWBIT_LP_FN(kLpInt8);
    case kLpInt4: LOWBIT_LP_FN(kLpInt4);
    case kLpE4M3: LOWBIT_LP_FN(kLpE4M3);
    case kLpE5M2: LOWBIT_LP_FN(kLpE5M2);
    default: LOWBIT_LP_FN(kLpE2M1);
  }
#undef LOWBIT_LP_FN
}

// Spread a group's scale over its elements k .. k + n of the segment.
static inline void lp_fill(LpBufs& b, int64_t k, int64_t n, float s) {
  float* __restrict v = b.scale.data() + k;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = s;
}

// The Philox words of elements index0 .. index0 + len - 1 (index = offset + row-major position):
// element i takes word i % 4 of counter i / 4 (philox.h philox_word_of), the optimizer
// write-back's stream, so one Philox evaluation serves four elements (a word 0 per element cost
// four). fill_philox4 must start at a multiple of 4, a segment starts anywhere (offset + r * cols
// + c0): the up to 3 elements before the next multiple of 4 take their words from one scalar
// evaluation of their counter, fill_philox4 writes the rest from out + head on (out holds len
// words; nothing is written past them).
static void lp_fill_philox(uint64_t seed, uint64_t index0, int64_t len, uint32_t* out) {
  int64_t head = (int64_t)((4u - (uint32_t)(index0 & 3u)) & 3u);
  head = head < len ? head : len;
  if (head) {
    const Philox4 w = philox4x32_10(seed, index0 >> 2);
    for (int64_t i = 0; i < head; ++i) out[i] = w.w[(index0 + (uint64_t)i) & 3u];
  }
  if (len > head) fill_philox4(seed, index0 + (uint64_t)head, len - head, out + head);
}

// What one call does, decided once.
struct LpPlan;
typedef void (*LpFakeSegFn)(const LowprecArgs&, const LpPlan&, LpBufs&, int64_t, int64_t,
                            int64_t);

struct LpPlan {
  int64_t seg;     // row segment length of a work item (a multiple of the rotation block)
  int64_t nb;      // blocks per row (block scaling)
  int had;         // rotation block, 0 for none
  LpQuantFn quant;
  LpFakeSegFn fake_seg;  // the one-pass path's fake quant when no codes are wanted, or null
  bool stream;           // a large output: fp32 values go out by non-temporal stores (lp_copy_out)
};

static inline void lp_store_scale(const LowprecArgs& a, int64_t g, float s, uint8_t e8) {
  if (a.e8m0) ((uint8_t*)a.scales)[g] = e8;
  else ((float*)a.scales)[g] = s;
}

// Calls f(k, n, g) for every group g of row r that meets the segment [c0, c0 + len): its
// elements k .. k + n of the segment (not for column scaling, whose groups are single elements).
template <typename F>
static inline void lp_for_groups(const LowprecArgs& a, const LpPlan& p, int64_t r, int64_t c0,
                                 int64_t len, F f) {
  if (a.scaling == kLpRow) {
    f(0, len, r);
  } else if (a.scaling == kLpTensor) {
    f(0, len, 0);
  } else {
    // (one division per segment: a division per group would chain its latency through the
    // loop, a quarter of the time of blocks of 32)
    const int64_t b0 = c0 / a.block;
    int64_t k = 0, end = (b0 + 1) * a.block - c0;
    for (int64_t g = r * p.nb + b0; k < len; ++g, k = end, end += a.block)
      f(k, (end < len ? end : len) - k, g);
  }
}

// Block scaling in the one-pass path: the scales of the segment's blocks (whole blocks, the
// first at c0) from the values in b.x, stored and spread over the elements. In three loops —
// every block's absmax, then every scale at once (vectorized: fp32 scales divide, e8m0 codes
// come from lp_e8m0_code's integer form of lp_scale), then the stores and the spreading —
// rather than block by block, where each block's scalar scale math and short loops cost ~30
// cycles: 3 ms of 10 for blocks of 32 on 4096 x 4096.
// (`buf`: the segment's values, b.x or, unrotated fp32, x itself; `spread`: also fill b.scale)
static void lp_block_scales(const LowprecArgs& a, const LpPlan& p, LpBufs& b, int64_t r,
                            int64_t c0, int64_t len, const float* buf, bool spread) {
  const int64_t B = a.block, ng = (len + B - 1) / B, g0 = r * p.nb + c0 / B;
  uint32_t* __restrict am = b.gmax.data();
  float* __restrict gs = b.gscale.data();
  for (int64_t j = 0; j < ng; ++j) {
    const int64_t k = j * B;
    am[j] = lp_absmax_bits(buf + k, len - k < B ? len - k : B);
  }
  if (a.e8m0) {
    uint8_t* __restrict gc = b.gcode.data();
    const int fmt = a.fmt;
#pragma omp simd
    for (int64_t j = 0; j < ng; ++j) {
      const uint32_t c = lp_e8m0_code(am[j], fmt);
      gc[j] = (uint8_t)c;
      gs[j] = e8m0_to_f32((uint8_t)c);
    }
    memcpy((uint8_t*)a.scales + g0, gc, (size_t)ng);
  } else {
    const float fmax = lp_fmax(a.fmt);
#pragma omp simd
    for (int64_t j = 0; j < ng; ++j)  // lp_scale's fp32 branch
      gs[j] = am[j] < 0x7F800000u ? div_rn(bits_f32(am[j]), fmax) : bits_f32(0x7FC00000u);
    memcpy((float*)a.scales + g0, gs, sizeof(float) * (size_t)ng);
  }
  if (!spread) return;
  for (int64_t j = 0; j < ng; ++j) {
    const int64_t k = j * B;
    lp_fill(b, k, len - k < B ? len - k : B, gs[j]);
  }
}

// Load row r's segment [c0, c0 + len) into buf, rotated when p.had (an fp32 x straight from x;
// NaNs canonical only for the rotation alone, fmt -1: quantization makes them so).
template <int DT>
static inline void lp_fetch(const LowprecArgs& a, const LpPlan& p, int64_t r, int64_t c0,
                            int64_t len, float* buf) {
  const int64_t e0 = r * a.cols + c0;
  if (DT == kF32 && p.had) {
    lp_hadamard((const float*)a.x + e0, buf, len, p.had, false, a.fmt < 0);
    return;
  }
  lp_load<DT>(a.x, e0, len, buf);
  if (p.had) lp_hadamard(buf, buf, len, p.had, false, a.fmt < 0);
}

// Store the segment: dequantized and rotated back (fake quant), or as rotated (fmt -1). An fp32
// output rotated in one pass (blocks up to 64) is written by the rotation itself.
template <int DT>
static inline void lp_finish(const LowprecArgs& a, const LpPlan& p, int64_t r, int64_t c0,
                             int64_t len, float* buf) {
  if (!a.out) return;
  const int64_t e0 = r * a.cols + c0;
  if (p.had && a.fmt >= 0) {
    if (DT == kF32 && p.had <= 64) {
      lp_hadamard(buf, (float*)a.out + e0, len, p.had, p.stream);
      return;
    }
    lp_hadamard(buf, buf, len, p.had);
  }
  lp_store<DT>(a.out, e0, len, buf, p.stream);
}

// Point b.next at row r's segment [c0, c0 + len) of x (none if r is past the end).
static inline void lp_next(const LowprecArgs& a, LpBufs& b, int64_t r, int64_t c0, int64_t len) {
  const int64_t esz = a.dtype == kF32 ? 4 : 2;
  b.next = r < a.rows ? (const char*)a.x + (r * a.cols + c0) * esz : nullptr;
  b.next_bytes = len * esz;
}

// Quantize the segment in b.x (scales spread, Philox words drawn) and store it, chunk by chunk:
// before each chunk a share of the next work item's input is prefetched into L2, and after it
// the chunk is rotated back and stored when it holds whole rotation blocks. So the kernel reads
// and writes memory while it computes, not in bursts between (a burst of prefetches would only
// queue behind the few line fill buffers; stores at the end of a segment stall on the output's
// page faults): 15-25% faster on 4096 x 4096 than quantize-all-then-store.
template <int DT>
static void lp_quantize(const LowprecArgs& a, const LpPlan& p, LpBufs& b, int64_t r, int64_t c0,
                        int64_t len) {
  const int64_t chunk = 512, nchunks = (len + chunk - 1) / chunk;  // (a multiple of had <= 512)
  const bool per_chunk = p.had <= chunk;
  uint8_t* codes = a.codes ? a.codes + r * a.cols + c0 : b.codes.data();
  for (int64_t k = 0, c = 0; k < len; k += chunk, ++c) {
    if (b.next) {
      const int64_t lo = b.next_bytes * c / nchunks, hi = b.next_bytes * (c + 1) / nchunks;
      for (int64_t o = lo & ~(int64_t)63; o < hi; o += 64) __builtin_prefetch(b.next + o, 0, 2);
    }
    const int64_t n = len - k < chunk ? len - k : chunk;
    p.quant(b, k, n, codes);
    if (per_chunk) lp_finish<DT>(a, p, r, c0 + k, n, b.x.data() + k);
  }
  if (!per_chunk) lp_finish<DT>(a, p, r, c0, len, b.x.data());
}

// Fake quantization of n values with the one scale s, src -> dst (may be the same), element i
// stochastic with Philox word r[i] when ST (lp_grid_stochastic: 2.5x faster in this loop than
// encoding and decoding): lp_fake_chunk's arithmetic with the scale's cases decided once.
template <int FMT, bool E8, bool ST>
static inline void lp_fake_run(const float* src, float* dst, int64_t n, float s,
                               const uint32_t* __restrict r) {
  if (!(s > 0.0f)) {  // NaN: a non-finite group (lp_dequant's NaN scale); 0: an all-zero group
    const float v = s != s ? s : 0.0f;
    for (int64_t i = 0; i < n; ++i) dst[i] = v;
    return;
  }
  const float inv = E8 ? lp_e8m0_inverse(s) : 0.0f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    dst[i] = lp_fake_value<FMT, E8, ST>(src[i], s, inv, ST ? r[i] : 0u);
}

// The one-pass path's fake quantization when no codes are wanted: the segment's scales (and
// Philox words), then group by group with the scale in a register (no per-element scale
// array), in chunks of 512 that prefetch the next item and store (rotated back) as they go, as
// lp_quantize. An unrotated fp32 x is read and written in place of the buffer: x -> out.
template <int DT, int FMT, bool E8, bool ST>
static void lp_fake_segment(const LowprecArgs& a, const LpPlan& p, LpBufs& b, int64_t r,
                            int64_t c0, int64_t len) {
  const bool direct = DT == kF32 && !p.had;
  const int64_t e0 = r * a.cols + c0;
  float* buf = b.x.data();
  const float* src = direct ? (const float*)a.x + e0 : buf;
  // (a large direct output goes through buf, chunk by chunk, to be streamed out)
  float* dst = direct && !p.stream ? (float*)a.out + e0 : buf;
  if (!direct) lp_fetch<DT>(a, p, r, c0, len, buf);
  if (ST) lp_fill_philox(a.seed, a.offset + (uint64_t)e0, len, b.r.data());
  const int64_t B = a.scaling == kLpBlock ? a.block : len;
  if (a.scaling == kLpBlock) {
    lp_block_scales(a, p, b, r, c0, len, src, false);
  } else {  // row scaling (tensor scaling takes the two-pass path): one group
    uint8_t e8 = 0;
    const float s = lp_scale(bits_f32(lp_absmax_bits(src, len)), a.fmt, a.e8m0, &e8);
    lp_store_scale(a, r, s, e8);
    b.gscale[0] = s;
  }
  const float* gs = b.gscale.data();
  const int64_t chunk = 512, nchunks = (len + chunk - 1) / chunk;  // (a multiple of had <= 512)
  const bool per_chunk = !direct && p.had <= chunk;
  int64_t k = 0, j = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    if (b.next) {
      const int64_t lo = b.next_bytes * c / nchunks, hi = b.next_bytes * (c + 1) / nchunks;
      for (int64_t o = lo & ~(int64_t)63; o < hi; o += 64) __builtin_prefetch(b.next + o, 0, 2);
    }
    const int64_t end = (c + 1) * chunk < len ? (c + 1) * chunk : len;
    while (k < end) {  // the part of group j inside this chunk
      const int64_t gend = (j + 1) * B < len ? (j + 1) * B : len;
      const int64_t pend = gend < end ? gend : end;
      lp_fake_run<FMT, E8, ST>(src + k, dst + k, pend - k, gs[j], b.r.data() + (ST ? k : 0));
      k = pend;
      if (k == gend) ++j;
    }
    if (direct && p.stream)
      lp_copy_out(buf + c * chunk, (float*)a.out + e0 + c * chunk, end - c * chunk, true);
    if (per_chunk) lp_finish<DT>(a, p, r, c0 + c * chunk, end - c * chunk, buf + c * chunk);
  }
  if (!direct && !per_chunk) lp_finish<DT>(a, p, r, c0, len, buf);
}

// (null for stochastic float8, which keeps lp_quant_chunk: round_to_fmt in one loop with the
// scale in a register does not vectorize)
template <int DT>
static LpFakeSegFn lp_fake_seg_fn(int fmt, bool e8, bool st) {
#define LOWBIT_LP_FN(F, S) \
  return e8 ? lp_fake_segment<DT, F, true, S> : lp_fake_segment<DT, F, false, S>
  if (st) {
    switch (fmt) {
      case kLpInt8: LOWBIT_LP_FN(kLpInt8, true);
      case kLpInt4: LOWBIT_LP_FN(kLpInt4, true);
      case kLpE2M1: LOWBIT_LP_FN(kLpE2M1, true);
      default: return nullptr;
    }
  }
  switch (fmt) {
    case kLpInt8: LOWBIT_LP_FN(kLpInt8, false);
    case kLpInt4: LOWBIT_LP_FN(kLpInt4, false);
    case kLpE4M3: LOWBIT_LP_FN(kLpE4M3, false);
    case kLpE5M2: LOWBIT_LP_FN(kLpE5M2, false);
    default: LOWBIT_LP_FN(kLpE2M1, false);
  }
#undef LOWBIT_LP_FN
}

// The one-pass path: every work item is a segment holding whole groups (or no quantization).
template <int DT>
static void lp_one_pass(const LowprecArgs& a, const LpPlan& p) {
  const int64_t per_row = (a.cols + p.seg - 1) / p.seg;
  const int64_t items = a.rows * per_row;
#pragma omp parallel if (a.rows * a.cols >= kParallelMin)
  {
    LpBufs b(p.seg, a.stochastic, a.fmt == kLpE4M3 || a.fmt == kLpE5M2);
#pragma omp for schedule(static)
    for (int64_t w = 0; w < items; ++w) {
      const int64_t r = w / per_row, c0 = (w % per_row) * p.seg;
      const int64_t len = a.cols - c0 < p.seg ? a.cols - c0 : p.seg;
      float* buf = b.x.data();
      const int64_t cn = c0 + p.seg < a.cols ? c0 + p.seg : 0;  // the next item
      lp_next(a, b, cn ? r : r + 1, cn, a.cols - cn < p.seg ? a.cols - cn : p.seg);
      if (a.fmt < 0) {  // the rotation alone: straight from x into out when it can
        if (DT == kF32) {
          const int64_t e0 = r * a.cols + c0;
          lp_hadamard((const float*)a.x + e0, (float*)a.out + e0, len, p.had, p.stream);
        } else {
          lp_fetch<DT>(a, p, r, c0, len, buf);
          lp_finish<DT>(a, p, r, c0, len, buf);
        }
        continue;
      }
      if (p.fake_seg) {
        p.fake_seg(a, p, b, r, c0, len);
        continue;
      }
      lp_fetch<DT>(a, p, r, c0, len, buf);
      if (a.stochastic)
        lp_fill_philox(a.seed, a.offset + (uint64_t)(r * a.cols + c0), len, b.r.data());
      if (a.scaling == kLpBlock) {
        lp_block_scales(a, p, b, r, c0, len, buf, true);
      } else {
        lp_for_groups(a, p, r, c0, len, [&](int64_t k, int64_t n, int64_t g) {
          uint8_t e8 = 0;
          const float s = lp_scale(bits_f32(lp_absmax_bits(buf + k, n)), a.fmt, a.e8m0, &e8);
          lp_store_scale(a, g, s, e8);
          lp_fill(b, k, n, s);
        });
      }
      lp_quantize<DT>(a, p, b, r, c0, len);
    }
    lp_fence();
  }
}

// Atomic maximum of a group's absmax bits (non-negative floats order like their bit patterns).
static inline void lp_atomic_max(uint32_t* slot, uint32_t v) {
  uint32_t cur = __atomic_load_n(slot, __ATOMIC_RELAXED);
  while (v > cur &&
         !__atomic_compare_exchange_n(slot, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// The two-pass path (column and tensor scaling; block and row scaling whose groups do not fit a
// segment). Tiles of `tr` rows x one segment of columns; the scratch holds one uint32 per group:
// absmax bits after the first pass, then the fp32 scale's bits.
template <int DT>
static void lp_two_pass(const LowprecArgs& a, const LpPlan& p) {
  uint32_t* scratch = (uint32_t*)a.absmax;
  const int64_t per_row = (a.cols + p.seg - 1) / p.seg;
  // Column scaling reduces a tile's rows locally, then one atomic per column: tall tiles.
  const int64_t tr = a.scaling == kLpColumn ? (65536 / p.seg > 1 ? 65536 / p.seg : 1) : 1;
  const int64_t row_tiles = (a.rows + tr - 1) / tr;
  const int64_t tiles = row_tiles * per_row;
  const int64_t ngroups = a.scaling == kLpColumn ? a.cols
                        : a.scaling == kLpTensor ? 1
                        : a.scaling == kLpRow ? a.rows : a.rows * p.nb;
  const bool parallel = a.rows * a.cols >= kParallelMin;
#pragma omp parallel if (parallel)
  {
    LpBufs b(p.seg, a.stochastic, a.fmt == kLpE4M3 || a.fmt == kLpE5M2);
    std::vector<uint32_t> colmax(a.scaling == kLpColumn ? p.seg : 0);
    float* buf = b.x.data();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = (t / per_row) * tr, c0 = (t % per_row) * p.seg;
      const int64_t r1 = r0 + tr < a.rows ? r0 + tr : a.rows;
      const int64_t len = a.cols - c0 < p.seg ? a.cols - c0 : p.seg;
      if (a.scaling == kLpColumn) {
        uint32_t* __restrict cm = colmax.data();
        for (int64_t j = 0; j < len; ++j) cm[j] = 0;
        for (int64_t r = r0; r < r1; ++r) {
          lp_fetch<DT>(a, p, r, c0, len, buf);
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) {
            const uint32_t v = abs_bits(buf[j]);
            cm[j] = v > cm[j] ? v : cm[j];
          }
        }
        for (int64_t j = 0; j < len; ++j)
          if (cm[j]) lp_atomic_max(scratch + c0 + j, cm[j]);
        continue;
      }
      for (int64_t r = r0; r < r1; ++r) {
        lp_fetch<DT>(a, p, r, c0, len, buf);
        lp_for_groups(a, p, r, c0, len, [&](int64_t k, int64_t n, int64_t g) {
          const uint32_t m = lp_absmax_bits(buf + k, n);
          if (m) lp_atomic_max(scratch + g, m);
        });
      }
    }
    // (the implicit barrier: every absmax is complete)
#pragma omp for schedule(static)
    for (int64_t g = 0; g < ngroups; ++g) {
      uint8_t e8 = 0;
      const float s = lp_scale(bits_f32(scratch[g]), a.fmt, a.e8m0, &e8);
      lp_store_scale(a, g, s, e8);
      scratch[g] = f32_bits(s);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = (t / per_row) * tr, c0 = (t % per_row) * p.seg;
      const int64_t r1 = r0 + tr < a.rows ? r0 + tr : a.rows;
      const int64_t len = a.cols - c0 < p.seg ? a.cols - c0 : p.seg;
      for (int64_t r = r0; r < r1; ++r) {
        if (r + 1 < r1) {
          lp_next(a, b, r + 1, c0, len);
        } else {  // the next tile's first row
          const int64_t rn = ((t + 1) / per_row) * tr, cn = ((t + 1) % per_row) * p.seg;
          lp_next(a, b, t + 1 < tiles ? rn : a.rows, cn, a.cols - cn < p.seg ? a.cols - cn : p.seg);
        }
        lp_fetch<DT>(a, p, r, c0, len, buf);
        const int64_t e0 = r * a.cols + c0;
        if (a.stochastic) lp_fill_philox(a.seed, a.offset + (uint64_t)e0, len, b.r.data());
        if (a.scaling == kLpColumn) {
          float* __restrict sc = b.scale.data();
          const uint32_t* __restrict bits = scratch + c0;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) sc[j] = bits_f32(bits[j]);
        } else {
          lp_for_groups(a, p, r, c0, len, [&](int64_t k, int64_t n, int64_t g) {
            lp_fill(b, k, n, bits_f32(scratch[g]));
          });
        }
        lp_quantize<DT>(a, p, b, r, c0, len);
      }
    }
    lp_fence();
  }
}

static int64_t lp_gcd(int64_t u, int64_t v) {
  while (v) {
    const int64_t t = u % v;
    u = v;
    v = t;
  }
  return u;
}

template <int DT>
static void lp_all(const LowprecArgs& a) {
  if (a.rows <= 0 || a.cols <= 0) return;
  LpPlan p{};
  p.had = a.had;
  p.stream = a.rows * a.cols >= kStreamMin;
  const int64_t unit_had = a.had > 0 ? a.had : 1;
  p.seg = a.cols < kLpSeg ? a.cols : (kLpSeg / unit_had) * unit_had;  // had <= 4096 = kLpSeg
  if (a.fmt < 0) {
    lp_one_pass<DT>(a, p);
    return;
  }
  p.nb = a.scaling == kLpBlock ? (a.cols + a.block - 1) / a.block : 0;
  const bool fake = !a.stochastic && !a.codes;  // nearest rounding, no codes wanted
  p.quant = lp_quant_fn(a.fmt, a.stochastic, fake, a.e8m0);
  if (a.scaling == kLpBlock) {
    // segments hold whole blocks and whole rotation blocks
    const int64_t unit = a.block / lp_gcd(a.block, unit_had) * unit_had;
    if (unit <= kLpSegMax) {
      if (a.cols > unit) p.seg = unit * (kLpSeg / unit > 1 ? kLpSeg / unit : 1);
      else p.seg = a.cols;
      if (!a.codes) p.fake_seg = lp_fake_seg_fn<DT>(a.fmt, a.e8m0, a.stochastic);
      lp_one_pass<DT>(a, p);
      return;
    }
  } else if (a.scaling == kLpRow && a.cols <= kLpSegMax) {
    p.seg = a.cols;
    if (!a.codes) p.fake_seg = lp_fake_seg_fn<DT>(a.fmt, a.e8m0, a.stochastic);
    lp_one_pass<DT>(a, p);
    return;
  }
  lp_two_pass<DT>(a, p);
}

void lowprec(const LowprecArgs& a) {
  if (a.dtype == kBF16) lp_all<kBF16>(a);
  else if (a.dtype == kF16) lp_all<kF16>(a);
  else lp_all<kF32>(a);
}

}  // namespace LOWBIT_ISA_NS
}  // namespace cpu
}  // namespace lowbit
