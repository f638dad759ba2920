// Host entry points of the CUDA kernels (csrc/cuda/quant.cu, csrc/cuda/optim.cu), on raw
// pointers. Each enqueues on `stream` and returns the launch status (cudaGetLastError); none
// synchronizes. Shared by bindings_cuda.cpp (nvcc-compiled kernels) and sim/bindings_sim.cpp (the
// same source run by the simulator, where streams are ignored and launches are synchronous).
#pragma once
#include <stdint.h>

#if defined(LOWBIT_CUDA_SIM)
#include "sim/sim.h"
#else
#include <cuda_runtime_api.h>
#endif

#include "lowbit/optim_args.h"

namespace lowbit {
namespace cuda {

// x: n elements of dtype x_dtype (kF32/kBF16/kF16); block: power of two in [32, 4096];
// code: ncode (16 or 256) sorted floats; mids: ncode - 1 midpoints; codes: n bytes (ncode 256)
// or ceil(n/2) bytes (ncode 16); absmax: ceil(n / block) floats.
cudaError_t quantize_blockwise(const void* x, int x_dtype, int64_t n, int block, const float* code,
                               const float* mids, int ncode, uint8_t* codes, float* absmax,
                               bool stochastic, uint64_t seed, uint64_t offset,
                               cudaStream_t stream);

// out: n elements of dtype out_dtype (kF32/kBF16/kF16).
cudaError_t dequantize_blockwise(const uint8_t* codes, const float* absmax, const float* code,
                                 int ncode, int64_t n, int block, void* out, int out_dtype,
                                 cudaStream_t stream);

// out: n elements of fmt (kBF16/kF16: 2 bytes, kE4M3FN/kE5M2: 1 byte).
cudaError_t stochastic_round(const float* x, int64_t n, void* out, int fmt, uint64_t seed,
                             uint64_t offset, cudaStream_t stream);

// ---- csrc/cuda/optim.cu ------------------------------------------------------------------------

// Fused multi-tensor optimizer step (Adam/AdamW, Lion, SGD), bit-identical to
// lowbit::cpu::optim_step and lowbit.reference.optim.fused_step. `a.tensors` is a HOST array of
// a.ntensors entries (the launcher packs it into kernel parameters, so it may be freed once this
// returns); every pointer in it, and the code / mids tables of quantized states, is device
// memory. Quantized states (state_bits 8 with ncode 256, or 4 with ncode 16) need a block that is
// a power of two in [32, 4096]. Unsupported combinations return cudaErrorInvalidValue.
cudaError_t optim_step(const OptArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace lowbit
