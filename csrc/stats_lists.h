// Marshalling shared by the three pybind11 modules (_C, _C_cuda, _C_sim) for the statistics pass:
// Python passes a list of data_ptr()s and element counts; this checks them and builds the
// StatsArgs of lowbit/stats_args.h. Header-only, no pybind11.
#pragma once
#include <stdexcept>
#include <stdint.h>
#include <vector>

#include "lowbit/formats.h"
#include "lowbit/stats_args.h"

namespace lowbit {

// Owns the pointer array a StatsArgs points into.
struct StatsCall {
  std::vector<const void*> g;
  StatsArgs args{};
};

// g, numel: one entry per tensor (all of `dtype`); xform: fp32 [n, 4] rows (ClipTensor) or 0;
// out: float64 [n, 4]; tau (fp32 [n]) or 0, over (fp32 [n, capacity]), over_count (int64 [n]):
// the capture. The arrays must outlive the call that uses c.args.
inline void stats_call(StatsCall& c, const std::vector<uintptr_t>& g,
                       const std::vector<int64_t>& numel, int dtype, uintptr_t xform, double cv,
                       int flags, uintptr_t out, uintptr_t tau, uintptr_t over,
                       uintptr_t over_count, int64_t capacity) {
  if (g.size() != numel.size()) throw std::invalid_argument("grad_stats: list lengths differ");
  if ((flags & ~kStatsFlags) != 0)
    throw std::invalid_argument("grad_stats: flags other than the clip transform's");
  if ((flags & kStatsRowFlags) != 0 && xform == 0)
    throw std::invalid_argument("grad_stats: the transform flags need the per-tensor table");
  if (dtype != kF32 && dtype != kBF16 && dtype != kF16)
    throw std::invalid_argument("grad_stats: gradients must be fp32, bf16 or fp16");
  if (tau != 0 && (flags != 0 || over == 0 || over_count == 0 || capacity < 0))
    throw std::invalid_argument(
        "grad_stats: the capture (tau) needs flags 0, over, over_count and capacity >= 0");
  c.g.resize(g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    if (numel[i] < 0) throw std::invalid_argument("grad_stats: negative element count");
    c.g[i] = reinterpret_cast<const void*>(g[i]);
  }
  c.args = StatsArgs{c.g.data(), numel.data(), (int)g.size(), dtype,
                     reinterpret_cast<const ClipTensor*>(xform), (float)cv, flags,
                     reinterpret_cast<double*>(out), reinterpret_cast<const float*>(tau),
                     reinterpret_cast<float*>(over), reinterpret_cast<int64_t*>(over_count),
                     capacity};
}

}  // namespace lowbit
