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
#include <type_traits>
#include <vector>

#include "lowbit/optim_math.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_ISA_NS {

// Work unit: a multiple of every state block size (<= 4096, powers of two).
static const int64_t kOptChunk = 4096;

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
// computed by update_run on the way).
template <int NCODE>
static void encode_block(const float* vals, int64_t begin, int64_t len, uint32_t am_bits,
                         const float* mids, const NearestLut& lut, uint8_t* codes,
                         float* absmax_slot, uint8_t* idx_buf) {
  const float am = bits_f32(am_bits);
  *absmax_slot = am;
  uint8_t* out = codes + (NCODE == 16 ? begin / 2 : begin);
  encode_nearest<kF32>(vals, 0, len, unit_scale(am), NCODE, mids, lut, out, false, idx_buf);
}

// Parameter storage type: fp32, or the raw bits of bf16 / fp16.
template <int DT>
using ParamT = typename std::conditional<DT == kF32, float, uint16_t>::type;

template <int DT>
static inline float widen(ParamT<DT> h) {
  if (DT == kF32) return (float)h;
  return DT == kBF16 ? bf16_to_f32((uint16_t)h) : f16_to_f32((uint16_t)h);
}

// The rule over elements [begin, begin+len) of tensor t. m/v: the states of these elements (fp32
// arrays, or the dequantized block buffers), updated in place; mx_m/mx_v: the largest |bits| of
// the new m/v (their block absmax, for quantized states), found in the same pass.
// Every array is a typed __restrict pointer to the run's first element. No loop unswitching:
// gcc would otherwise split the loop on each runtime flag (maximize, decay, ...) and fail to
// vectorize most of the copies; as selects, the flags cost a blend each.
// CLIP / SPIKE: the rule with the clipping steps / the spike clip (update_rule); the clipped
// elements are counted into *nclip.
template <int KIND, int DT, int WB, int NST, bool CLIP, bool SPIKE>
__attribute__((optimize("no-unswitch-loops")))
static void update_run(const OptArgs& a, const OptTensor& t, int64_t begin, int64_t len,
                       float* __restrict m, float* __restrict v, uint32_t* mx_m, uint32_t* mx_v,
                       int64_t* nclip) {
  using P = ParamT<DT>;
  uint32_t rbuf[kOptChunk];
  // (runs start at multiples of 32 elements: whole Philox counters)
  if (WB == kWbStochastic) fill_philox4(t.key, (uint64_t)begin, len, rbuf);
  float fs[kNumScalars];
  for (int k = 0; k < kNumScalars; ++k) fs[k] = a.s.f[k];
  const int flags = a.s.flags;
  const ClipTensor ct = CLIP && t.clip ? *t.clip : ClipTensor{1.0f, 0.0f, 1.0f, 1.0f};
  P* __restrict p = (P*)t.p + begin;
  const P* __restrict g = (const P*)t.g + begin;
  P* __restrict comp = WB == kWbKahan ? (P*)t.comp + begin : nullptr;
  const uint32_t* __restrict r = rbuf;
  const Fmt fmt = fmt_of(DT);
  uint32_t max1 = 0, max2 = 0;
  int32_t clipped = 0;  // (runs are at most kOptChunk elements)
#pragma omp simd reduction(max : max1, max2) reduction(+ : clipped)
  for (int64_t i = 0; i < len; ++i) {
    float x = widen<DT>(p[i]);
    if (WB == kWbKahan) x = x + widen<DT>(comp[i]);
    float s1 = NST >= 1 ? m[i] : 0.0f, s2 = NST >= 2 ? v[i] : 0.0f;
    const bool c = update_rule<KIND, CLIP, SPIKE>(fs, flags, x, widen<DT>(g[i]), s1, s2, ct);
    if (CLIP) clipped += c ? 1 : 0;
    if (NST >= 1) m[i] = s1;
    if (NST >= 2) v[i] = s2;
    const uint32_t b1 = abs_bits(s1), b2 = abs_bits(s2);
    max1 = b1 > max1 ? b1 : max1;
    max2 = b2 > max2 ? b2 : max2;
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
  *mx_m = max1;
  *mx_v = max2;
  *nclip += clipped;
}

// Returns the number of clipped elements of the chunk.
template <int KIND, int DT, int WB, int NST, int NCODE, bool CLIP, bool SPIKE>
static int64_t step_chunk(const OptimCpuArgs& ca, const OptTensor& t, int64_t begin,
                          int64_t len) {
  const OptArgs& a = ca.a;
  int64_t nclip = 0;
  if (NCODE == 0) {  // fp32 states (or none): update in place
    float* m = NST >= 1 ? (float*)t.s1 + begin : nullptr;
    float* v = NST >= 2 ? (float*)t.s2 + begin : nullptr;
    uint32_t unused1, unused2;
    update_run<KIND, DT, WB, NST, CLIP, SPIKE>(a, t, begin, len, m, v, &unused1, &unused2,
                                               &nclip);
    return nclip;
  }
  float mbuf[kOptChunk], vbuf[kOptChunk];
  uint8_t idx_buf[kOptChunk];
  const int64_t block = a.block;
  for (int64_t b0 = begin; b0 < begin + len; b0 += block) {
    const int64_t blen = begin + len - b0 < block ? begin + len - b0 : block;
    const int64_t b = b0 / block;
    const uint8_t* c1 = (const uint8_t*)t.s1;
    const uint8_t* c2 = (const uint8_t*)t.s2;
    if (NST >= 1) decode_block<NCODE>(c1, b0, blen, a.code1, t.s1_absmax[b], mbuf);
    if (NST >= 2) decode_block<NCODE>(c2, b0, blen, a.code2, t.s2_absmax[b], vbuf);
    uint32_t am1, am2;
    update_run<KIND, DT, WB, NST, CLIP, SPIKE>(a, t, b0, blen, mbuf, vbuf, &am1, &am2, &nclip);
    if (NST >= 1)
      encode_block<NCODE>(mbuf, b0, blen, am1, a.mids1, ca.lut1, (uint8_t*)t.s1,
                          &t.s1_absmax[b], idx_buf);
    if (NST >= 2)
      encode_block<NCODE>(vbuf, b0, blen, am2, a.mids2, ca.lut2, (uint8_t*)t.s2,
                          &t.s2_absmax[b], idx_buf);
  }
  return nclip;
}

struct OptWork {
  int tensor;
  int64_t begin;
};

template <int KIND, int DT, int WB, int NST, int NCODE, bool CLIP, bool SPIKE>
static void step_all(const OptimCpuArgs& ca) {
  const OptArgs& a = ca.a;
  std::vector<OptWork> work;
  int64_t total = 0;
  for (int t = 0; t < a.ntensors; ++t) {
    for (int64_t b = 0; b < a.tensors[t].n; b += kOptChunk) work.push_back({t, b});
    total += a.tensors[t].n;
  }
  const int64_t nwork = (int64_t)work.size();
#pragma omp parallel for schedule(static) if (total >= kParallelMin)
  for (int64_t w = 0; w < nwork; ++w) {
    const OptTensor& t = a.tensors[work[w].tensor];
    const int64_t begin = work[w].begin;
    const int64_t len = t.n - begin < kOptChunk ? t.n - begin : kOptChunk;
    const int64_t nclip = step_chunk<KIND, DT, WB, NST, NCODE, CLIP, SPIKE>(ca, t, begin, len);
    if (CLIP && t.clipped && nclip) {
#pragma omp atomic
      *t.clipped += nclip;
    }
  }
}

// Runtime arguments -> template instance, one level at a time.
// Three instances: plain, clipping without the spike clip, and (Adam only) with it.
template <int KIND, int DT, int WB, int NST, int NCODE>
static void by_clip(const OptimCpuArgs& ca) {
  const int flags = ca.a.s.flags;
  if constexpr (KIND == kAdam) {
    if (flags & kSpikeClip) return step_all<KIND, DT, WB, NST, NCODE, true, true>(ca);
  }
  if (flags & kAnyClip) step_all<KIND, DT, WB, NST, NCODE, true, false>(ca);
  else step_all<KIND, DT, WB, NST, NCODE, false, false>(ca);
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
  if (KIND == kAdam) by_layout<KIND, DT, WB, 2>(ca);
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
    default: return by_dtype<kSgd>(ca);
  }
}

}  // namespace LOWBIT_ISA_NS
}  // namespace cpu
}  // namespace lowbit
