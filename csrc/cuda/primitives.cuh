// The complete set of CUDA features lowbit's kernels use. Kernels include this file and nothing
// else from CUDA, so that everything here is everything the simulator (csrc/sim/sim.h) has to
// provide for the same kernel source to run on the CPU:
//   built-ins     threadIdx.x, blockIdx.x, blockDim.x, gridDim.x (1-D launches only)
//   storage       static __shared__ arrays (no dynamic shared memory)
//   sync          __syncthreads(), __shfl_xor_sync, __shfl_down_sync (full-warp masks)
//   launch        LOWBIT_LAUNCH (below), cudaGetLastError
//   atomics       atomicAdd on unsigned long long (rare event counters) and on double (one
//                 per block: per-tensor sums of the update-clipping pass); atomicMax(unsigned
//                 int*, unsigned int) on global and shared memory (maxima of non-negative floats
//                 across threads and blocks, on their bit patterns)
// No other atomics, no cooperative groups, no dynamic parallelism, no textures.
#pragma once
#include <stdint.h>

#if defined(LOWBIT_CUDA_SIM)
#include "sim/sim.h"
#else
#include <cuda_runtime.h>
#endif

// kernel<<<grid, block, smem, stream>>>(args...). `kernel` must be a single token (a kernel name
// or a function-pointer variable): a template-id's commas would split the macro arguments.
#if defined(LOWBIT_CUDA_SIM)
#define LOWBIT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::lowbit_sim::launch(grid, block, smem, stream, kernel, __VA_ARGS__)
#else
#define LOWBIT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace lowbit {
namespace cuda {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // 1024 threads per block

// 64-bit global thread index and grid stride: n may exceed 2^31 elements.
__device__ __forceinline__ int64_t global_thread() {
  return (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return (int64_t)gridDim.x * blockDim.x; }

struct MaxU32 {
  __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const {
    return a > b ? a : b;
  }
};
struct SumF32 {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct SumF64 {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};
struct SumU64 {
  __device__ __forceinline__ uint64_t operator()(uint64_t a, uint64_t b) const { return a + b; }
};

// Butterfly reduction over a full warp: every lane ends with the result. The order of
// combination is fixed, so a float sum is deterministic (max on bit patterns is order-free anyway).
template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Tree reduction towards lane 0 (the other lanes end with partial results).
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce_down(T v, Op op) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = op(v, __shfl_down_sync(kFullMask, v, o));
  return v;
}

// Block-wide reduction; every thread returns the result. blockDim.x must be a multiple of 32.
// `scratch` is __shared__ storage of kMaxWarps + 1 elements. Back-to-back calls on the same
// scratch are safe: a thread can only overwrite scratch[warp] of the next call after passing
// that call's first barrier, which every reader of this call's result must reach first.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T identity, T* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  v = warp_allreduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_allreduce(lane < nwarps ? scratch[lane] : identity, op);
    if (lane == 0) scratch[kMaxWarps] = v;
  }
  __syncthreads();
  return scratch[kMaxWarps];
}

}  // namespace cuda
}  // namespace lowbit
