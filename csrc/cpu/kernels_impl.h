// Kernel bodies shared by the per-ISA translation units. Included once per ISA inside
// `namespace lowbit::cpu::LOWBIT_ISA_NS`, after that file's `#pragma GCC target`, so the same
// source is vectorized for AVX-512, AVX2 or plain x86-64. The per-element math comes from
// csrc/include/lowbit/*.h, the headers the CUDA kernels use too.
#include <omp.h>
#include "lowbit/formats.h"
#include "lowbit/philox.h"
#include "lowbit/quant.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_ISA_NS {

// Below this many elements a call runs on the calling thread: waking the OpenMP team costs more
// than the work, and far more when the other core is busy.
static const int64_t kParallelMin = 1 << 16;

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
static void nearest16_run(const void* __restrict x, int64_t begin, int64_t len, float am,
                          const float* __restrict mids, uint8_t* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i)
    out[i] = (uint8_t)nearest16(scale_to_unit(load_t<DT>(x, begin + i), am), mids);
}

// Every built-in 256-entry codebook has at most one midpoint per table bucket: one table load
// and at most one comparison per element.
template <int DT>
static void nearest256_run(const void* __restrict x, int64_t begin, int64_t len, float am,
                           const int32_t* __restrict table, const float* __restrict mids,
                           uint8_t* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float y = scale_to_unit(load_t<DT>(x, begin + i), am);
    const int32_t e = table[f32_bits(y) >> 16];
    const int base = e & 0xFFFF;
    // Unconditional (clamped) load so the loop has no control flow; `inside` masks it.
    const float m = mids[base < 254 ? base : 254];
    const int step = ((e >> 16) > 0) & (m < y);
    out[i] = (uint8_t)(base + step);
  }
}

template <int DT>
static void quantize_block(const QuantArgs& a, int64_t b, uint8_t* idx_buf) {
  const int64_t begin = b * a.block;
  const int64_t len = (a.n - begin) < a.block ? (a.n - begin) : a.block;
  const float am = block_absmax<DT>(a.x, begin, len);
  a.absmax[b] = am;
  if (a.stochastic) {
    for (int64_t i = 0; i < len; ++i) {
      const float y = scale_to_unit(load_t<DT>(a.x, begin + i), am);
      const uint32_t r = philox_word0(a.seed, a.offset + (uint64_t)(begin + i));
      idx_buf[i] = (uint8_t)stochastic_index(y, a.code, a.ncode, r);
    }
  } else if (a.ncode == 16) {
    nearest16_run<DT>(a.x, begin, len, am, a.mids, idx_buf);
  } else if (a.lut.max_inside <= 1) {
    nearest256_run<DT>(a.x, begin, len, am, a.lut.table, a.mids, idx_buf);
  } else {
    for (int64_t i = 0; i < len; ++i)
      idx_buf[i] = (uint8_t)nearest256(scale_to_unit(load_t<DT>(a.x, begin + i), am), a.mids,
                                       a.lut);
  }
  if (a.ncode == 16) {
    uint8_t* out = a.codes + begin / 2;  // blocks have even size, so they start on a byte
    const int64_t pairs = len / 2;
#pragma omp simd
    for (int64_t j = 0; j < pairs; ++j)
      out[j] = (uint8_t)((idx_buf[2 * j] << 4) | idx_buf[2 * j + 1]);
    if (len & 1) out[pairs] = (uint8_t)(idx_buf[len - 1] << 4);
  } else {
    uint8_t* out = a.codes + begin;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = idx_buf[i];
  }
}

template <int DT>
static void quantize_all(const QuantArgs& a) {
  const int64_t nblocks = (a.n + a.block - 1) / a.block;
#pragma omp parallel if (a.n >= kParallelMin)
  {
    uint8_t idx_buf[4096];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) quantize_block<DT>(a, b, idx_buf);
  }
}

void quantize_blockwise(const QuantArgs& a) {
  if (a.x_dtype == kBF16) quantize_all<kBF16>(a);
  else if (a.x_dtype == kF16) quantize_all<kF16>(a);
  else quantize_all<kF32>(a);
}

template <int DT, int NCODE>
static void dequantize_all(const DequantArgs& a) {
  const int64_t nblocks = (a.n + a.block - 1) / a.block;
#pragma omp parallel for schedule(static) if (a.n >= kParallelMin)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t begin = b * a.block;
    const int64_t len = (a.n - begin) < a.block ? (a.n - begin) : a.block;
    const float am = a.absmax[b];
    const float* code = a.code;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const int64_t k = begin + i;
      int c;
      if (NCODE == 16) {
        const uint8_t byte = a.codes[k >> 1];
        c = (k & 1) ? (byte & 0xF) : (byte >> 4);
      } else {
        c = a.codes[k];
      }
      const float v = code[c] * am;
      if (DT == kF32) ((float*)a.out)[k] = v;
      else ((uint16_t*)a.out)[k] = (uint16_t)round_to_fmt(f32_bits(v), fmt_of(DT), false, 0u);
    }
  }
}

void dequantize_blockwise(const DequantArgs& a) {
  const bool four = a.ncode == 16;
  if (a.out_dtype == kBF16) four ? dequantize_all<kBF16, 16>(a) : dequantize_all<kBF16, 256>(a);
  else if (a.out_dtype == kF16) four ? dequantize_all<kF16, 16>(a) : dequantize_all<kF16, 256>(a);
  else four ? dequantize_all<kF32, 16>(a) : dequantize_all<kF32, 256>(a);
}

template <int FMT>
static void round_all(const RoundArgs& a) {
  const Fmt f = fmt_of(FMT);
#pragma omp parallel for simd schedule(static) if (a.n >= kParallelMin)
  for (int64_t i = 0; i < a.n; ++i) {
    const uint32_t r = philox_word0(a.seed, a.offset + (uint64_t)i);
    const uint32_t bits = round_to_fmt(f32_bits(a.x[i]), f, true, r);
    if (f.width == 16) ((uint16_t*)a.out)[i] = (uint16_t)bits;
    else ((uint8_t*)a.out)[i] = (uint8_t)bits;
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

}  // namespace LOWBIT_ISA_NS
}  // namespace cpu
}  // namespace lowbit
