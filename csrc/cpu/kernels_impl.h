// Kernel bodies shared by the per-ISA translation units. Included once per ISA inside
// `namespace lowbit::cpu::LOWBIT_ISA_NS`, after that file's `#pragma GCC target`, so the same
// source is vectorized for AVX-512, AVX2 or plain x86-64. The per-element math comes from
// csrc/include/lowbit/*.h, the headers the CUDA kernels use too.
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#if defined(LOWBIT_ISA_AVX512)
#include <immintrin.h>
#endif
#include "lowbit/formats.h"
#include "lowbit/philox.h"
#include "lowbit/quant.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_ISA_NS {

// Below this many elements a call runs on the calling thread: waking the OpenMP team costs more
// than the work, and far more when the other core is busy.
static const int64_t kParallelMin = 1 << 16;
// From this many elements on, outputs are written with non-temporal stores where aligned.
static const int64_t kStreamMin = 1 << 20;
// How far ahead the long streaming loops (the optimizer step, the gradient statistics) prefetch
// their inputs, in bytes of the widest stream. Their bodies are long enough that the out-of-order
// window reaches only a few dozen cache lines ahead: too few to hide the latency of memory (or
// of an L3 shared with other tenants), so without it they ran at a fraction of the bandwidth a
// plain sum reaches (2^24 fp32 gradients, 2 threads: statistics 2.3 -> 1.5 ms, AdamW8bit's step
// kernel 14.2 -> 10.5 ms). 1024 and 2048 measured alike; 4096 was worse.
static const int64_t kPrefetchAhead = 1024;

template <int DT>
static inline float load_t(const void* p, int64_t i) {
  if (DT == kBF16) return bf16_to_f32(((const uint16_t*)p)[i]);
  if (DT == kF16) return f16_to_f32(((const uint16_t*)p)[i]);
  return ((const float*)p)[i];
}

template <int DT>
static inline float block_absmax(const void* x, int64_t begin, int64_t len) {
  uint32_t m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t v = abs_bits(load_t<DT>(x, begin + i));
    m = v > m ? v : m;
  }
  return bits_f32(m);
}

// Nearest index for a 16-entry codebook: count the 15 midpoints below y (no table, no gather).
static inline int nearest16(float y, const float* mids) {
  int idx = 0;
  for (int k = 0; k < 15; ++k) idx += mids[k] < y ? 1 : 0;
  return idx;
}

static inline int nearest256(float y, const float* mids, const NearestLut& lut) {
  const int32_t e = lut.table[f32_bits(y) >> 16];
  const int base = e & 0xFFFF, inside = (int)((uint32_t)e >> 16);
  int idx = base;
  for (int j = 0; j < lut.max_inside; ++j) idx += (j < inside && mids[base + j] < y) ? 1 : 0;
  return idx;
}

// The hot loops take __restrict locals: the uint8 output may alias anything as far as the
// compiler knows, and without the promise it refuses to vectorize the table lookups.
template <int DT>
static void nearest16_run(const void* __restrict x, int64_t begin, int64_t len, float inv,
                          const float* __restrict mids, uint8_t* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i)
    out[i] = (uint8_t)nearest16(scale_to_unit(load_t<DT>(x, begin + i), inv), mids);
}

// Every built-in 256-entry codebook has at most one midpoint per table bucket: one table load
// and at most one comparison per element.
template <int DT>
static void nearest256_run(const void* __restrict x, int64_t begin, int64_t len, float inv,
                           const int32_t* __restrict table, const float* __restrict mids,
                           uint8_t* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float y = scale_to_unit(load_t<DT>(x, begin + i), inv);
    const int32_t e = table[f32_bits(y) >> 16];
    const int base = e & 0xFFFF;
    // Unconditional (clamped) load so the loop has no control flow; `inside` masks it.
    const float m = mids[base < 254 ? base : 254];
    const int step = ((e >> 16) > 0) & (m < y);
    out[i] = (uint8_t)(base + step);
  }
}

// Philox words for `len` consecutive counters starting at counter0 (element i gets counter0 + i).
// Drawn into a small buffer first, so the rounding loops that consume them stay simple.
#if defined(LOWBIT_ISA_AVX512)
#include <immintrin.h>
// Philox4x32-10 of 32 consecutive counters base .. base + 31, in four groups of eight held in
// 64-bit lanes (the low 32 bits carry each word): one vpmuludq then yields a whole 32x32->64
// product, whose high half is one shift away and whose low half is the lane itself (the upper
// bits that ride along are never read: vpmuludq takes the low 32 bits, the outputs mask them).
// Four independent groups keep the multiplier busy through each round's multiply-shift-xor
// latency chain. (1.9x the speed of 16 counters in 32-bit lanes, whose products took two
// multiplies, shifts and blends each.) c0..c3[g]: counter base + 8g + lane's four words.
static inline void philox32(uint64_t seed, uint64_t base, __m512i c0[4], __m512i c1[4],
                            __m512i c2[4], __m512i c3[4]) {
  const __m512i first = _mm512_add_epi64(_mm512_set1_epi64((long long)base),
                                         _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  for (int g = 0; g < 4; ++g) {
    const __m512i c = _mm512_add_epi64(first, _mm512_set1_epi64(8 * g));  // carries included
    c0[g] = c;
    c1[g] = _mm512_srli_epi64(c, 32);
    c2[g] = c3[g] = _mm512_setzero_si512();
  }
  const __m512i ma = _mm512_set1_epi64(0xD2511F53u), mb = _mm512_set1_epi64(0xCD9E8D57u);
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m512i vk0 = _mm512_set1_epi64(k0), vk1 = _mm512_set1_epi64(k1);
    for (int g = 0; g < 4; ++g) {
      const __m512i pb = _mm512_mul_epu32(c2[g], mb), pa = _mm512_mul_epu32(c0[g], ma);
      c0[g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[g], vk0, 0x96);  // xor3
      c2[g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[g], vk1, 0x96);
      c1[g] = pb;
      c3[g] = pa;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The lanes of a 16-lane vector among `remaining` (> 0) elements.
static inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1u);
}

// Stores the first n words of v at out (none when n <= 0). (Whole vectors by a plain store: a
// masked one made the Philox fill 40% slower on a Zen 5.)
static inline void store_words(uint32_t* out, int64_t n, __m512i v) {
  if (n >= 16) _mm512_storeu_si512(out, v);
  else if (n > 0) _mm512_mask_storeu_epi32(out, tail_mask(n), v);
}

// Word 0 of counters counter0 .. counter0 + len - 1 (philox_word0).
static void fill_philox(uint64_t seed, uint64_t counter0, int64_t len, uint32_t* out) {
  // the low halves of two groups' 64-bit lanes, in counter order
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t i = 0; i < len; i += 32) {
    __m512i c0[4], c1[4], c2[4], c3[4];
    philox32(seed, counter0 + (uint64_t)i, c0, c1, c2, c3);
    store_words(out + i, len - i, _mm512_permutex2var_epi32(c0[0], even, c0[1]));
    store_words(out + i + 16, len - i - 16, _mm512_permutex2var_epi32(c0[2], even, c0[3]));
  }
}

// philox_word_of (philox.h) for indices index0 .. index0+len-1, index0 a multiple of 4: all four
// words of each counter, so that out[4k + j] = word j of counter index0/4 + k.
static void fill_philox4(uint64_t seed, uint64_t index0, int64_t len, uint32_t* out) {
  const __m512i lo32 = _mm512_set1_epi64(0xFFFFFFFFll);
  const __m512i first = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);   // counters 0..3
  const __m512i second = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);  // counters 4..7
  for (int64_t i = 0; i < len; i += 128) {
    __m512i c0[4], c1[4], c2[4], c3[4];
    philox32(seed, (index0 + (uint64_t)i) >> 2, c0, c1, c2, c3);
    for (int g = 0; g < 4; ++g) {
      // per counter, words (0, 1) and (2, 3) as 64-bit pairs, then interleaved counter by counter
      // ((a & lo32) | b << 32: ternary-logic truth table 0xEA)
      const __m512i w01 =
          _mm512_ternarylogic_epi64(lo32, c0[g], _mm512_slli_epi64(c1[g], 32), 0xEA);
      const __m512i w23 =
          _mm512_ternarylogic_epi64(lo32, c2[g], _mm512_slli_epi64(c3[g], 32), 0xEA);
      const int64_t at = i + 32 * g;
      store_words(out + at, len - at, _mm512_permutex2var_epi64(w01, first, w23));
      store_words(out + at + 16, len - at - 16, _mm512_permutex2var_epi64(w01, second, w23));
    }
  }
}
#else
static void fill_philox(uint64_t seed, uint64_t counter0, int64_t len, uint32_t* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[i] = philox_word0(seed, counter0 + (uint64_t)i);
}

static void fill_philox4(uint64_t seed, uint64_t index0, int64_t len, uint32_t* __restrict out) {
  const int64_t ncounters = (len + 3) / 4;
#pragma omp simd
  for (int64_t k = 0; k < ncounters; ++k) {
    const Philox4 r = philox4x32_10(seed, (index0 >> 2) + (uint64_t)k);
    for (int j = 0; j < 4; ++j)
      if (4 * k + j < len) out[4 * k + j] = r.w[j];
  }
}
#endif

// Code of element k of a state: one byte each, or 4-bit pairs with element 2j in the high nibble.
template <int NCODE>
static inline int code_at(const uint8_t* codes, int64_t k) {
  if (NCODE != 16) return codes[k];
  const uint8_t byte = codes[k >> 1];
  return (k & 1) ? (byte & 0xF) : (byte >> 4);
}

// One index per element -> the block's codes: bytes as they are, or 4-bit pairs (element 2j in
// the high nibble; an odd tail's missing partner is a 0 nibble).
static void pack_codes(const uint8_t* __restrict idx, int64_t len, int ncode,
                       uint8_t* __restrict out) {
  if (ncode == 16) {
    const int64_t pairs = len / 2;
#pragma omp simd
    for (int64_t j = 0; j < pairs; ++j) out[j] = (uint8_t)((idx[2 * j] << 4) | idx[2 * j + 1]);
    if (len & 1) out[pairs] = (uint8_t)(idx[len - 1] << 4);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = idx[i];
  }
}

// stochastic_index (quant.h) with the binary search unrolled to log2(N) fixed steps, so the
// loop vectorizes (gathers from the codebook); same result: count of code[k] <= y.
template <int N>
static inline int count_le_fixed(float y, const float* __restrict code) {
  const int log2n = N == 16 ? 4 : 8;
  int pos = 0;
#pragma GCC unroll 8
  for (int k = log2n - 1; k >= 0; --k) pos += (code[pos + (1 << k) - 1] <= y) ? (1 << k) : 0;
  return pos + (code[pos] <= y ? 1 : 0);
}

template <int DT, int N>
static void stochastic_run(const void* __restrict x, int64_t begin, int64_t len, float inv,
                           const float* __restrict code, uint64_t seed, uint64_t offset,
                           uint8_t* __restrict out) {
  uint32_t rbuf[4096];  // blocks are at most 4096 elements
  fill_philox(seed, offset + (uint64_t)begin, len, rbuf);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float y = scale_to_unit(load_t<DT>(x, begin + i), inv);
    const uint32_t r = rbuf[i];
    int lo = count_le_fixed<N>(y, code) - 1;
    lo = lo < 0 ? 0 : (lo > N - 2 ? N - 2 : lo);
    const float p = div_rn(y - code[lo], code[lo + 1] - code[lo]);
    out[i] = (uint8_t)(uniform24(r) < p ? lo + 1 : lo);
  }
}

#if defined(LOWBIT_ISA_AVX512)
// Hand-written AVX-512 versions of the two nearest-code loops (gcc's own vectorization of them
// is several times slower). Same results as the scalar definitions above, lane by lane: one
// rounded product, comparisons are ordered (false for NaN), tails are masked.
// Full vectors use plain loads and stores; only a block's tail pays for masking.
template <int DT>
static inline __m512 load16(const void* x, int64_t i, __mmask16 m) {
  if (DT == kF32)
    return m == 0xFFFF ? _mm512_loadu_ps((const float*)x + i)
                       : _mm512_maskz_loadu_ps(m, (const float*)x + i);
  const __m256i h = m == 0xFFFF ? _mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i))
                                : _mm256_maskz_loadu_epi16(m, (const uint16_t*)x + i);
  if (DT == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);  // exact; quiets NaNs like f16_to_f32
}

// Nearest-code indices of 16 values (as int32 lanes) from the byte-exact bucket table.
// A gather merges into its destination register, so that register must be a fresh zero: when
// gcc can see a full mask it treats the merge source as dead and gathers into whatever register
// is free, in the streaming loop below the previous gather's result, chaining every gather to the
// one before (quantize_blockwise of 2**24 values: 8.2 ms -> 6.8 ms on one Zen 5 core once the
// mask is hidden from the optimizer by the empty asm).
static inline __m512i lut_index16(__m512i yb, __mmask16 m, const NearestLut& lut) {
  asm("" : "+k"(m));
  const __m512i e = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m,
                                                _mm512_srli_epi32(yb, 16), lut.packed, 4);
  const __m512i below = _mm512_and_si512(e, _mm512_set1_epi32(0xFF));
  const __m512i mid_lo = _mm512_srli_epi32(e, 16);
  const __m512i y_lo = _mm512_and_si512(yb, _mm512_set1_epi32(0xFFFF));
  const __mmask16 inside = _mm512_test_epi32_mask(e, _mm512_set1_epi32(0x100));
  const __mmask16 negative = _mm512_test_epi32_mask(yb, _mm512_set1_epi32((int)0x80000000u));
  const __mmask16 up = inside & ((~negative & _mm512_cmplt_epu32_mask(mid_lo, y_lo)) |
                                 (negative & _mm512_cmpgt_epu32_mask(mid_lo, y_lo)));
  return _mm512_mask_add_epi32(below, up, below, _mm512_set1_epi32(1));
}

// 8-bit codes, one byte per value, straight into the output.
// With `stream` (large outputs), full 64-value chunks into a 64-byte-aligned output go out with
// one non-temporal store: skipping the read-for-ownership saves a fifth of the traffic, and a
// large output would not stay in cache anyway. (The caller fences once at the end.)
template <int DT>
static void nearest_lut_avx512(const void* x, int64_t begin, int64_t len, float inv,
                               const NearestLut& lut, uint8_t* out, bool stream) {
  const __m512 vinv = _mm512_set1_ps(inv);
  int64_t i = 0;
  if (stream && ((uintptr_t)out & 63) == 0) {
    for (; i + 64 <= len; i += 64) {
      __m512i packed = _mm512_setzero_si512();
      for (int q = 0; q < 4; ++q) {
        const __m512i yb = _mm512_castps_si512(
            _mm512_mul_ps(load16<DT>(x, begin + i + 16 * q, 0xFFFF), vinv));
        const __m128i bytes = _mm512_cvtepi32_epi8(lut_index16(yb, 0xFFFF, lut));
        packed = q == 0 ? _mm512_inserti32x4(packed, bytes, 0)
               : q == 1 ? _mm512_inserti32x4(packed, bytes, 1)
               : q == 2 ? _mm512_inserti32x4(packed, bytes, 2)
                        : _mm512_inserti32x4(packed, bytes, 3);
      }
      _mm512_stream_si512((__m512i*)(out + i), packed);
    }
  }
  for (; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    const __m512i yb = _mm512_castps_si512(_mm512_mul_ps(load16<DT>(x, begin + i, m), vinv));
    _mm512_mask_cvtepi32_storeu_epi8(out + i, m, lut_index16(yb, m, lut));
  }
}

// Writes the packed 4-bit codes directly: element 2j in the high nibble; an odd tail's missing
// partner is a 0 nibble.
template <int DT>
static void nearest16_avx512(const void* x, int64_t begin, int64_t len, float inv,
                             const float* mids, uint8_t* packed) {
  const __m512 vinv = _mm512_set1_ps(inv);
  // 15 midpoints and a +inf sentinel: a 4-step branch-free binary search by lane permutes.
  const __m512 table = _mm512_mask_loadu_ps(_mm512_set1_ps(__builtin_inff()), 0x7FFF, mids);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    const __m512 y = _mm512_mul_ps(load16<DT>(x, begin + i, m), vinv);
    __m512i pos = _mm512_setzero_si512();
    for (int step = 8; step >= 1; step >>= 1) {
      const __m512 probe = _mm512_permutexvar_ps(
          _mm512_add_epi32(pos, _mm512_set1_epi32(step - 1)), table);
      pos = _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask(probe, y, _CMP_LT_OQ), pos,
                                  _mm512_set1_epi32(step));
    }
    pos = _mm512_maskz_mov_epi32(m, pos);
    // each 64-bit lane holds (even, odd): even << 4 | odd, then one byte per lane
    const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(pos, 4), _mm512_srli_epi64(pos, 32));
    const int64_t rem = len - i;
    const int nbytes = rem >= 16 ? 8 : (int)((rem + 1) / 2);
    _mm512_mask_cvtepi64_storeu_epi8(packed + i / 2, (__mmask8)((1u << nbytes) - 1u),
                                     _mm512_and_si512(pairs, _mm512_set1_epi64(0xFF)));
  }
}
#endif

#if defined(LOWBIT_ISA_AVX512)
// stochastic_run<DT, 256> with the bracket taken from the nearest-code table instead of an
// 8-step binary search (9 gathers per 16 values there, 4 here): with the midpoints strictly
// between their codes, the codes <= y are the n below the nearest one plus that one if it is
// <= y (n = the count of midpoints below y), so lo = n - 1 + (code[n] <= y). NaN y: n = 0 and
// no compare holds, as in the scalar loop. The caller checks the strict midpoints.
template <int DT>
static void stochastic256_avx512(const void* x, int64_t begin, int64_t len, float inv,
                                 const float* code, const NearestLut& lut, uint64_t seed,
                                 uint64_t offset, uint8_t* out) {
  uint32_t rbuf[4096];  // blocks are at most 4096 elements
  fill_philox(seed, offset + (uint64_t)begin, len, rbuf);
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    const __m512 y = _mm512_mul_ps(load16<DT>(x, begin + i, m), vinv);
    const __m512i n = lut_index16(_mm512_castps_si512(y), m, lut);
    const __m512 cn = _mm512_i32gather_ps(n, code, 4);
    const __m512i zero = _mm512_setzero_si512();
    __m512i lo = _mm512_mask_add_epi32(_mm512_sub_epi32(n, one),
                                       _mm512_cmp_ps_mask(cn, y, _CMP_LE_OQ), n, zero);
    lo = _mm512_min_epi32(_mm512_max_epi32(lo, zero), _mm512_set1_epi32(254));
    const __m512 c_lo = _mm512_i32gather_ps(lo, code, 4);
    const __m512 c_hi = _mm512_i32gather_ps(_mm512_add_epi32(lo, one), code, 4);
    const __m512 p = _mm512_div_ps(_mm512_sub_ps(y, c_lo), _mm512_sub_ps(c_hi, c_lo));
    const __m512i r = _mm512_maskz_loadu_epi32(m, rbuf + i);
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(r, 8)),
                                   _mm512_set1_ps(5.9604644775390625e-08f));
    const __m512i idx = _mm512_mask_add_epi32(lo, _mm512_cmp_ps_mask(u, p, _CMP_LT_OQ), lo, one);
    _mm_mask_storeu_epi8(out + i, m, _mm512_cvtepi32_epi8(idx));
  }
}
#endif

// Codes of block values x[begin .. begin+len) scaled by inv, nearest rounding, written to
// `out` = the block's first code byte (4-bit: packed, element 2j in the high nibble; blocks
// have even size, so they start on a byte). `stream`: non-temporal stores where possible.
template <int DT>
static void encode_nearest(const void* x, int64_t begin, int64_t len, float inv, int ncode,
                           const float* mids, const NearestLut& lut, uint8_t* out, bool stream,
                           uint8_t* idx_buf) {
#if defined(LOWBIT_ISA_AVX512)
  // The hand-written loops store straight into the output (no index buffer pass).
  // 16-entry books: a 4-step permute search in registers beats the table load.
  if (ncode == 16) {
    nearest16_avx512<DT>(x, begin, len, inv, mids, out);
    return;
  }
  if (lut.max_inside <= 1) {
    nearest_lut_avx512<DT>(x, begin, len, inv, lut, out, stream);
    return;
  }
#endif
  (void)stream;
  if (ncode == 16) {
    nearest16_run<DT>(x, begin, len, inv, mids, idx_buf);
  } else if (lut.max_inside <= 1) {
    nearest256_run<DT>(x, begin, len, inv, lut.table, mids, idx_buf);
  } else {
    for (int64_t i = 0; i < len; ++i)
      idx_buf[i] = (uint8_t)nearest256(scale_to_unit(load_t<DT>(x, begin + i), inv), mids, lut);
  }
  pack_codes(idx_buf, len, ncode, out);
}

// The bracket of stochastic rounding can come from the nearest-code table (stochastic256_avx512)
// when that table is exact by itself (at most one midpoint per bucket) and every midpoint lies
// strictly between its two codes (not so for repeated or adjacent-float codes in a user book).
static bool lut_brackets(const QuantArgs& a) {
  if (a.ncode != 256 || a.lut.packed == nullptr || a.lut.max_inside > 1) return false;
  for (int k = 0; k < 255; ++k)
    if (!(a.code[k] < a.mids[k] && a.mids[k] < a.code[k + 1])) return false;
  return true;
}

template <int DT>
static void quantize_block(const QuantArgs& a, int64_t b, uint8_t* idx_buf,
                           bool bracket_from_lut) {
  const int64_t begin = b * a.block;
  const int64_t len = (a.n - begin) < a.block ? (a.n - begin) : a.block;
  const float am = block_absmax<DT>(a.x, begin, len);
  a.absmax[b] = am;
  const float inv = unit_scale(am);
  uint8_t* out = a.codes + (a.ncode == 16 ? begin / 2 : begin);
  if (!a.stochastic) {
    encode_nearest<DT>(a.x, begin, len, inv, a.ncode, a.mids, a.lut, out, a.n >= kStreamMin,
                       idx_buf);
    return;
  }
  if (a.ncode == 16) {
    stochastic_run<DT, 16>(a.x, begin, len, inv, a.code, a.seed, a.offset, idx_buf);
    pack_codes(idx_buf, len, a.ncode, out);
    return;
  }
#if defined(LOWBIT_ISA_AVX512)
  if (bracket_from_lut) {
    stochastic256_avx512<DT>(a.x, begin, len, inv, a.code, a.lut, a.seed, a.offset, out);
    return;
  }
#else
  (void)bracket_from_lut;
#endif
  stochastic_run<DT, 256>(a.x, begin, len, inv, a.code, a.seed, a.offset, idx_buf);
  pack_codes(idx_buf, len, a.ncode, out);
}

template <int DT>
static void quantize_all(const QuantArgs& a) {
  const int64_t nblocks = (a.n + a.block - 1) / a.block;
  const bool brackets = a.stochastic && lut_brackets(a);
#pragma omp parallel if (a.n >= kParallelMin)
  {
    uint8_t idx_buf[4096];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) quantize_block<DT>(a, b, idx_buf, brackets);
#if defined(LOWBIT_ISA_AVX512)
    _mm_sfence();  // order this thread's non-temporal code stores before the results are used
#endif
  }
}

void quantize_blockwise(const QuantArgs& a) {
  if (a.x_dtype == kBF16) quantize_all<kBF16>(a);
  else if (a.x_dtype == kF16) quantize_all<kF16>(a);
  else quantize_all<kF32>(a);
}

#if defined(LOWBIT_ISA_AVX512)
// fp32 output, 16 values per step: 4-bit codes expand from 8 bytes (high nibble first) and are
// looked up with one lane permute; 8-bit codes with one gather. NaN results become the canonical
// NaN exactly as dequant_value does.
template <int NCODE>
// `out` points at the block's first element.
static void dequant_f32_avx512(const uint8_t* codes, const float* code, int64_t begin,
                               int64_t len, float am, float* out, bool stream) {
  stream = stream && ((uintptr_t)out & 63) == 0;
  const __m512 vam = _mm512_set1_ps(am);
  const __m512 qnan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000));
  const __m512 table16 = NCODE == 16 ? _mm512_loadu_ps(code) : _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    __m512 vals;
    if (NCODE == 16) {
      const int64_t rem = len - i;
      const int nbytes = rem >= 16 ? 8 : (int)((rem + 1) / 2);
      const __m128i bytes = _mm_maskz_loadu_epi8((__mmask16)((1u << nbytes) - 1u),
                                                 codes + (begin + i) / 2);
      const __m512i wide = _mm512_cvtepu8_epi64(bytes);
      // 32-bit lanes (2j, 2j+1) = (high nibble, low nibble) of byte j
      const __m512i idx = _mm512_or_si512(
          _mm512_srli_epi64(wide, 4),
          _mm512_slli_epi64(_mm512_and_si512(wide, _mm512_set1_epi64(0xF)), 32));
      vals = _mm512_permutexvar_ps(idx, table16);
    } else {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, codes + begin + i));
      vals = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, code, 4);
    }
    __m512 v = _mm512_mul_ps(vals, vam);
    v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
    if (stream && m == 0xFFFF) _mm512_stream_ps(out + i, v);
    else _mm512_mask_storeu_ps(out + i, m, v);
  }
}
#endif

#if defined(LOWBIT_ISA_AVX512)
// A 256-entry fp32 codebook as four byte planes for dequant_planes: b[p][k] = byte p (from the
// least significant) of code[k]'s bits.
struct CodePlanes {
  alignas(64) uint8_t b[4][256];
};

// AVX512-VBMI (vpermb / vpermi2b: Ice Lake and Zen 4 on; Skylake-X has none).
// LOWBIT_CPU_NO_VBMI=1 keeps the gather path (the tests run it that way too).
static bool cpu_has_vbmi() {
  static const bool yes = __builtin_cpu_supports("avx512vbmi") && !getenv("LOWBIT_CPU_NO_VBMI");
  return yes;
}

#define LOWBIT_VBMI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")))

LOWBIT_VBMI_TARGET static void make_planes(const float* code, CodePlanes* pl) {
  // the 64 bytes of 16 values regrouped by plane: bytes p, p + 4, ... of the vector
  alignas(64) uint8_t idx[64];
  for (int p = 0; p < 4; ++p)
    for (int j = 0; j < 16; ++j) idx[16 * p + j] = (uint8_t)(4 * j + p);
  const __m512i by_plane = _mm512_load_si512(idx);
  for (int k = 0; k < 256; k += 16) {
    alignas(64) uint8_t t[64];
    _mm512_store_si512(t, _mm512_maskz_permutexvar_epi8(~(__mmask64)0, by_plane,
                                                         _mm512_loadu_si512(code + k)));
    for (int p = 0; p < 4; ++p) memcpy(pl->b[p] + k, t + 16 * p, 16);
  }
}

// dequant_f32_avx512<256> (plain stores) by table lookups in registers instead of gathers, 64
// codes at a time: each of the value's four bytes comes from its plane by two vpermi2b (codes
// below and above 128) and a blend on the code's top bit, and unpacking the four byte vectors
// assembles the fp32 bits. A vpermb first puts the codes in the order the unpacks (which work
// inside 128-bit lanes) need for the values to come out in sequence. The same table entries,
// so the same values bit for bit. (One thread, L1-resident codes: 4.9 cycles per 16 values
// against 19.6 for the gather, on a Zen 5.) With `stream` (large outputs, as in
// dequant_f32_avx512) whole vectors leave by non-temporal stores; the caller fences.
LOWBIT_VBMI_TARGET static void dequant_planes(const uint8_t* codes, const CodePlanes& pl,
                                              int64_t begin, int64_t len, float am, float* out,
                                              bool stream = false) {
  stream = stream && ((uintptr_t)out & 63) == 0;
  __m512i tb[4][4];
  for (int p = 0; p < 4; ++p)
    for (int q = 0; q < 4; ++q) tb[p][q] = _mm512_load_si512(pl.b[p] + 64 * q);
  // input byte 16L + 4v + q (128-bit lane L, output vector v) holds code 16v + 4L + q
  alignas(64) uint8_t ord[64];
  for (int L = 0; L < 4; ++L)
    for (int v = 0; v < 4; ++v)
      for (int q = 0; q < 4; ++q) ord[16 * L + 4 * v + q] = (uint8_t)(16 * v + 4 * L + q);
  const __m512i order = _mm512_load_si512(ord);
  const __m512 vam = _mm512_set1_ps(am);
  const __m512 qnan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000));
  for (int64_t i = 0; i < len; i += 64) {
    const int64_t n = len - i < 64 ? len - i : 64;
    const __mmask64 in = n == 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
    // (the maskz forms: gcc 12's plain ones trip -Wuninitialized on an undefined operand)
    const __m512i idx = _mm512_maskz_permutexvar_epi8(
        ~(__mmask64)0, order, _mm512_maskz_loadu_epi8(in, codes + begin + i));
    const __mmask64 upper = _mm512_movepi8_mask(idx);
    __m512i b[4];
    for (int p = 0; p < 4; ++p)
      b[p] = _mm512_mask_mov_epi8(_mm512_permutex2var_epi8(tb[p][0], idx, tb[p][1]), upper,
                                  _mm512_permutex2var_epi8(tb[p][2], idx, tb[p][3]));
    const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
    const __m512i vals[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                             _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
    for (int v = 0; v < 4 && 16 * v < n; ++v) {
      __m512 x = _mm512_mul_ps(_mm512_castsi512_ps(vals[v]), vam);
      x = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), qnan);
      if (stream && n - 16 * v >= 16) _mm512_stream_ps(out + i + 16 * v, x);
      else _mm512_mask_storeu_ps(out + i + 16 * v, tail_mask(n - 16 * v), x);
    }
  }
}
#undef LOWBIT_VBMI_TARGET
#endif

template <int DT, int NCODE>
static void dequantize_all(const DequantArgs& a) {
  const int64_t nblocks = (a.n + a.block - 1) / a.block;
#if defined(LOWBIT_ISA_AVX512)
  // 8-bit codes to fp32 on VBMI CPUs: byte-plane lookups in registers instead of gathers (the
  // optimizer's decode does the same): 2**24 values, 2 Zen 5 threads: 4.0 -> 2.6-2.8 ms
  CodePlanes planes;
  const bool by_planes = DT == kF32 && NCODE == 256 && cpu_has_vbmi();
  if (by_planes) make_planes(a.code, &planes);
#endif
#pragma omp parallel if (a.n >= kParallelMin)
  {
#pragma omp for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t begin = b * a.block;
    const int64_t len = (a.n - begin) < a.block ? (a.n - begin) : a.block;
    const float am = a.absmax[b];
    const float* code = a.code;
#if defined(LOWBIT_ISA_AVX512)
    if (by_planes) {
      dequant_planes(a.codes, planes, begin, len, am, (float*)a.out + begin, a.n >= kStreamMin);
      continue;
    }
    if (DT == kF32) {
      dequant_f32_avx512<NCODE>(a.codes, code, begin, len, am, (float*)a.out + begin,
                                a.n >= kStreamMin);
      continue;
    }
#endif
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const int64_t k = begin + i;
      const float v = dequant_value(code[code_at<NCODE>(a.codes, k)], am);
      if (DT == kF32) ((float*)a.out)[k] = v;
      else if (DT == kBF16) ((uint16_t*)a.out)[k] = (uint16_t)round_to_bf16(f32_bits(v), false, 0u);
      else ((uint16_t*)a.out)[k] = (uint16_t)round_to_fmt(f32_bits(v), fmt_of(DT), false, 0u);
    }
  }
#if defined(LOWBIT_ISA_AVX512)
  _mm_sfence();  // order this thread's non-temporal stores before the results are used
#endif
  }
}

void dequantize_blockwise(const DequantArgs& a) {
  const bool four = a.ncode == 16;
  if (a.out_dtype == kBF16) four ? dequantize_all<kBF16, 16>(a) : dequantize_all<kBF16, 256>(a);
  else if (a.out_dtype == kF16) four ? dequantize_all<kF16, 16>(a) : dequantize_all<kF16, 256>(a);
  else four ? dequantize_all<kF32, 16>(a) : dequantize_all<kF32, 256>(a);
}

template <int FMT, typename Out>
static void round_run(const float* __restrict x, Out* __restrict out, int64_t begin, int64_t end,
                      uint64_t seed, uint64_t offset) {
  const Fmt f = fmt_of(FMT);
  uint32_t rbuf[1024];
  for (int64_t b = begin; b < end; b += 1024) {
    const int64_t len = end - b < 1024 ? end - b : 1024;
    fill_philox(seed, offset + (uint64_t)b, len, rbuf);
    const float* __restrict xb = x + b;
    Out* __restrict ob = out + b;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      ob[i] = (Out)(FMT == kBF16 ? round_to_bf16(f32_bits(xb[i]), true, rbuf[i])
                                 : round_to_fmt(f32_bits(xb[i]), f, true, rbuf[i]));
  }
}

template <int FMT>
static void round_all(const RoundArgs& a) {
  const int64_t chunk = 1 << 14;
  const int64_t nchunks = (a.n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (a.n >= kParallelMin)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t begin = c * chunk, end = begin + chunk < a.n ? begin + chunk : a.n;
    if (fmt_of(FMT).width == 16)
      round_run<FMT>(a.x, (uint16_t*)a.out, begin, end, a.seed, a.offset);
    else
      round_run<FMT>(a.x, (uint8_t*)a.out, begin, end, a.seed, a.offset);
  }
}

void stochastic_round(const RoundArgs& a) {
  switch (a.fmt) {
    case kF16: round_all<kF16>(a); break;
    case kE4M3FN: round_all<kE4M3FN>(a); break;
    case kE5M2: round_all<kE5M2>(a); break;
    default: round_all<kBF16>(a); break;
  }
}

// Word 0 straight from fill_philox; more words from fill_philox4 (all four of each counter,
// interleaved) through a small buffer, spread into their rows.
void philox_words(const PhiloxArgs& a) {
  constexpr int64_t kChunk = 1024;
  const int64_t nchunks = (a.n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (a.n >= kParallelMin)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t begin = c * kChunk;
    const int64_t len = a.n - begin < kChunk ? a.n - begin : kChunk;
    if (a.words == 1) {
      fill_philox(a.seed, a.counter0 + (uint64_t)begin, len, a.out + begin);
      continue;
    }
    uint32_t buf[4 * kChunk];
    fill_philox4(a.seed, 4 * (a.counter0 + (uint64_t)begin), 4 * len, buf);
    for (int w = 0; w < a.words; ++w) {
      uint32_t* __restrict row = a.out + w * a.n + begin;
      for (int64_t i = 0; i < len; ++i) row[i] = buf[4 * i + w];
    }
  }
}

}  // namespace LOWBIT_ISA_NS
}  // namespace cpu
}  // namespace lowbit
