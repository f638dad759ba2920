// Per-tensor gradient statistics in one multi-tensor pass (lowbit::grad_stats): the numbers of
// non-finite and of NaN elements of the gradient, and the sum of squares and the largest
// magnitude of its finite elements — as they are, or after the clip transform
// (lowbit/clip_math.h: value clip before a norm clip, Stable-SPAM's norm after AdaClip). The optimizers skip steps on the
// non-finite count; the clipping policies (lowbit.clip) turn the sums and maxima into their
// coefficients. Included per ISA after kernels_impl.h.
#include <vector>

namespace lowbit {
namespace cpu {
namespace LOWBIT_ISA_NS {

#if defined(LOWBIT_ISA_AVX512)
// clip_transform (lowbit/clip_math.h) on 16 lanes: the same single-rounded operations; ordered
// comparisons are false for NaN, so NaN lanes pass through as in the scalar definition.
static inline __m512 clip_transform16(__m512 x, int flags, float cv, ClipTensor xf) {
  if (flags & kValueClip) {
    const __m512 hi = _mm512_set1_ps(cv), lo = _mm512_set1_ps(-cv);
    x = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), hi);
    x = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), lo);
  }
  if (flags & kTensorScale) x = _mm512_mul_ps(x, _mm512_set1_ps(xf.s));
  if (flags & kAdaClip) {
    const __mmask16 over =
        _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(xf.thr), _CMP_GT_OQ);
    x = _mm512_mask_mul_ps(x, over, x, _mm512_set1_ps(xf.r));
  }
  if (flags & kNormScale) x = _mm512_mul_ps(x, _mm512_set1_ps(xf.k));
  return x;
}
#endif

struct StatsPart {
  double sumsq;
  int64_t bad, nan;
  uint32_t max_bits;
};

// One tensor's capture target (StatsArgs): elements with |g| > tau get a slot of `row` from the
// tensor's counter. Rare by construction (tau is near the largest |g| of recent steps), so an
// atomic per captured element costs nothing measurable.
struct Capture {
  float tau;
  int64_t* count;
  float* row;
  int64_t capacity;

  void add(float a) const {
    int64_t slot;
#pragma omp atomic capture
    slot = (*count)++;
    if (slot < capacity) row[slot] = a;
  }
};

// One work item. Squares are taken in float64, where the square of an fp32 value is exact, and
// added in float64: the sum differs from any other order only by float64 rounding (relative
// ~1e-12 for 64K elements), so the fp32 clip coefficients derived from it agree between
// backends. The maximum and the counts are exact.
template <int DT, bool XF, bool CAP>
static StatsPart stats_run(const void* __restrict g, int64_t begin, int64_t end, int flags,
                           float cv, ClipTensor xf, const Capture& cap) {
#if defined(LOWBIT_ISA_AVX512)
  const __m512i floor_bits = _mm512_set1_epi32((int)capture_floor_bits(cap.tau));
  // gcc vectorizes the mixed float/double/count reduction below poorly (2.5x slower than this)
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  __m512i mx = _mm512_setzero_si512(), bad = _mm512_setzero_si512(), nan = bad;
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i inf_bits = _mm512_set1_epi32(0x7F800000);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const char* gbytes = (const char*)g;
  const int64_t esz = DT == kF32 ? 4 : 2;
  for (int64_t i = begin; i < end; i += 16) {
    // (one prefetch per cache line: kPrefetchAhead)
    if (((i * esz) & 63) == 0) _mm_prefetch(gbytes + i * esz + kPrefetchAhead, _MM_HINT_T0);
    const __mmask16 m = tail_mask(end - i);
    const __m512 raw = load16<DT>(g, i, m);
    const __m512i ra = _mm512_and_si512(_mm512_castps_si512(raw), abs_mask);
    const __mmask16 finite = _mm512_mask_cmplt_epu32_mask(m, ra, inf_bits);
    if (CAP) {
      const __mmask16 above = _mm512_mask_cmpge_epu32_mask(finite, ra, floor_bits);
      if (__builtin_expect(above != 0, 0)) {
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, _mm512_castsi512_ps(ra));
        for (int j = 0; j < 16; ++j)
          if (above >> j & 1) cap.add(lanes[j]);
      }
    }
    bad = _mm512_mask_add_epi32(bad, m & ~finite, bad, one);
    nan = _mm512_mask_add_epi32(nan, _mm512_mask_cmpgt_epu32_mask(m, ra, inf_bits), nan, one);
    // a finite value stays finite through the transform (clamps and scales by finite factors)
    const __m512 x = XF ? clip_transform16(raw, flags, cv, xf) : raw;
    const __m512i a = XF ? _mm512_and_si512(_mm512_castps_si512(x), abs_mask) : ra;
    mx = _mm512_mask_max_epu32(mx, finite, mx, a);
    const __m512 f = _mm512_maskz_mov_ps(finite, x);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
    s0 = _mm512_fmadd_pd(lo, lo, s0);  // exact squares: the fma rounds like the separate add
    s1 = _mm512_fmadd_pd(hi, hi, s1);
  }
  return {_mm512_reduce_add_pd(_mm512_add_pd(s0, s1)), _mm512_reduce_add_epi32(bad),
          _mm512_reduce_add_epi32(nan), (uint32_t)_mm512_reduce_max_epu32(mx)};
#else
  double s = 0.0;
  int64_t bad = 0, nan = 0;
  uint32_t mx = 0;
#pragma omp simd reduction(+ : s, bad, nan) reduction(max : mx)
  for (int64_t i = begin; i < end; ++i) {
    const float raw = load_t<DT>(g, i);
    const uint32_t ra = abs_bits(raw);
    const bool finite = ra < 0x7F800000u;
    bad += finite ? 0 : 1;
    nan += ra > 0x7F800000u ? 1 : 0;
    bool unused;
    const float x = XF ? clip_transform(raw, flags, cv, xf, unused) : raw;
    const uint32_t a = abs_bits(x);
    const double d = finite ? (double)x : 0.0;
    s += d * d;
    mx = finite && a > mx ? a : mx;
  }
  if (CAP) {  // (a second, scalar look at the chunk: the fallback clones only)
    const uint32_t lo = capture_floor_bits(cap.tau);
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t ra = abs_bits(load_t<DT>(g, i));
      if (ra < 0x7F800000u && ra >= lo) cap.add(bits_f32(ra));
    }
  }
  return {s, bad, nan, mx};
#endif
}

template <int DT, bool XF>
static void stats_all(const StatsArgs& a) {
  // Work items of up to 64K elements; each item's partials land in its own slot, then are
  // combined per tensor in item order, so the result does not depend on the thread count.
  const int64_t chunk = 1 << 16;
  std::vector<int64_t> first(a.ntensors + 1, 0);
  for (int t = 0; t < a.ntensors; ++t)
    first[t + 1] = first[t] + (a.n[t] + chunk - 1) / chunk;
  const int64_t nitems = first[a.ntensors];
  std::vector<StatsPart> part(nitems);
  int64_t total = 0;
  for (int t = 0; t < a.ntensors; ++t) total += a.n[t];
#pragma omp parallel for schedule(static) if (total >= kParallelMin)
  for (int64_t w = 0; w < nitems; ++w) {
    int t = 0;
    while (first[t + 1] <= w) ++t;
    const int64_t begin = (w - first[t]) * chunk;
    const int64_t end = begin + chunk < a.n[t] ? begin + chunk : a.n[t];
    const ClipTensor xf = XF && a.xform ? a.xform[t] : ClipTensor{1.0f, 0.0f, 1.0f, 1.0f};
    if (a.tau) {
      const Capture cap{a.tau[t], a.over_count + t, a.over + t * a.capacity, a.capacity};
      part[w] = stats_run<DT, XF, true>(a.g[t], begin, end, a.flags, a.cv, xf, cap);
    } else {
      part[w] = stats_run<DT, XF, false>(a.g[t], begin, end, a.flags, a.cv, xf, Capture{});
    }
  }
  for (int t = 0; t < a.ntensors; ++t) {
    StatsPart acc{0.0, 0, 0, 0};
    for (int64_t w = first[t]; w < first[t + 1]; ++w) {
      acc.sumsq += part[w].sumsq;
      acc.bad += part[w].bad;
      acc.nan += part[w].nan;
      acc.max_bits = part[w].max_bits > acc.max_bits ? part[w].max_bits : acc.max_bits;
    }
    double* o = a.out + 4 * t;
    o[0] = acc.sumsq;
    o[1] = (double)acc.bad;
    o[2] = (double)bits_f32(acc.max_bits);
    o[3] = (double)acc.nan;
  }
}

template <int DT>
static void stats_dtype(const StatsArgs& a) {
  if (a.flags != 0) stats_all<DT, true>(a);
  else stats_all<DT, false>(a);
}

void grad_stats(const StatsArgs& a) {
  if (a.dtype == kBF16) stats_dtype<kBF16>(a);
  else if (a.dtype == kF16) stats_dtype<kF16>(a);
  else stats_dtype<kF32>(a);
}

}  // namespace LOWBIT_ISA_NS
}  // namespace cpu
}  // namespace lowbit
