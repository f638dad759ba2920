// Per-tensor gradient statistics in one multi-tensor pass (lowbit::grad_stats): the sum of
// squares of the finite elements and the number of non-finite ones. The optimizers use the count
// to skip steps with inf/NaN gradients, and the norms for telemetry; clipping (issue 4) builds on
// the same pass. Included per ISA after kernels_impl.h.
#include <vector>

namespace lowbit {
namespace cpu {
namespace LOWBIT_ISA_NS {

// Sums of squares in fp32 over runs of 1024 elements (one vectorized loop per run; the in-order
// sum of the vector's lanes at the end of a run is what makes shorter runs slow), added into a
// float64 total: relative error ~1024 * 2^-24 per run. A finite element above ~1.8e19
// overflows its fp32 square to inf; the non-finite count is exact regardless.
template <int DT>
static void stats_run(const void* __restrict g, int64_t begin, int64_t end, double* sumsq,
                      int64_t* nonfinite) {
  double total = 0.0;
  int64_t nbad = 0;
  for (int64_t b = begin; b < end; b += 1024) {
    const int64_t e = b + 1024 < end ? b + 1024 : end;
    float s = 0.0f;
    int32_t bad = 0;
#pragma omp simd reduction(+ : s, bad)
    for (int64_t i = b; i < e; ++i) {
      const float x = load_t<DT>(g, i);
      const bool finite = (f32_bits(x) & 0x7F800000u) != 0x7F800000u;
      bad += finite ? 0 : 1;
      s += finite ? x * x : 0.0f;
    }
    total += (double)s;
    nbad += bad;
  }
  *sumsq = total;
  *nonfinite = nbad;
}

template <int DT>
static void stats_all(const StatsArgs& a) {
  // Work items of up to 64K elements; each item's partial sums land in its own slot, then are
  // added per tensor in item order, so the result does not depend on the thread count.
  const int64_t chunk = 1 << 16;
  std::vector<int64_t> first(a.ntensors + 1, 0);
  for (int t = 0; t < a.ntensors; ++t)
    first[t + 1] = first[t] + (a.n[t] + chunk - 1) / chunk;
  const int64_t nitems = first[a.ntensors];
  std::vector<double> part(nitems);
  std::vector<int64_t> bad(nitems);
  int64_t total = 0;
  for (int t = 0; t < a.ntensors; ++t) total += a.n[t];
#pragma omp parallel for schedule(static) if (total >= kParallelMin)
  for (int64_t w = 0; w < nitems; ++w) {
    int t = 0;
    while (first[t + 1] <= w) ++t;
    const int64_t begin = (w - first[t]) * chunk;
    const int64_t end = begin + chunk < a.n[t] ? begin + chunk : a.n[t];
    stats_run<DT>(a.g[t], begin, end, &part[w], &bad[w]);
  }
  for (int t = 0; t < a.ntensors; ++t) {
    double s = 0.0;
    int64_t b = 0;
    for (int64_t w = first[t]; w < first[t + 1]; ++w) {
      s += part[w];
      b += bad[w];
    }
    a.out[2 * t] = s;
    a.out[2 * t + 1] = (double)b;
  }
}

void grad_stats(const StatsArgs& a) {
  if (a.dtype == kBF16) stats_all<kBF16>(a);
  else if (a.dtype == kF16) stats_all<kF16>(a);
  else stats_all<kF32>(a);
}

}  // namespace LOWBIT_ISA_NS
}  // namespace cpu
}  // namespace lowbit
