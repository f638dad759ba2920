// CUDA kernels of the fused multi-tensor Adam/AdamW step (issue 3): one launch updates every
// tensor of a parameter group, reading grad, param and states once and writing param and states
// once. Per-element math is lowbit/adam.h and state quantization lowbit/quant.h — the code the
// CPU kernel (csrc/cpu/optim.cpp) runs — so the results equal lowbit._C and the torch reference
// (lowbit.reference.optim) bit for bit; these kernels only add the parallel structure.
//
// Multi-tensor table: the per-tensor pointers and block prefix sums travel BY VALUE as a kernel
// parameter (AdamChunk, ~2 KB, below the 4 KB classic kernel-parameter limit), launched once per
// chunk of up to kChunkTensors tensors — the multi_tensor_apply approach. A table in device memory
// would need an allocation plus an H2D copy per step, and its lifetime would have to outlast the
// asynchronous launch; parameters are copied by the launch itself, so the host array can go away
// as soon as the launch is enqueued. In the simulator the same struct is simply copied.
#include "cuda/launchers.h"
#include "cuda/primitives.cuh"
#include "lowbit/adam.h"
#include "lowbit/quant.h"

namespace lowbit {
namespace cuda {
namespace {

// Full unrolling keeps the per-thread arrays in registers (nvcc); the simulator's host compiler
// does not know the CUDA pragma.
#if defined(__CUDACC__)
#define LOWBIT_UNROLL _Pragma("unroll")
#else
#define LOWBIT_UNROLL
#endif

constexpr int kChunkTensors = 32;       // tensors per launch (kernel-parameter budget)
constexpr int kAdamThreads = 256;       // max threads per CUDA block
constexpr int64_t kAdamMaxBlocks = 65536;  // grid cap of the 32-bit (grid-stride) kernel

// Up to kChunkTensors tensors, structure of arrays. block_start[t] = index of the first CUDA
// block of tensor t (quantized states; block_start[count] = grid size).
struct AdamChunk {
  float* p[kChunkTensors];
  const float* g[kChunkTensors];
  void* m[kChunkTensors];
  void* v[kChunkTensors];
  float* m_absmax[kChunkTensors];
  float* v_absmax[kChunkTensors];
  int64_t n[kChunkTensors];
  int64_t block_start[kChunkTensors + 1];
  int count;
};

// 32-bit states: each thread walks every tensor of the chunk with a grid-stride loop (coalesced
// within a tensor; no per-element table search).
__global__ void __launch_bounds__(kAdamThreads)
adam32_kernel(const AdamChunk c, const AdamScalars s) {
  for (int t = 0; t < c.count; ++t) {
    float* __restrict__ p = c.p[t];
    const float* __restrict__ g = c.g[t];
    float* __restrict__ m = (float*)c.m[t];
    float* __restrict__ v = (float*)c.v[t];
    const int64_t n = c.n[t];
    for (int64_t i = global_thread(); i < n; i += grid_stride())
      adam_update_one(&p[i], g[i], &m[i], &v[i], s);
  }
}

template <int NC>
__device__ __forceinline__ int load_code(const uint8_t* codes, int64_t k) {
  if (NC == 16) {
    const uint8_t byte = codes[k >> 1];
    return (k & 1) ? (byte & 0xF) : (byte >> 4);
  }
  return codes[k];
}

// Quantize the new values (E per thread, element t + j * blockDim.x of the block) against `am`,
// the block's new absmax. 4-bit: element 2j goes in the high nibble; since blockDim.x is a
// multiple of 32, an element and its odd neighbour sit in adjacent lanes of one warp, so the even
// lane fetches the neighbour's index with a shuffle and writes the byte (odd tail: low nibble 0).
// Every thread runs every iteration (the shuffle needs the full warp); only stores are predicated.
template <int NC, int E>
__device__ __forceinline__ void requantize(const float (&vals)[E], float am, const float* s_mids,
                                           int64_t begin, int len, uint8_t* __restrict__ codes) {
  const int t = threadIdx.x, nt = blockDim.x;
  const float inv = unit_scale(am);
LOWBIT_UNROLL
  for (int j = 0; j < E; ++j) {
    const int i = t + j * nt;
    const int idx = nearest_index(scale_to_unit(vals[j], inv), s_mids, NC - 1);
    if (NC == 16) {
      const int next = __shfl_down_sync(kFullMask, idx, 1);
      if (i < len && (i & 1) == 0)
        codes[(begin + i) >> 1] = (uint8_t)((idx << 4) | (i + 1 < len ? next : 0));
    } else if (i < len) {
      codes[begin + i] = (uint8_t)idx;
    }
  }
}

// Quantized states: one CUDA block per quantization block of `block` = E * blockDim.x elements.
// Each thread keeps its E new moments in registers between the update and the requantization.
template <int NC, int E>
__global__ void __launch_bounds__(kAdamThreads)
adamq_kernel(const AdamChunk c, int block, const float* __restrict__ m_code,
             const float* __restrict__ m_mids, const float* __restrict__ v_code,
             const float* __restrict__ v_mids, const AdamScalars s) {
  __shared__ float s_mcode[NC], s_vcode[NC], s_mmids[NC], s_vmids[NC];
  __shared__ uint32_t s_red[kMaxWarps + 1];
  const int t = threadIdx.x, nt = blockDim.x;

  // Which tensor: the last whose first block is <= blockIdx.x (chunks are small: linear scan;
  // empty tensors have no blocks and are skipped by the strict comparison).
  const int64_t gb = blockIdx.x;
  int ti = 0;
  while (ti + 1 < c.count && c.block_start[ti + 1] <= gb) ++ti;
  const int64_t b = gb - c.block_start[ti];
  const int64_t n = c.n[ti];
  const int64_t begin = b * block;
  const int len = (int)(n - begin < block ? n - begin : block);
  float* __restrict__ p = c.p[ti];
  const float* __restrict__ g = c.g[ti];
  uint8_t* __restrict__ mc = (uint8_t*)c.m[ti];
  uint8_t* __restrict__ vc = (uint8_t*)c.v[ti];

  // The dequantization lookups and the binary searches hit the tables at data-dependent places:
  // stage them in shared memory.
  for (int k = t; k < NC; k += nt) {
    s_mcode[k] = m_code[k];
    s_vcode[k] = v_code[k];
    if (k < NC - 1) {
      s_mmids[k] = m_mids[k];
      s_vmids[k] = v_mids[k];
    }
  }
  const float am_m = c.m_absmax[ti][b], am_v = c.v_absmax[ti][b];
  __syncthreads();

  float mv[E], vv[E];
  uint32_t mx_m = 0, mx_v = 0;
LOWBIT_UNROLL
  for (int j = 0; j < E; ++j) {
    const int i = t + j * nt;
    mv[j] = 0.0f;
    vv[j] = 0.0f;
    if (i < len) {
      const int64_t k = begin + i;
      mv[j] = dequant_value(s_mcode[load_code<NC>(mc, k)], am_m);
      vv[j] = dequant_value(s_vcode[load_code<NC>(vc, k)], am_v);
      adam_update_one(&p[k], g[k], &mv[j], &vv[j], s);
      mx_m = MaxU32()(mx_m, abs_bits(mv[j]));
      mx_v = MaxU32()(mx_v, abs_bits(vv[j]));
    }
  }

  // New absmax = max of the new moments' |bits| over the block. The reductions' barriers also
  // order every read of the old codes / absmax (above) before the stores below.
  const float new_am_m = bits_f32(block_allreduce(mx_m, MaxU32(), 0u, s_red));
  const float new_am_v = bits_f32(block_allreduce(mx_v, MaxU32(), 0u, s_red));
  if (t == 0) {
    c.m_absmax[ti][b] = new_am_m;
    c.v_absmax[ti][b] = new_am_v;
  }
  requantize<NC, E>(mv, new_am_m, s_mmids, begin, len, mc);
  requantize<NC, E>(vv, new_am_v, s_vmids, begin, len, vc);
}

template <int NC, int E>
void launch_adamq(const AdamChunk& c, int block, const float* m_code, const float* m_mids,
                  const float* v_code, const float* v_mids, const AdamScalars& s,
                  cudaStream_t stream) {
  auto kernel = adamq_kernel<NC, E>;
  LOWBIT_LAUNCH(kernel, dim3((unsigned)c.block_start[c.count]), dim3(block / E), 0, stream, c,
                block, m_code, m_mids, v_code, v_mids, s);
}

// block / E threads: up to kAdamThreads, and a multiple of 32 (block >= 32, a power of two).
template <int NC>
void dispatch_adamq(const AdamChunk& c, int block, const float* m_code, const float* m_mids,
                    const float* v_code, const float* v_mids, const AdamScalars& s,
                    cudaStream_t stream) {
  switch (block <= kAdamThreads ? 1 : block / kAdamThreads) {
    case 1: return launch_adamq<NC, 1>(c, block, m_code, m_mids, v_code, v_mids, s, stream);
    case 2: return launch_adamq<NC, 2>(c, block, m_code, m_mids, v_code, v_mids, s, stream);
    case 4: return launch_adamq<NC, 4>(c, block, m_code, m_mids, v_code, v_mids, s, stream);
    case 8: return launch_adamq<NC, 8>(c, block, m_code, m_mids, v_code, v_mids, s, stream);
    default: return launch_adamq<NC, 16>(c, block, m_code, m_mids, v_code, v_mids, s, stream);
  }
}

bool adam_valid_block(int block) {
  return block >= 32 && block <= 4096 && (block & (block - 1)) == 0;
}

}  // namespace

cudaError_t adam_step(const AdamTensorArgs* tensors, int ntensors, int state_bits, int block,
                      const float* m_code, const float* m_mids, const float* v_code,
                      const float* v_mids, int ncode, const AdamScalars& s, cudaStream_t stream) {
  const bool quantized = state_bits != 32;
  if (ntensors < 0) return cudaErrorInvalidValue;
  if (quantized && !((state_bits == 8 && ncode == 256) || (state_bits == 4 && ncode == 16)))
    return cudaErrorInvalidValue;
  if (quantized && !adam_valid_block(block)) return cudaErrorInvalidValue;
  for (int i = 0; i < ntensors; ++i)
    if (tensors[i].n < 0) return cudaErrorInvalidValue;

  for (int first = 0; first < ntensors; first += kChunkTensors) {
    AdamChunk c{};
    c.count = ntensors - first < kChunkTensors ? ntensors - first : kChunkTensors;
    int64_t total = 0;  // 32-bit: elements; quantized: CUDA blocks
    for (int j = 0; j < c.count; ++j) {
      const AdamTensorArgs& a = tensors[first + j];
      c.p[j] = a.p; c.g[j] = a.g; c.n[j] = a.n;
      c.m[j] = a.m; c.v[j] = a.v;
      c.m_absmax[j] = a.m_absmax; c.v_absmax[j] = a.v_absmax;
      c.block_start[j] = total;
      total += quantized ? (a.n + block - 1) / block : a.n;
    }
    c.block_start[c.count] = total;
    if (total == 0) continue;  // an empty grid is an invalid configuration on CUDA
    if (quantized) {
      if (total > 0x7FFFFFFF) return cudaErrorInvalidValue;  // gridDim.x limit
      if (ncode == 16) dispatch_adamq<16>(c, block, m_code, m_mids, v_code, v_mids, s, stream);
      else dispatch_adamq<256>(c, block, m_code, m_mids, v_code, v_mids, s, stream);
    } else {
      int64_t nb = (total + kAdamThreads - 1) / kAdamThreads;
      nb = nb < kAdamMaxBlocks ? nb : kAdamMaxBlocks;
      auto kernel = adam32_kernel;
      LOWBIT_LAUNCH(kernel, dim3((unsigned)nb), dim3(kAdamThreads), 0, stream, c, s);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace lowbit
