// Host entry points of the CUDA kernels (csrc/cuda/quant.cu, optim.cu, stats.cu, lowprec.cu),
// on raw pointers. Each enqueues on `stream` and returns the launch status (cudaGetLastError);
// none synchronizes. Shared by bindings_cuda.cpp (nvcc-compiled kernels) and sim/bindings_sim.cpp
// (the same source run by the simulator, where streams are ignored and launches are synchronous).
#pragma once
#include <stdint.h>

#if defined(LOWBIT_CUDA_SIM)
#include "sim/sim.h"
#else
#include <cuda_runtime_api.h>
#endif

#include "lowbit/optim_args.h"
#include "lowbit/stats_args.h"

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

// out: words * n uint32; word w (words in [1, 4]) of counter counter0 + i at out[w * n + i].
cudaError_t philox_words(uint32_t* out, int64_t n, int words, uint64_t seed, uint64_t counter0,
                         cudaStream_t stream);

// ---- csrc/cuda/optim.cu ------------------------------------------------------------------------

// Fused multi-tensor optimizer step (Adam/AdamW, Lion, SGD), bit-identical to
// lowbit::cpu::optim_step and lowbit.reference.optim.fused_step. `a.tensors` is a HOST array of
// a.ntensors entries (the launcher packs it into kernel parameters, so it may be freed once this
// returns); every pointer in it, and the code / mids tables of quantized states, is device
// memory. Quantized states (state_bits 8 with ncode 256, or 4 with ncode 16) need a block that is
// a power of two in [32, 4096]. Unsupported combinations return cudaErrorInvalidValue.
cudaError_t optim_step(const OptArgs& a, cudaStream_t stream);

// ---- csrc/cuda/stats.cu ------------------------------------------------------------------------

// Bytes of device workspace grad_stats needs for tensors of n[0 .. ntensors) elements (one
// partial per work item; 0 when every tensor is empty).
size_t grad_stats_workspace(const int64_t* n, int ntensors);

// Per-tensor statistics (lowbit/stats_args.h), equal to lowbit::cpu::grad_stats and
// lowbit.reference.clip.grad_stats (sums to float64 rounding). `a.g` and `a.n` are HOST arrays
// (packed into kernel parameters, free once this returns); the tensors, a.xform, a.out and
// `workspace` (at least grad_stats_workspace(a.n, a.ntensors) bytes, 8-byte aligned) are device
// memory, and the workspace must stay allocated until the launches on `stream` complete.
// Two launches per chunk of tensors (partials, then their per-tensor combination); no float
// atomics, so the result is the same on every run. Invalid arguments return
// cudaErrorInvalidValue.
cudaError_t grad_stats(const StatsArgs& a, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

// ---- csrc/cuda/lowprec.cu ----------------------------------------------------------------------

// The scaled low-precision quantizers and the block Hadamard rotation: lowbit.ops' lowprec
// contract on the (rows, cols) row-major matrix x (kF32/kBF16/kF16), bit-identical to
// lowbit.backends.reference.lowprec. fmt: lowbit/lowprec.h LpFormat (kLpNone: out = H(x));
// scaling: LpScaling; had_block: 0 or a power of two <= 4096 dividing cols. codes (rows * cols
// bytes), scales (fp32, or e8m0 bytes) and out (x's dtype) may each be null. absmax: zeroed
// device scratch of one float per scale group, laid out like scales (column / tensor scaling and
// rows longer than a tile reduce into it; two launches then). Invalid arguments return
// cudaErrorInvalidValue.
cudaError_t lowprec(const void* x, int x_dtype, int64_t rows, int64_t cols, int fmt, int scaling,
                    int block_size, bool e8m0, bool stochastic, uint64_t seed, uint64_t offset,
                    int had_block, uint8_t* codes, void* scales, void* out, float* absmax,
                    cudaStream_t stream);

}  // namespace cuda
}  // namespace lowbit
