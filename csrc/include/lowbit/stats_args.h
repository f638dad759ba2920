// The argument block of the gradient-statistics pass (lowbit::grad_stats), shared by the CPU
// kernel (csrc/cpu/stats_impl.h), the CUDA launcher (csrc/cuda/stats.cu) and the three pybind11
// modules (csrc/stats_lists.h builds it). Host-side only; plain data so nvcc and gcc agree on it.
#pragma once
#include <stdint.h>

#include "clip_math.h"
#include "quant.h"

namespace lowbit {

// Per-tensor statistics of a list of tensors of one dtype: out[4t .. 4t+3] = sum of squares of
// the finite elements, number of inf/NaN elements, largest finite |element|, number of NaN
// elements; the sum and the maximum of the finite elements after the optional clip transform
// (lowbit/clip_math.h; xform: [ntensors] ClipTensor, or null when flags has no per-tensor step).
// `g` and `n` are host arrays; for CUDA the tensors, xform and out are device memory.
// Capture (tau non-null; flags 0, lowbit.reference.clip): the finite elements of tensor t with
// |g| > tau[t] are counted into over_count[t], and |g| of up to `capacity` of them stored in
// over[t * capacity ...] (device memory for CUDA, like tau).
struct StatsArgs {
  const void* const* g;
  const int64_t* n;
  int ntensors;
  int dtype;
  const ClipTensor* xform;
  float cv;
  int flags;
  double* out;
  const float* tau;
  float* over;
  int64_t* over_count;
  int64_t capacity;
};

// The capture's test on bit patterns: for finite g, |g| > tau exactly when abs_bits(g) >=
// capture_floor_bits(tau) (finite magnitudes order like their bits). A negative tau takes every
// finite element, -0 the nonzero ones, +inf and NaN none.
LOWBIT_HD uint32_t capture_floor_bits(float tau) {
  return tau < 0.0f ? 0u : abs_bits(tau) + 1u;
}

// The flags the statistics pass understands: the clip transform's steps, nothing else.
constexpr int kStatsFlags = kValueClip | kTensorScale | kAdaClip | kNormScale;
// The steps that read the per-tensor ClipTensor row.
constexpr int kStatsRowFlags = kTensorScale | kAdaClip | kNormScale;

}  // namespace lowbit
