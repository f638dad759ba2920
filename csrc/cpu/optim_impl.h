// The fused multi-tensor optimizer step on the CPU (lowbit::optim_step; spec:
// lowbit.reference.optim). Included after kernels_impl.h in each per-ISA translation unit, so it
// reuses that clone's vectorized pieces: the Philox fill, the nearest-code searches (bucket table
// for 256-entry books, permute search for 16-entry ones) and the AVX-512 dequantization.
//
// One call updates every tensor of a parameter group: OpenMP over chunks of kOptChunk elements of
// all tensors together; inside a chunk, per quantization block: dequantize the states into fp32
// buffers, run the per-element rule (lowbit/optim_math.h) over the block, requantize. Grad,
// param and states are read once and written once. The loops are templates over the rule, the
// param dtype, the write-back and the state layout, so each compiles branch-free.
//
// Rank-1 second states (lowbit/rank1.h) need the row and column maxima of the new v before any
// of its codes can be written, so such a call first runs a prepass over those tensors that
// computes the new v (reading grad, old codes and maxima, and the param only with L2 decay) and
// keeps only its maxima; the step then decodes with the old maxima and encodes with the new.
#include <string.h>

#include <type_traits>
#include <vector>

#include "lowbit/optim_math.h"
#include "lowbit/rank1.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_ISA_NS {

// Work unit: a multiple of every state block size (<= 4096, powers of two).
static const int64_t kOptChunk = 4096;
// The Hessian estimate of a curvature step that does not refresh (read by the rule's selects,
// never used).
static const float kZeroRun[kOptChunk] = {};

// Codes of elements [begin, begin+len) of a state -> fp32 values in `out` (out[0] = element begin).
template <int NCODE>
static void decode_block(const uint8_t* codes, int64_t begin, int64_t len, const float* code,
                         float am, float* __restrict out) {
#if defined(LOWBIT_ISA_AVX512)
  dequant_f32_avx512<NCODE>(codes, code, begin, len, am, out, false);
#else
#pragma omp simd
  for (int64_t i = 0; i < len; ++i)
    out[i] = dequant_value(code[code_at<NCODE>(codes, begin + i)], am);
#endif
}

// Nearest codes of the block's new values against their absmax `am` (bits of the largest |value|,
// computed by update_run on the way). zero_floor (8-bit codebooks starting with 0, i.e. the
// unsigned second-moment map): a value > 0 whose nearest code is that 0 takes code 1 instead
// (lowbit.reference.optim.zero_floor: a v stored as 0 under a non-zero m would make the next
// step lr * m / eps).
template <int NCODE>
static void encode_block(const float* vals, int64_t begin, int64_t len, uint32_t am_bits,
                         const float* mids, const NearestLut& lut, uint8_t* codes,
                         float* absmax_slot, uint8_t* idx_buf, bool zero_floor = false) {
  const float am = bits_f32(am_bits);
  *absmax_slot = am;
  uint8_t* out = codes + (NCODE == 16 ? begin / 2 : begin);
  encode_nearest<kF32>(vals, 0, len, unit_scale(am), NCODE, mids, lut, out, false, idx_buf);
  if (NCODE == 256 && zero_floor) {
    uint8_t* __restrict o = out;
    const float* __restrict x = vals;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) o[i] = (o[i] == 0 && x[i] > 0.0f) ? 1 : o[i];
  }
}

// Elements per piece of an update run (see update_run): small enough that the decode of one
// piece and the rule over the previous one share the out-of-order window (256 lost most of the
// gain in a microbenchmark; 64 and 128 measured alike in the step). Every run goes piece by
// piece, so one piece's prefetches (prefetch_piece) are issued per piece.
static const int64_t kDecPiece = 64;

// Parameter storage type: fp32, or the raw bits of bf16 / fp16.
template <int DT>
using ParamT = typename std::conditional<DT == kF32, float, uint16_t>::type;

template <int DT>
static inline float widen(ParamT<DT> h) {
  if (DT == kF32) return (float)h;
  return DT == kBF16 ? bf16_to_f32((uint16_t)h) : f16_to_f32((uint16_t)h);
}

// Software prefetch (kernels_impl.h: kPrefetchAhead) of the piece that many bytes of parameter
// ahead of piece q0, and of the states of the same elements. Prefetches past the end of a
// tensor are harmless (they never fault). DEC: the states are 8-bit codes (a byte per element);
// otherwise m / v are the fp32 states themselves, or chunk buffers already in cache, where the
// prefetch costs next to nothing.
template <int DT, int NST, bool DEC>
static inline void prefetch_piece(const OptTensor& t, const void* p, const void* g,
                                  const float* m, const float* v, int64_t begin, int64_t q0) {
#if defined(LOWBIT_ISA_AVX512)
  const int64_t esz = DT == kF32 ? 4 : 2;
  const int64_t ahead = q0 * esz + kPrefetchAhead;  // (bytes into the run's param and grad)
  for (int64_t k = 0; k < kDecPiece * esz; k += 64) {
    _mm_prefetch((const char*)p + ahead + k, _MM_HINT_T0);
    _mm_prefetch((const char*)g + ahead + k, _MM_HINT_T0);
  }
  // states: as many elements ahead as the parameter (kDecPiece codes are one line)
  const int64_t sahead = kPrefetchAhead / esz;
  if (DEC) {
    if (NST >= 1) _mm_prefetch((const char*)t.s1 + begin + q0 + sahead, _MM_HINT_T0);
    if (NST >= 2) _mm_prefetch((const char*)t.s2 + begin + q0 + sahead, _MM_HINT_T0);
  } else {
    for (int64_t k = 0; k < kDecPiece * 4; k += 64) {
      if (NST >= 1) _mm_prefetch((const char*)(m + q0 + sahead) + k, _MM_HINT_T0);
      if (NST >= 2) _mm_prefetch((const char*)(v + q0 + sahead) + k, _MM_HINT_T0);
    }
  }
#else
  (void)t, (void)p, (void)g, (void)m, (void)v, (void)begin, (void)q0;
#endif
}

// The rule over elements [begin, begin+len) of tensor t, in sub-runs of `sub` elements (the
// state blocks of quantized states; len for fp32 ones). m/v: the states of these elements (fp32
// arrays, or the dequantized chunk buffers), updated in place; mx_m[j]/mx_v[j]: the largest
// |bits| of sub-run j's new m/v (its block absmax), found in the same pass. One call per chunk,
// not per block: the loop's setup (scalar broadcasts, the clip row) is paid once per chunk.
// Every array is a typed __restrict pointer to the run's first element. No loop unswitching:
// gcc would otherwise split the loop on each runtime flag (maximize, decay, ...) and fail to
// vectorize most of the copies; as selects, the flags cost a blend each.
// CLIP / SPIKE: the rule with the clipping steps / the spike clip (update_rule); the clipped
// elements are counted into *nclip.
// DEC (8-bit block-wise states): the old states are decoded here, kDecPiece elements of each at
// a time (a gather from the codebook per 16), right before the rule runs over them, instead of
// by a separate pass over the whole chunk first. The decode is bound by the gathers' loads, the
// rule by the divider (the division and square root); a piece at a time, the two can overlap
// (a microbenchmark of the bare loops: 0.72 -> 0.45 ns per element), and the decoded values
// are still in L1 when the rule reads them. Measured on the whole step: ~5% less kernel time
// for 2^24 elements, none when everything is cache-resident. The block maxima are then taken
// by a pass over the block's new values (in L1) instead of inside the rule's loop: a
// reduction there would be finished (a horizontal max) after every piece.
template <int KIND, int DT, int WB, int NST, bool CLIP, bool SPIKE, bool HESS, bool DEC = false>
__attribute__((optimize("no-unswitch-loops")))
static void update_run(const OptArgs& a, const OptTensor& t, int64_t begin, int64_t len,
                       int64_t sub, float* __restrict m, float* __restrict v,
                       uint32_t* __restrict mx_m, uint32_t* __restrict mx_v, int64_t* nclip) {
  using P = ParamT<DT>;
  uint32_t rbuf[kOptChunk];
  // (runs start at multiples of 32 elements: whole Philox counters)
  if (WB == kWbStochastic) fill_philox4(t.key, (uint64_t)begin, len, rbuf);
  float fs[kNumScalars];
  for (int k = 0; k < kNumScalars; ++k) fs[k] = a.s.f[k];
  const int flags = a.s.flags;
  OptClipRow ct = CLIP && t.clip ? *t.clip : no_clip_row();
  if (CLIP) identity_row(flags, fs[8], ct.xf);  // (the rule then takes the branch-free transform)
  P* __restrict p = (P*)t.p + begin;
  const P* __restrict g = (const P*)t.g + begin;
  P* __restrict comp = WB == kWbKahan ? (P*)t.comp + begin : nullptr;
  const uint32_t* __restrict r = rbuf;
  // the Hessian estimate (zeros when this step does not refresh: never read then)
  const float* __restrict hz = HESS ? (t.hess ? t.hess + begin : kZeroRun) : nullptr;
  const Fmt fmt = fmt_of(DT);
  int32_t clipped = 0;  // (runs are at most kOptChunk elements)
#if defined(LOWBIT_ISA_AVX512)
  // (DEC on a CPU with VBMI: the codebooks as byte planes, decoded by in-register lookups)
  const bool planes = DEC && cpu_has_vbmi();
  CodePlanes pl1, pl2;
  if (planes && NST >= 1) make_planes(a.code1, &pl1);
  if (planes && NST >= 2) make_planes(a.code2, &pl2);
#endif
  for (int64_t s0 = 0, j = 0; s0 < len; s0 += sub, ++j) {
    const int64_t s1_end = s0 + sub < len ? s0 + sub : len;
    uint32_t max1 = 0, max2 = 0;
    // (DEC: sub-runs are the state blocks; their maxima are read before encode_block stores
    // the new ones)
    const float am1 = DEC && NST >= 1 ? t.s1_absmax[(begin + s0) / sub] : 0.0f;
    const float am2 = DEC && NST >= 2 ? t.s2_absmax[(begin + s0) / sub] : 0.0f;
    for (int64_t q0 = s0; q0 < s1_end; q0 += kDecPiece) {
      const int64_t q1 = q0 + kDecPiece < s1_end ? q0 + kDecPiece : s1_end;
      prefetch_piece<DT, NST, DEC>(t, p, g, m, v, begin, q0);
#if defined(LOWBIT_ISA_AVX512)
      if (planes) {
        if (NST >= 1) dequant_planes((const uint8_t*)t.s1, pl1, begin + q0, q1 - q0, am1, m + q0);
        if (NST >= 2) dequant_planes((const uint8_t*)t.s2, pl2, begin + q0, q1 - q0, am2, v + q0);
      } else
#endif
      {
        if (DEC && NST >= 1)
          decode_block<256>((const uint8_t*)t.s1, begin + q0, q1 - q0, a.code1, am1, m + q0);
        if (DEC && NST >= 2)
          decode_block<256>((const uint8_t*)t.s2, begin + q0, q1 - q0, a.code2, am2, v + q0);
      }
#pragma omp simd reduction(max : max1, max2) reduction(+ : clipped)
      for (int64_t i = q0; i < q1; ++i) {
        float x = widen<DT>(p[i]);
        if (WB == kWbKahan) x = x + widen<DT>(comp[i]);
        float s1 = NST >= 1 ? m[i] : 0.0f, s2 = NST >= 2 ? v[i] : 0.0f;
        const bool c = update_rule<KIND, CLIP, SPIKE, true, HESS>(fs, flags, x, widen<DT>(g[i]),
                                                                  s1, s2, ct, HESS ? hz[i] : 0.0f);
        if (CLIP) clipped += c ? 1 : 0;
        if (NST >= 1) m[i] = s1;
        if (NST >= 2) v[i] = s2;
        if (!DEC) {
          const uint32_t b1 = abs_bits(s1), b2 = abs_bits(s2);
          max1 = b1 > max1 ? b1 : max1;
          max2 = b2 > max2 ? b2 : max2;
        }
        // the store of store_param (optim_math.h), with the Philox words drawn in bulk above
        if (WB == kWbF32) {
          p[i] = (P)x;
        } else {
          const bool sr = WB == kWbStochastic;
          const uint32_t hi = DT == kBF16 ? round_to_bf16(f32_bits(x), sr, sr ? r[i] : 0u)
                                          : round_to_fmt(f32_bits(x), fmt, sr, sr ? r[i] : 0u);
          p[i] = (P)hi;
          if (WB == kWbKahan) {
            const uint32_t rest = f32_bits(x - widen<DT>((P)hi));
            comp[i] = (P)(DT == kBF16 ? round_to_bf16(rest, false, 0u)
                                      : round_to_fmt(rest, fmt, false, 0u));
          }
        }
      }
    }
    if (DEC) {
#pragma omp simd reduction(max : max1, max2)
      for (int64_t i = s0; i < s1_end; ++i) {
        const uint32_t b1 = NST >= 1 ? abs_bits(m[i]) : 0u, b2 = NST >= 2 ? abs_bits(v[i]) : 0u;
        max1 = b1 > max1 ? b1 : max1;
        max2 = b2 > max2 ? b2 : max2;
      }
    }
    mx_m[j] = max1;
    mx_v[j] = max2;
  }
  *nclip += clipped;
}

// ---- rank-1 second states ----------------------------------------------------------------------

// Elements per run of unpacked nibbles (a stack buffer of the rank-1 loops).
static const int kNibbleRun = 1024;

// The 4-bit codes of elements [k0, k0 + len), len <= kNibbleRun, one byte each: the packed bytes
// holding them are unpacked whole (element 2j of the tensor is byte j's high nibble), so element
// k0 + j lands at out[(k0 & 1) + j]. Two stores per byte in a plain loop vectorize, and the math
// loops then read their indices contiguously: gcc cannot vectorize a per-element nibble fetch
// (a gather of bytes).
static inline const uint8_t* unpack_nibbles(const uint8_t* codes, int64_t k0, int len,
                                            uint8_t* __restrict out) {
  const uint8_t* __restrict bytes = codes + (k0 >> 1);
  const int nbytes = ((int)(k0 & 1) + len + 1) >> 1;
#pragma omp simd
  for (int b = 0; b < nbytes; ++b) {
    out[2 * b] = (uint8_t)(bytes[b] >> 4);
    out[2 * b + 1] = (uint8_t)(bytes[b] & 0xF);
  }
  return out + (k0 & 1);
}

// Old v of `len` elements of one row: code[idx[j]] times min(row maximum rb, column maximum
// cb[j]) on the bit patterns (rank1_scale), as dequant_value. AVX-512: the 16-entry table lookup
// is one lane permute per 16 values (gcc would gather from memory).
static inline void decode_run(const uint8_t* __restrict idx, int len, const float* __restrict code,
                              uint32_t rb, const uint32_t* __restrict cb, float* __restrict out) {
  int j = 0;
#if defined(LOWBIT_ISA_AVX512)
  const __m512 table = _mm512_loadu_ps(code);
  const __m512i vrb = _mm512_set1_epi32((int)rb);
  const __m512 qnan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000));
  for (; j + 16 <= len; j += 16) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(idx + j)));
    const __m512i scale = _mm512_min_epu32(vrb, _mm512_loadu_si512(cb + j));
    __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(c, table), _mm512_castsi512_ps(scale));
    v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
    _mm512_storeu_ps(out + j, v);
  }
#endif
#pragma omp simd
  for (int k = j; k < len; ++k)
    out[k] = dequant_value(code[idx[k]], bits_f32(rb < cb[k] ? rb : cb[k]));
}

// One rank-1 tensor of the call: its matrix shape, the state's old maxima (as bit patterns, for
// decoding) and the reciprocals of the new ones (for encoding; rank1_unit_scale).
struct Rank1Info {
  int64_t rows, cols;
  const uint32_t* old_r;
  const uint32_t* old_c;
  const float* inv_r;
  const float* inv_c;
};

// The new maxima of one tile, rows [r0, r1) x columns [c0, c1), max-merged into row_dst[i] and
// col_dst[j]: the new v of each element (adam_new_v, the step's own arithmetic) from the old code
// decoded with the old maxima. NEED_P: coupled (L2) decay reads the parameter.
template <int DT, int WB, bool NEED_P>
__attribute__((optimize("no-unswitch-loops")))
static void maxima_tile(const OptArgs& a, const OptTensor& t, const Rank1Info& ri, int64_t r0,
                        int64_t r1, int64_t c0, int64_t c1, uint32_t* __restrict row_dst,
                        uint32_t* __restrict col_dst) {
  using P = ParamT<DT>;
  const float* f = a.s.f;
  const float fs[8] = {f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]};
  const int flags = a.s.flags;
  uint8_t nib[kNibbleRun + 2];
  float old_v[kNibbleRun];
  for (int64_t i = r0; i < r1; ++i) {
    const uint32_t rb = ri.old_r[i];
    uint32_t rmax = 0;
    for (int64_t j0 = c0; j0 < c1; j0 += kNibbleRun) {
      const int len = (int)(c1 - j0 < kNibbleRun ? c1 - j0 : kNibbleRun);
      const int64_t k0 = i * ri.cols + j0;
      decode_run(unpack_nibbles((const uint8_t*)t.s2, k0, len, nib), len, a.code2, rb,
                 ri.old_c + j0, old_v);
      const float* __restrict v_old = old_v;
      const P* __restrict g = (const P*)t.g + k0;
      const P* __restrict p = (const P*)t.p + k0;
      const P* __restrict comp = WB == kWbKahan ? (const P*)t.comp + k0 : nullptr;
      uint32_t* __restrict cmax = col_dst + j0;
#pragma omp simd reduction(max : rmax)
      for (int j = 0; j < len; ++j) {
        const float v = v_old[j];
        float x = 0.0f;
        if (NEED_P) {
          x = widen<DT>(p[j]);
          if (WB == kWbKahan) x = x + widen<DT>(comp[j]);
        }
        const uint32_t b = abs_bits(adam_new_v(fs, flags, x, widen<DT>(g[j]), v));
        rmax = b > rmax ? b : rmax;
        cmax[j] = b > cmax[j] ? b : cmax[j];
      }
    }
    row_dst[i] = rmax > row_dst[i] ? rmax : row_dst[i];
  }
}

// Elements per prepass tile (whole rows of a tall matrix, whole columns of a wide one).
static const int64_t kRank1Tile = 1 << 15;

struct Rank1Tile {
  int tensor;
  int64_t r0, r1, c0, c1;
};

// The prepass over every rank-1 tensor: their new maxima in v_scratch (R row maxima, then C
// column maxima), their reciprocals in `inv` (same layout), and `info` filled in. Tiles of a tall
// matrix (R >= C) are bands of whole rows, so each row maximum is one tile's; the column maxima
// collect in one buffer per thread, merged at the end. A wide matrix is tiled by bands of whole
// columns the other way round. Per-thread buffers thus hold min(R, C) <= sqrt(n) values per
// tensor; nothing is atomic and the result does not depend on the schedule (max is exact).
template <int DT, int WB, bool NEED_P>
static void rank1_maxima(const OptArgs& a, std::vector<Rank1Info>& info, std::vector<float>& inv) {
  std::vector<Rank1Tile> tiles;
  std::vector<int64_t> local_off(a.ntensors, 0), inv_off(a.ntensors, 0);
  int64_t local_total = 0, inv_total = 0, total = 0;
  for (int ti = 0; ti < a.ntensors; ++ti) {
    const OptTensor& t = a.tensors[ti];
    if (t.v_cols == 0) continue;
    const int64_t R = t.n / t.v_cols, C = t.v_cols;
    info[ti] = Rank1Info{R, C, (const uint32_t*)t.s2_absmax, (const uint32_t*)t.s2_colmax,
                         nullptr, nullptr};
    uint32_t* fresh = (uint32_t*)t.v_scratch;
    memset(fresh, 0, sizeof(uint32_t) * (R + C));  // 0 is the identity of a max of |bits|
    if (R >= C) {
      const int64_t h = C >= kRank1Tile ? 1 : kRank1Tile / C;
      for (int64_t r = 0; r < R; r += h) tiles.push_back({ti, r, r + h < R ? r + h : R, 0, C});
    } else {
      const int64_t w = R >= kRank1Tile / 64 ? 64 : kRank1Tile / R;
      for (int64_t c = 0; c < C; c += w) tiles.push_back({ti, 0, R, c, c + w < C ? c + w : C});
    }
    local_off[ti] = local_total;
    local_total += R < C ? R : C;
    inv_off[ti] = inv_total;
    inv_total += R + C;
    total += t.n;
  }
  const int nthreads = total >= kParallelMin ? omp_get_max_threads() : 1;
  std::vector<uint32_t> local((size_t)nthreads * local_total, 0u);
  const int64_t ntiles = (int64_t)tiles.size();
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t k = 0; k < ntiles; ++k) {
    const Rank1Tile& tile = tiles[k];
    const OptTensor& t = a.tensors[tile.tensor];
    const Rank1Info& ri = info[tile.tensor];
    uint32_t* fresh_r = (uint32_t*)t.v_scratch;
    uint32_t* fresh_c = fresh_r + ri.rows;
    uint32_t* mine = local.data() + (size_t)omp_get_thread_num() * local_total +
                     local_off[tile.tensor];
    if (ri.rows >= ri.cols)
      maxima_tile<DT, WB, NEED_P>(a, t, ri, tile.r0, tile.r1, tile.c0, tile.c1, fresh_r, mine);
    else
      maxima_tile<DT, WB, NEED_P>(a, t, ri, tile.r0, tile.r1, tile.c0, tile.c1, mine, fresh_c);
  }
  inv.assign(inv_total, 0.0f);
  for (int ti = 0; ti < a.ntensors; ++ti) {
    const OptTensor& t = a.tensors[ti];
    if (t.v_cols == 0) continue;
    Rank1Info& ri = info[ti];
    uint32_t* fresh = (uint32_t*)t.v_scratch;
    uint32_t* merged = fresh + (ri.rows >= ri.cols ? ri.rows : 0);
    const int64_t m = ri.rows < ri.cols ? ri.rows : ri.cols;
    for (int th = 0; th < nthreads; ++th) {
      const uint32_t* part = local.data() + (size_t)th * local_total + local_off[ti];
      for (int64_t x = 0; x < m; ++x) merged[x] = part[x] > merged[x] ? part[x] : merged[x];
    }
    float* inv_t = inv.data() + inv_off[ti];
    for (int64_t x = 0; x < ri.rows + ri.cols; ++x) inv_t[x] = unit_scale(bits_f32(fresh[x]));
    ri.inv_r = inv_t;
    ri.inv_c = inv_t + ri.rows;
  }
}

// Old v of elements [begin, begin+len) of a rank-1 tensor, row segment by row segment: each code
// times min(old row maximum, old column maximum).
static void decode_rank1(const uint8_t* codes, int64_t begin, int64_t len, const float* code,
                         const Rank1Info& ri, float* out) {
  uint8_t nib[kNibbleRun + 2];
  int64_t row = begin / ri.cols, col = begin - row * ri.cols;
  for (int64_t i = 0; i < len;) {
    // one run within one row and one unpacked buffer
    const int64_t in_row = ri.cols - col;
    int seg = (int)(len - i < in_row ? len - i : in_row);
    seg = seg < kNibbleRun ? seg : kNibbleRun;
    decode_run(unpack_nibbles(codes, begin + i, seg, nib), seg, code, ri.old_r[row],
               ri.old_c + col, out + i);
    i += seg;
    col += seg;
    if (col == ri.cols) {
      col = 0;
      ++row;
    }
  }
}

// New codes of the rank-1 block [begin, begin+len) (begin even: the block starts a byte): y = v
// times the larger of the row's and the column's reciprocal (rank1.h), then the block path's
// nearest search with multiplier 1 (y * 1 == y exactly, NaN included).
static void encode_rank1(const float* vals, int64_t begin, int64_t len, const Rank1Info& ri,
                         const float* mids, const NearestLut& lut, uint8_t* codes, float* ybuf,
                         uint8_t* idx_buf) {
  int64_t row = begin / ri.cols, col = begin - row * ri.cols;
  for (int64_t i = 0; i < len; ++row, col = 0) {
    const int64_t seg = len - i < ri.cols - col ? len - i : ri.cols - col;
    const float inv_r = ri.inv_r[row];
    const float* __restrict inv_c = ri.inv_c + col;
    const float* __restrict v = vals + i;
    float* __restrict y = ybuf + i;
#pragma omp simd
    for (int64_t j = 0; j < seg; ++j) y[j] = scale_to_unit(v[j], rank1_unit_scale(inv_r, inv_c[j]));
    i += seg;
  }
  encode_nearest<kF32>(ybuf, 0, len, 1.0f, 16, mids, lut, codes + begin / 2, false, idx_buf);
}

// ---- the step ----------------------------------------------------------------------------------

// Returns the number of clipped elements of the chunk.
template <int KIND, int DT, int WB, int NST, int NCODE, bool CLIP, bool SPIKE, bool HESS>
static int64_t step_chunk(const OptimCpuArgs& ca, const OptTensor& t, const Rank1Info* r1,
                          int64_t begin, int64_t len) {
  const OptArgs& a = ca.a;
  int64_t nclip = 0;
  if (NCODE == 0) {  // fp32 states (or none): update in place
    float* m = NST >= 1 ? (float*)t.s1 + begin : nullptr;
    float* v = NST >= 2 ? (float*)t.s2 + begin : nullptr;
    uint32_t unused1, unused2;
    update_run<KIND, DT, WB, NST, CLIP, SPIKE, HESS>(a, t, begin, len, len, m, v, &unused1,
                                                     &unused2, &nclip);
    return nclip;
  }
  // quantized states: decode the chunk's blocks, one update run over the chunk, encode them
  float mbuf[kOptChunk], vbuf[kOptChunk];
  uint32_t am1[kOptChunk / 32], am2[kOptChunk / 32];  // (blocks are >= 32 elements)
  uint8_t idx_buf[kOptChunk];
  // rank-1 second state: only 4-bit Adam states have one (optim_call checks)
  const bool rank1 = NST >= 2 && NCODE == 16 && r1 != nullptr;
  const int64_t block = a.block;
  const uint8_t* c1 = (const uint8_t*)t.s1;
  const uint8_t* c2 = (const uint8_t*)t.s2;
  const bool floor2 = NCODE == 256 && a.code2 != nullptr && a.code2[0] == 0.0f;  // (zero_floor)
  if (NCODE == 256) {  // (8-bit states are block-wise: decoded inside the update run)
    update_run<KIND, DT, WB, NST, CLIP, SPIKE, HESS, true>(a, t, begin, len, block, mbuf, vbuf,
                                                           am1, am2, &nclip);
  } else {
    for (int64_t b0 = begin; b0 < begin + len; b0 += block) {
      const int64_t blen = begin + len - b0 < block ? begin + len - b0 : block;
      const int64_t b = b0 / block, off = b0 - begin;
      if (NST >= 1) decode_block<NCODE>(c1, b0, blen, a.code1, t.s1_absmax[b], mbuf + off);
      if (NST >= 2 && rank1) decode_rank1(c2, b0, blen, a.code2, *r1, vbuf + off);
      else if (NST >= 2) decode_block<NCODE>(c2, b0, blen, a.code2, t.s2_absmax[b], vbuf + off);
    }
    update_run<KIND, DT, WB, NST, CLIP, SPIKE, HESS>(a, t, begin, len, block, mbuf, vbuf, am1,
                                                     am2, &nclip);
  }
  for (int64_t b0 = begin, j = 0; b0 < begin + len; b0 += block, ++j) {
    const int64_t blen = begin + len - b0 < block ? begin + len - b0 : block;
    const int64_t b = b0 / block, off = b0 - begin;
    if (NST >= 1)
      encode_block<NCODE>(mbuf + off, b0, blen, am1[j], a.mids1, ca.lut1, (uint8_t*)t.s1,
                          &t.s1_absmax[b], idx_buf);
    if (NST >= 2 && rank1)  // (the block's part of mbuf is free again: its codes are written)
      encode_rank1(vbuf + off, b0, blen, *r1, a.mids2, ca.lut2, (uint8_t*)t.s2, mbuf + off,
                   idx_buf);
    else if (NST >= 2)
      encode_block<NCODE>(vbuf + off, b0, blen, am2[j], a.mids2, ca.lut2, (uint8_t*)t.s2,
                          &t.s2_absmax[b], idx_buf, floor2);
  }
  return nclip;
}

// ---- the update-clipping statistics pass (Adam) ------------------------------------------------

// Sum of adam_rms_term over elements [begin, begin+len) of tensor t; v: their loaded second
// moments. Reads the parameter for the coupled (L2) decay's sake; writes nothing.
template <int DT, int WB, bool CLIP, bool SPIKE>
__attribute__((optimize("no-unswitch-loops")))
static double rms_run(const OptArgs& a, const OptTensor& t, int64_t begin, int64_t len,
                      const float* __restrict v) {
  using P = ParamT<DT>;
  float fs[kNumScalars];
  for (int k = 0; k < kNumScalars; ++k) fs[k] = a.s.f[k];
  const int flags = a.s.flags;
  OptClipRow ct = CLIP && t.clip ? *t.clip : no_clip_row();
  if (CLIP) identity_row(flags, fs[8], ct.xf);
  const P* __restrict p = (const P*)t.p + begin;
  const P* __restrict g = (const P*)t.g + begin;
  const P* __restrict comp = WB == kWbKahan ? (const P*)t.comp + begin : nullptr;
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) {
    float x = widen<DT>(p[i]);
    if (WB == kWbKahan) x = x + widen<DT>(comp[i]);
    sum += (double)adam_rms_term<CLIP, SPIKE, true>(fs, flags, x, widen<DT>(g[i]), 0.0f, v[i], ct);
  }
  return sum;
}

// The chunk's sum: its second moments decoded block by block (block-wise states only: rank-1
// ones are refused by optim_call).
template <int DT, int WB, int NCODE, bool CLIP, bool SPIKE>
static double rms_chunk(const OptArgs& a, const OptTensor& t, int64_t begin, int64_t len) {
  if (NCODE == 0) return rms_run<DT, WB, CLIP, SPIKE>(a, t, begin, len, (const float*)t.s2 + begin);
  float vbuf[kOptChunk];
  double sum = 0.0;
  for (int64_t b0 = begin; b0 < begin + len; b0 += a.block) {
    const int64_t blen = begin + len - b0 < a.block ? begin + len - b0 : a.block;
    decode_block<NCODE>((const uint8_t*)t.s2, b0, blen, a.code2, t.s2_absmax[b0 / a.block], vbuf);
    sum += rms_run<DT, WB, CLIP, SPIKE>(a, t, b0, blen, vbuf);
  }
  return sum;
}

struct OptWork {
  int tensor;
  int64_t begin;
};

// The statistics pass over the work list: per-chunk sums, added to each tensor's *rms in chunk
// order afterwards, so the result does not depend on the thread schedule.
template <int DT, int WB, int NCODE, bool CLIP, bool SPIKE>
static void rms_all(const OptArgs& a, const std::vector<OptWork>& work, int64_t total) {
  const int64_t nwork = (int64_t)work.size();
  std::vector<double> part(nwork, 0.0);
#pragma omp parallel for schedule(static) if (total >= kParallelMin)
  for (int64_t w = 0; w < nwork; ++w) {
    const OptTensor& t = a.tensors[work[w].tensor];
    const int64_t len = t.n - work[w].begin < kOptChunk ? t.n - work[w].begin : kOptChunk;
    part[w] = rms_chunk<DT, WB, NCODE, CLIP, SPIKE>(a, t, work[w].begin, len);
  }
  for (int64_t w = 0; w < nwork; ++w) *a.tensors[work[w].tensor].rms += part[w];
}

template <int KIND, int DT, int WB, int NST, int NCODE, bool CLIP, bool SPIKE, bool HESS>
static void step_all(const OptimCpuArgs& ca, const std::vector<Rank1Info>& r1) {
  const OptArgs& a = ca.a;
  std::vector<OptWork> work;
  int64_t total = 0;
  for (int t = 0; t < a.ntensors; ++t) {
    for (int64_t b = 0; b < a.tensors[t].n; b += kOptChunk) work.push_back({t, b});
    total += a.tensors[t].n;
  }
  if constexpr (KIND == kAdam && NST == 2 && !HESS) {
    if (a.rms_pass) return rms_all<DT, WB, NCODE, CLIP, SPIKE>(a, work, total);
  }
  const int64_t nwork = (int64_t)work.size();
#pragma omp parallel for schedule(static) if (total >= kParallelMin)
  for (int64_t w = 0; w < nwork; ++w) {
    const OptTensor& t = a.tensors[work[w].tensor];
    const int64_t begin = work[w].begin;
    const int64_t len = t.n - begin < kOptChunk ? t.n - begin : kOptChunk;
    const Rank1Info* ri = t.v_cols ? &r1[work[w].tensor] : nullptr;
    const int64_t nclip =
        step_chunk<KIND, DT, WB, NST, NCODE, CLIP, SPIKE, HESS>(ca, t, ri, begin, len);
    if (CLIP && t.clipped && nclip) {
#pragma omp atomic
      *t.clipped += nclip;
    }
  }
}

// The rank-1 prepass instance for the call's dtype, write-back and decay (see rank1_maxima).
template <int DT, int WB>
static void rank1_prepass(const OptArgs& a, std::vector<Rank1Info>& info,
                          std::vector<float>& inv) {
  const bool kahan = WB == kWbKahan;
  if (a.s.flags & kL2) rank1_maxima<DT, kahan ? kWbKahan : kWbNearest, true>(a, info, inv);
  else rank1_maxima<DT, kWbNearest, false>(a, info, inv);
}

// The step over every tensor; with rank-1 tensors, their prepass before it and the new maxima
// moved into the states after it (the step decodes with the old ones to the very end).
template <int KIND, int DT, int WB, int NST, int NCODE, bool CLIP, bool SPIKE, bool HESS>
static void step_with_rank1(const OptimCpuArgs& ca) {
  const OptArgs& a = ca.a;
  bool any = false;
  for (int ti = 0; ti < a.ntensors; ++ti) any = any || a.tensors[ti].v_cols != 0;
  std::vector<Rank1Info> info(any ? a.ntensors : 0);
  std::vector<float> inv;
  if (KIND == kAdam && NCODE == 16 && any) rank1_prepass<DT, WB>(a, info, inv);
  step_all<KIND, DT, WB, NST, NCODE, CLIP, SPIKE, HESS>(ca, info);
  for (int ti = 0; any && ti < a.ntensors; ++ti) {
    const OptTensor& t = a.tensors[ti];
    if (t.v_cols == 0) continue;
    const int64_t R = t.n / t.v_cols, C = t.v_cols;
    memcpy(t.s2_absmax, t.v_scratch, sizeof(float) * R);
    memcpy(t.s2_colmax, t.v_scratch + R, sizeof(float) * C);
  }
}

// Runtime arguments -> template instance, one level at a time.
template <int KIND, int DT, int WB, int NST, int NCODE, bool CLIP, bool SPIKE, bool HESS>
static void run_layout(const OptimCpuArgs& ca) {
  if (NCODE == 16) step_with_rank1<KIND, DT, WB, NST, NCODE, CLIP, SPIKE, HESS>(ca);
  else step_all<KIND, DT, WB, NST, NCODE, CLIP, SPIKE, HESS>(ca, {});
}

// Three instances: plain, clipping without the spike clip, and (Adam only) with it; Adam
// (AdaHessian) and Sophia have a fourth with the curvature flags (HESS: it reads the Hessian
// estimate of refresh steps).
template <int KIND, int DT, int WB, int NST, int NCODE>
static void by_clip(const OptimCpuArgs& ca) {
  const int flags = ca.a.s.flags;
  if constexpr (KIND == kAdam || KIND == kSophia) {
    if (flags & kCurvFlags) return run_layout<KIND, DT, WB, NST, NCODE, true, false, true>(ca);
  }
  if constexpr (KIND == kAdam) {
    if (flags & kSpikeClip) return run_layout<KIND, DT, WB, NST, NCODE, true, true, false>(ca);
  }
  if (flags & kAnyClip) run_layout<KIND, DT, WB, NST, NCODE, true, false, false>(ca);
  else run_layout<KIND, DT, WB, NST, NCODE, false, false, false>(ca);
}

template <int KIND, int DT, int WB, int NST>
static void by_layout(const OptimCpuArgs& ca) {
  const int ncode = ca.a.state_bits == 32 || NST == 0 ? 0 : ca.a.ncode;
  if (ncode == 256) by_clip<KIND, DT, WB, NST, 256>(ca);
  else if (ncode == 16) by_clip<KIND, DT, WB, NST, 16>(ca);
  else by_clip<KIND, DT, WB, NST, 0>(ca);
}

template <int KIND, int DT, int WB>
static void by_nstates(const OptimCpuArgs& ca) {
  if (KIND == kAdam || KIND == kSophia) by_layout<KIND, DT, WB, 2>(ca);
  else if (ca.a.nstates == 0) by_layout<KIND, DT, WB, 0>(ca);
  else by_layout<KIND, DT, WB, 1>(ca);
}

template <int KIND, int DT>
static void by_writeback(const OptimCpuArgs& ca) {
  switch (ca.a.writeback) {
    case kWbStochastic: return by_nstates<KIND, DT, kWbStochastic>(ca);
    case kWbKahan: return by_nstates<KIND, DT, kWbKahan>(ca);
    default: return by_nstates<KIND, DT, kWbNearest>(ca);
  }
}

template <int KIND>
static void by_dtype(const OptimCpuArgs& ca) {
  switch (ca.a.dtype) {
    case kBF16: return by_writeback<KIND, kBF16>(ca);
    case kF16: return by_writeback<KIND, kF16>(ca);
    default: return by_nstates<KIND, kF32, kWbF32>(ca);
  }
}

void optim_step(const OptimCpuArgs& ca) {
  switch (ca.a.s.kind) {
    case kAdam: return by_dtype<kAdam>(ca);
    case kLion: return by_dtype<kLion>(ca);
    case kSophia: return by_dtype<kSophia>(ca);
    default: return by_dtype<kSgd>(ca);
  }
}

}  // namespace LOWBIT_ISA_NS
}  // namespace cpu
}  // namespace lowbit
