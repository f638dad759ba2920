// CUDA kernels for block-wise quantization, dequantization and stochastic rounding. All
// per-element math comes from csrc/include/lowbit/*.h, the same code the CPU kernels and the
// simulator run, so the results are bit-identical to lowbit._C and to the torch reference;
// these kernels only add the parallel structure (reductions, indexing, packing).
#include "cuda/launchers.h"
#include "cuda/primitives.cuh"
#include "lowbit/formats.h"
#include "lowbit/philox.h"
#include "lowbit/quant.h"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kQuantThreads = 256;  // threads per quantization block (fewer for blocks < 256)
constexpr int kEltThreads = 256;    // threads per CUDA block of the element-wise kernels
constexpr int64_t kMaxEltBlocks = 65536;  // grid cap of the element-wise kernels (grid-stride)

template <int DT>
__device__ __forceinline__ float load(const void* x, int64_t i) { return load_f32(x, DT, i); }

// Index of the code for element k (global index, for the Philox counter) of a block whose absmax
// scales by `inv` (unit_scale of its absmax). Tables are in shared memory.
template <int DT, int NC, bool STOCH>
__device__ __forceinline__ int code_index(const void* x, int64_t k, float inv, const float* s_code,
                                          const float* s_mids, uint64_t seed, uint64_t offset) {
  const float y = scale_to_unit(load<DT>(x, k), inv);
  if (STOCH) return stochastic_index(y, s_code, NC, philox_word0(seed, offset + (uint64_t)k));
  return nearest_index(y, s_mids, NC - 1);
}

// One CUDA block per quantization block. Each thread handles a strided subset of the block's
// elements (4-bit: of its element pairs, so that one thread writes each packed byte).
template <int DT, int NC, bool STOCH>
__global__ void __launch_bounds__(kQuantThreads)
quantize_kernel(const void* __restrict__ x, int64_t n, int block, const float* __restrict__ code,
                const float* __restrict__ mids, uint8_t* __restrict__ codes,
                float* __restrict__ absmax, uint64_t seed, uint64_t offset) {
  __shared__ float s_code[NC];
  __shared__ float s_mids[NC];
  __shared__ uint32_t s_red[kMaxWarps + 1];
  const int t = threadIdx.x, nt = blockDim.x;
  const int64_t b = blockIdx.x;
  const int64_t begin = b * block;
  const int len = (int)(n - begin < block ? n - begin : block);

  // The binary searches hit the tables at data-dependent places: stage them in shared memory.
  // They are published by the barriers inside the reduction below.
  for (int k = t; k < NC; k += nt) {
    if (STOCH) s_code[k] = code[k];
    else if (k < NC - 1) s_mids[k] = mids[k];
  }

  // absmax = max of |x| as fp32 bit patterns: integer max, exact and order-independent (and a
  // NaN's bits exceed every finite value's, so NaN propagates as the spec requires).
  uint32_t m = 0;
  for (int i = t; i < len; i += nt) m = MaxU32()(m, abs_bits(load<DT>(x, begin + i)));
  m = block_allreduce(m, MaxU32(), 0u, s_red);
  const float am = bits_f32(m);
  if (t == 0) absmax[b] = am;
  const float inv = unit_scale(am);

  if (NC == 16) {
    // Element 2j in the high nibble, 2j+1 in the low one; an odd tail gets a 0 low nibble.
    // Blocks have even size, so each block starts on a byte.
    uint8_t* out = codes + begin / 2;
    for (int p = t; 2 * p < len; p += nt) {
      const int64_t k = begin + 2 * p;
      const int hi = code_index<DT, NC, STOCH>(x, k, inv, s_code, s_mids, seed, offset);
      const int lo = 2 * p + 1 < len
                         ? code_index<DT, NC, STOCH>(x, k + 1, inv, s_code, s_mids, seed, offset)
                         : 0;
      out[p] = (uint8_t)((hi << 4) | lo);
    }
  } else {
    for (int i = t; i < len; i += nt)
      codes[begin + i] =
          (uint8_t)code_index<DT, NC, STOCH>(x, begin + i, inv, s_code, s_mids, seed, offset);
  }
}

// value = code[c] * absmax[block] in fp32 (canonical NaN), stored with nearest-even.
template <int DT, int NC>
__global__ void __launch_bounds__(kEltThreads)
dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                  const float* __restrict__ code, int64_t n, int block, void* __restrict__ out) {
  __shared__ float s_code[NC];
  for (int k = threadIdx.x; k < NC; k += blockDim.x) s_code[k] = code[k];
  __syncthreads();
  for (int64_t k = global_thread(); k < n; k += grid_stride()) {
    int c;
    if (NC == 16) {
      const uint8_t byte = codes[k >> 1];
      c = (k & 1) ? (byte & 0xF) : (byte >> 4);
    } else {
      c = codes[k];
    }
    store_rne(out, DT, k, dequant_value(s_code[c], absmax[k / block]));
  }
}

template <int FMT>
__global__ void __launch_bounds__(kEltThreads)
stochastic_round_kernel(const float* __restrict__ x, int64_t n, void* __restrict__ out,
                        uint64_t seed, uint64_t offset) {
  const Fmt f = fmt_of(FMT);
  for (int64_t i = global_thread(); i < n; i += grid_stride()) {
    const uint32_t r = philox_word0(seed, offset + (uint64_t)i);
    const uint32_t bits = round_to_fmt(f32_bits(x[i]), f, true, r);
    if (f.width == 16) ((uint16_t*)out)[i] = (uint16_t)bits;
    else ((uint8_t*)out)[i] = (uint8_t)bits;
  }
}

__global__ void __launch_bounds__(kEltThreads)
philox_words_kernel(uint32_t* __restrict__ out, int64_t n, int words, uint64_t seed,
                    uint64_t counter0) {
  for (int64_t i = global_thread(); i < n; i += grid_stride()) {
    const Philox4 r = philox4x32_10(seed, counter0 + (uint64_t)i);
    for (int w = 0; w < words; ++w) out[w * n + i] = r.w[w];
  }
}

int64_t elt_blocks(int64_t n) {
  const int64_t b = (n + kEltThreads - 1) / kEltThreads;
  return b < kMaxEltBlocks ? b : kMaxEltBlocks;
}

template <int DT, int NC, bool STOCH>
cudaError_t launch_quantize(const void* x, int64_t n, int block, const float* code,
                            const float* mids, uint8_t* codes, float* absmax, uint64_t seed,
                            uint64_t offset, cudaStream_t stream) {
  const int64_t nblocks = (n + block - 1) / block;
  if (nblocks > 0x7FFFFFFF) return cudaErrorInvalidValue;  // gridDim.x limit (n > 2^36)
  const dim3 grid((unsigned)nblocks);
  const dim3 threads(block < kQuantThreads ? block : kQuantThreads);
  auto kernel = quantize_kernel<DT, NC, STOCH>;
  LOWBIT_LAUNCH(kernel, grid, threads, 0, stream, x, n, block, code, mids, codes, absmax, seed,
                offset);
  return cudaGetLastError();
}

template <int DT, int NC>
cudaError_t quantize_dispatch_stoch(const void* x, int64_t n, int block, const float* code,
                                    const float* mids, uint8_t* codes, float* absmax,
                                    bool stochastic, uint64_t seed, uint64_t offset,
                                    cudaStream_t stream) {
  return stochastic
             ? launch_quantize<DT, NC, true>(x, n, block, code, mids, codes, absmax, seed, offset,
                                             stream)
             : launch_quantize<DT, NC, false>(x, n, block, code, mids, codes, absmax, seed, offset,
                                              stream);
}

template <int DT>
cudaError_t quantize_dispatch_nc(const void* x, int64_t n, int block, const float* code,
                                 const float* mids, int ncode, uint8_t* codes, float* absmax,
                                 bool stochastic, uint64_t seed, uint64_t offset,
                                 cudaStream_t stream) {
  if (ncode == 16)
    return quantize_dispatch_stoch<DT, 16>(x, n, block, code, mids, codes, absmax, stochastic,
                                           seed, offset, stream);
  return quantize_dispatch_stoch<DT, 256>(x, n, block, code, mids, codes, absmax, stochastic,
                                          seed, offset, stream);
}

template <int DT, int NC>
cudaError_t launch_dequantize(const uint8_t* codes, const float* absmax, const float* code,
                              int64_t n, int block, void* out, cudaStream_t stream) {
  auto kernel = dequantize_kernel<DT, NC>;
  LOWBIT_LAUNCH(kernel, dim3((unsigned)elt_blocks(n)), dim3(kEltThreads), 0, stream, codes,
                absmax, code, n, block, out);
  return cudaGetLastError();
}

template <int DT>
cudaError_t dequantize_dispatch_nc(const uint8_t* codes, const float* absmax, const float* code,
                                   int ncode, int64_t n, int block, void* out,
                                   cudaStream_t stream) {
  return ncode == 16 ? launch_dequantize<DT, 16>(codes, absmax, code, n, block, out, stream)
                     : launch_dequantize<DT, 256>(codes, absmax, code, n, block, out, stream);
}

template <int FMT>
cudaError_t launch_round(const float* x, int64_t n, void* out, uint64_t seed, uint64_t offset,
                         cudaStream_t stream) {
  auto kernel = stochastic_round_kernel<FMT>;
  LOWBIT_LAUNCH(kernel, dim3((unsigned)elt_blocks(n)), dim3(kEltThreads), 0, stream, x, n, out,
                seed, offset);
  return cudaGetLastError();
}

bool valid_block(int block) { return block >= 32 && block <= 4096 && (block & (block - 1)) == 0; }

}  // namespace

cudaError_t quantize_blockwise(const void* x, int x_dtype, int64_t n, int block, const float* code,
                               const float* mids, int ncode, uint8_t* codes, float* absmax,
                               bool stochastic, uint64_t seed, uint64_t offset,
                               cudaStream_t stream) {
  if (!valid_block(block) || (ncode != 16 && ncode != 256) || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;  // an empty grid is an invalid configuration on CUDA
  switch (x_dtype) {
    case kF32:
      return quantize_dispatch_nc<kF32>(x, n, block, code, mids, ncode, codes, absmax,
                                        stochastic, seed, offset, stream);
    case kBF16:
      return quantize_dispatch_nc<kBF16>(x, n, block, code, mids, ncode, codes, absmax,
                                         stochastic, seed, offset, stream);
    case kF16:
      return quantize_dispatch_nc<kF16>(x, n, block, code, mids, ncode, codes, absmax,
                                        stochastic, seed, offset, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t dequantize_blockwise(const uint8_t* codes, const float* absmax, const float* code,
                                 int ncode, int64_t n, int block, void* out, int out_dtype,
                                 cudaStream_t stream) {
  if (!valid_block(block) || (ncode != 16 && ncode != 256) || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  switch (out_dtype) {
    case kF32:
      return dequantize_dispatch_nc<kF32>(codes, absmax, code, ncode, n, block, out, stream);
    case kBF16:
      return dequantize_dispatch_nc<kBF16>(codes, absmax, code, ncode, n, block, out, stream);
    case kF16:
      return dequantize_dispatch_nc<kF16>(codes, absmax, code, ncode, n, block, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t stochastic_round(const float* x, int64_t n, void* out, int fmt, uint64_t seed,
                             uint64_t offset, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  switch (fmt) {
    case kBF16: return launch_round<kBF16>(x, n, out, seed, offset, stream);
    case kF16: return launch_round<kF16>(x, n, out, seed, offset, stream);
    case kE4M3FN: return launch_round<kE4M3FN>(x, n, out, seed, offset, stream);
    case kE5M2: return launch_round<kE5M2>(x, n, out, seed, offset, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t philox_words(uint32_t* out, int64_t n, int words, uint64_t seed, uint64_t counter0,
                         cudaStream_t stream) {
  if (n < 0 || words < 1 || words > 4) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  LOWBIT_LAUNCH(philox_words_kernel, dim3((unsigned)elt_blocks(n)), dim3(kEltThreads), 0, stream,
                out, n, words, seed, counter0);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lowbit
