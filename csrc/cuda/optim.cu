// CUDA kernels of the fused multi-tensor optimizer step (lowbit::optim_step; spec:
// lowbit.reference.optim): Adam/AdamW (AdaHessian too), Lion, SGD and Sophia; fp32, bf16 or fp16
// params written back as fp32, nearest, stochastic or kahan; fp32 or 8/4-bit block-quantized
// states. One launch per chunk of tensors updates a whole parameter group, reading grad, param,
// compensation, states (and the Hessian estimate) once and writing param, compensation and
// states once. Per-element math is lowbit/optim_math.h and state quantization lowbit/quant.h, the
// code the CPU kernel (csrc/cpu/optim_impl.h) runs, so the results equal lowbit._C and the torch
// reference bit for bit; these kernels only add the parallel structure.
//
// Every kernel is a template over the rule, the param dtype, the write-back, the number of states,
// whether it has the curvature flags (HESS: Adam and Sophia only; it reads the Hessian estimate
// with kHessEma, and the plain instances never load it) and (quantized states) the codebook size
// and elements per thread, so each instance is branch-free except for the flags (selects, as in
// optim_math.h).
//
// Multi-tensor table: the per-tensor pointers, keys and block prefix sums travel BY VALUE as a
// kernel parameter (OptChunk, 3.5 KB: kernel parameters must stay within the classic 4 KB limit,
// checked below), launched once per chunk of up to kChunkTensors tensors — the multi_tensor_apply
// approach. A table in device memory would need an allocation plus an H2D copy per step, and its
// lifetime would have to outlast the asynchronous launch; parameters are copied by the launch
// itself, so the host array can go away as soon as the launch is enqueued. In the simulator the
// same struct is simply copied.
//
// Rank-1 second states (4-bit Adam, lowbit/rank1.h) scale each element by the smaller of its row
// and column maximum of the NEW v, which needs every new element before any code is written. A
// call with such tensors therefore runs, on the same stream: a zero fill of the per-tensor
// scratch, a prepass that computes every new v (the step's own arithmetic, adam_new_v) and
// atomicMax-es its bit pattern into the row and column maxima (exact for non-negative floats),
// the step (old codes decoded with the state's old maxima, new codes against the scratch's new
// ones), and a copy of the new maxima into the state.
//
// The update-clipping statistics pass (OptArgs::rms_pass, Adam) replaces the step with one
// read-only kernel per chunk (rms_kernel): per tensor, the float64 sum of adam_rms_term over its
// elements, reduced per CUDA block and added to the tensor's *rms with one atomicAdd per block.
#include "cuda/launchers.h"
#include "cuda/primitives.cuh"
#include "lowbit/optim_math.h"
#include "lowbit/quant.h"
#include "lowbit/rank1.h"

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

// Tensors per launch, from the kernel-parameter budget: OptChunk holds 16 words per tensor (8
// bytes each), so 28 tensors take 3.5 KB and leave room for StateTables and StepScalars plus one
// more per-tensor array. (It was 32 until the Hessian estimate's array came: 32 * 16 words alone
// are 4 KB. A union with the rank-1 fields would have kept 32, since the host refuses rank-1
// states with the Hessian flags today, but that refusal is a "not yet"; a few more launches for
// very long parameter lists cost next to nothing.)
constexpr int kChunkTensors = 28;
constexpr int kOptThreads = 256;           // max threads per CUDA block
constexpr int64_t kOptMaxBlocks = 65536;   // grid cap of the 32-bit (grid-stride) kernel
constexpr int kMaxParamBytes = 4096;       // classic kernel-parameter limit

// Up to kChunkTensors tensors, structure of arrays (OptTensor of optim_args.h). p, g and comp
// hold elements of the launch's param dtype. block_start[t] = index of the first CUDA block of
// tensor t (quantized states; block_start[count] = grid size) or of its first element (32-bit).
struct OptChunk {
  void* p[kChunkTensors];
  const void* g[kChunkTensors];
  void* comp[kChunkTensors];
  void* s1[kChunkTensors];
  void* s2[kChunkTensors];
  float* s1_absmax[kChunkTensors];
  float* s2_absmax[kChunkTensors];
  uint64_t key[kChunkTensors];
  const OptClipRow* clip[kChunkTensors];  // clip rows in device memory, or null
  int64_t* clipped[kChunkTensors];        // clipped-element counters in device memory, or null
  int64_t n[kChunkTensors];
  int64_t block_start[kChunkTensors + 1];
  int64_t v_cols[kChunkTensors];   // rank-1 second state: columns (0: block-wise)
  float* s2_colmax[kChunkTensors];  // rank-1: old column maxima (s2_absmax: old row maxima)
  float* v_scratch[kChunkTensors];  // rank-1: new row maxima, then new column maxima
  const float* hess[kChunkTensors];  // fp32 Hessian-diagonal estimate (kHessEma), or null
  int count;
};

// The codebooks (device memory) and the block size of quantized states.
struct StateTables {
  const float* code1;
  const float* mids1;
  const float* code2;
  const float* mids2;
  int block;
};

// Both kernels take (OptChunk, [StateTables,] StepScalars) by value.
static_assert(sizeof(OptChunk) + sizeof(StateTables) + sizeof(StepScalars) <= kMaxParamBytes,
              "optimizer kernel parameters exceed 4 KB: lower kChunkTensors");

// The flag-independent scalars, copied into registers once per thread.
struct Scalars {
  float f[kNumScalars];
  int flags;
};

__device__ __forceinline__ Scalars scalars_of(const StepScalars& s) {
  Scalars r;
LOWBIT_UNROLL
  for (int k = 0; k < kNumScalars; ++k) r.f[k] = s.f[k];
  r.flags = s.flags;
  return r;
}

// Tensor t's clip row (read inside the kernel: the policies compute it on the device). Chunk:
// any table with a clip[] array (OptChunk, RmsChunk).
template <typename Chunk>
__device__ __forceinline__ OptClipRow clip_row(const Chunk& c, int t) {
  return c.clip[t] ? *c.clip[t] : no_clip_row();
}

// Adds a thread's clipped-element count to its tensor's counter (clips are rare: one atomic per
// thread that saw any).
__device__ __forceinline__ void count_clipped(const OptChunk& c, int t, int64_t count) {
  if (count > 0 && c.clipped[t])
    atomicAdd(reinterpret_cast<unsigned long long*>(c.clipped[t]), (unsigned long long)count);
}

// One element k of tensor (p, g, comp, key, hess): load the fp32 value, apply rule KIND to it and
// to the fp32 states s1, s2 (updated in place), store it back. HESS: the rule with the curvature
// flags, and the element's Hessian estimate hess[k] when the step refreshes (kHessEma; hess is
// null otherwise, and other instances never touch it).
// Returns whether an element-wise clip changed the gradient.
template <int KIND, int DT, int WB, bool HESS>
__device__ __forceinline__ bool step_element(const Scalars& s, const OptClipRow& ct, void* p,
                                             const void* g, void* comp, const float* hess,
                                             uint64_t key, int64_t k, float& s1, float& s2) {
  float x = load_param(p, comp, DT, WB, k);
  const float h = HESS && (s.flags & kHessEma) ? hess[k] : 0.0f;
  const bool clipped = update_rule<KIND, true, true, false, HESS>(s.f, s.flags, x,
                                                                  load_f32(g, DT, k), s1, s2, ct, h);
  store_param(p, comp, DT, WB, key, k, x);
  return clipped;
}

// 32-bit states (or none): each thread walks every tensor of the chunk with a grid-stride loop
// (coalesced within a tensor; no per-element table search).
template <int KIND, int DT, int WB, int NST, bool HESS>
__global__ void __launch_bounds__(kOptThreads)
step32_kernel(const OptChunk c, const StepScalars ss) {
  const Scalars s = scalars_of(ss);
  for (int t = 0; t < c.count; ++t) {
    void* __restrict__ p = c.p[t];
    const void* __restrict__ g = c.g[t];
    void* __restrict__ comp = c.comp[t];
    float* __restrict__ m = (float*)c.s1[t];
    float* __restrict__ v = (float*)c.s2[t];
    const float* __restrict__ hess = c.hess[t];
    const uint64_t key = c.key[t];
    const int64_t n = c.n[t];
    const OptClipRow ct = clip_row(c, t);
    int64_t clipped = 0;
    for (int64_t i = global_thread(); i < n; i += grid_stride()) {
      float s1 = NST >= 1 ? m[i] : 0.0f, s2 = NST >= 2 ? v[i] : 0.0f;
      clipped +=
          step_element<KIND, DT, WB, HESS>(s, ct, p, g, comp, hess, key, i, s1, s2) ? 1 : 0;
      if (NST >= 1) m[i] = s1;
      if (NST >= 2) v[i] = s2;
    }
    count_clipped(c, t, clipped);
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

// Quantize the new values (E per thread, element t + j * blockDim.x of the block), each times its
// unit scale inv[j] (1 / the block's new absmax, or the rank-1 one of its element). 4-bit:
// element 2j goes in the high nibble; since blockDim.x is a multiple of 32, an element and its
// odd neighbour sit in adjacent lanes of one warp, so the even lane fetches the neighbour's index
// with a shuffle and writes the byte (odd tail: low nibble 0). Every thread runs every iteration
// (the shuffle needs the full warp); only stores are predicated.
// zero_floor (8-bit codebooks starting with 0: the unsigned second-moment map): a value > 0
// whose nearest code is that 0 takes code 1 (lowbit.reference.optim.zero_floor).
template <int NC, int E>
__device__ __forceinline__ void requantize(const float (&vals)[E], const float (&inv)[E],
                                           const float* s_mids, int64_t begin, int len,
                                           uint8_t* __restrict__ codes, bool zero_floor = false) {
  const int t = threadIdx.x, nt = blockDim.x;
LOWBIT_UNROLL
  for (int j = 0; j < E; ++j) {
    const int i = t + j * nt;
    int idx = nearest_index(scale_to_unit(vals[j], inv[j]), s_mids, NC - 1);
    if (NC == 256 && zero_floor && idx == 0 && vals[j] > 0.0f) idx = 1;
    if (NC == 16) {
      const int next = __shfl_down_sync(kFullMask, idx, 1);
      if (i < len && (i & 1) == 0)
        codes[(begin + i) >> 1] = (uint8_t)((idx << 4) | (i + 1 < len ? next : 0));
    } else if (i < len) {
      codes[begin + i] = (uint8_t)idx;
    }
  }
}

// The block's new absmax of each state = max of the new values' |bits|. With two states both
// maxima travel in one 64-bit word (state 1 low, state 2 high), so one reduction serves both.
template <int NST>
struct AbsmaxReduce {
  using T = uint32_t;
  using Op = MaxU32;
  __device__ __forceinline__ static T pack(uint32_t m1, uint32_t) { return m1; }
  __device__ __forceinline__ static uint32_t second(T) { return 0u; }
};

struct MaxU32Pair {
  __device__ __forceinline__ uint64_t operator()(uint64_t a, uint64_t b) const {
    const uint32_t lo = MaxU32()((uint32_t)a, (uint32_t)b);
    const uint32_t hi = MaxU32()((uint32_t)(a >> 32), (uint32_t)(b >> 32));
    return ((uint64_t)hi << 32) | lo;
  }
};

template <>
struct AbsmaxReduce<2> {
  using T = uint64_t;
  using Op = MaxU32Pair;
  __device__ __forceinline__ static T pack(uint32_t m1, uint32_t m2) {
    return ((uint64_t)m2 << 32) | m1;
  }
  __device__ __forceinline__ static uint32_t second(T r) { return (uint32_t)(r >> 32); }
};

// Quantized states (NST 1 or 2, NC-entry codebooks): one CUDA block per quantization block of
// `block` = E * blockDim.x elements. Each thread keeps its E new states in registers between the
// update and the requantization.
template <int KIND, int DT, int WB, int NST, int NC, int E, bool HESS>
__global__ void __launch_bounds__(kOptThreads)
stepq_kernel(const OptChunk c, const StateTables q, const StepScalars ss) {
  static_assert(NST == 1 || NST == 2, "quantized kernel needs one or two states");
  // only the 4-bit Adam instances without the Hessian flags can meet a rank-1 second state
  // (optim_call and valid_args check)
  constexpr bool kRank1 = KIND == kAdam && NST == 2 && NC == 16 && !HESS;
  using Red = AbsmaxReduce<NST>;
  constexpr int NC2 = NST >= 2 ? NC : 1;
  __shared__ float s_code1[NC], s_mids1[NC], s_code2[NC2], s_mids2[NC2];
  __shared__ typename Red::T s_red[kMaxWarps + 1];
  const int t = threadIdx.x, nt = blockDim.x;
  const Scalars s = scalars_of(ss);

  // Which tensor: the last whose first block is <= blockIdx.x (chunks are small: linear scan;
  // empty tensors have no blocks and are skipped by the strict comparison).
  const int64_t gb = blockIdx.x;
  int ti = 0;
  while (ti + 1 < c.count && c.block_start[ti + 1] <= gb) ++ti;
  const int64_t b = gb - c.block_start[ti];
  const int64_t n = c.n[ti];
  const int64_t begin = b * q.block;
  const int len = (int)(n - begin < q.block ? n - begin : q.block);
  void* __restrict__ p = c.p[ti];
  const void* __restrict__ g = c.g[ti];
  void* __restrict__ comp = c.comp[ti];
  const float* __restrict__ hess = c.hess[ti];
  const uint64_t key = c.key[ti];
  uint8_t* __restrict__ c1 = (uint8_t*)c.s1[ti];
  uint8_t* __restrict__ c2 = (uint8_t*)c.s2[ti];

  // The dequantization lookups and the binary searches hit the tables at data-dependent places:
  // stage them in shared memory.
  for (int k = t; k < NC; k += nt) {
    s_code1[k] = q.code1[k];
    if (k < NC - 1) s_mids1[k] = q.mids1[k];
    if constexpr (NST >= 2) {
      s_code2[k] = q.code2[k];
      if (k < NC - 1) s_mids2[k] = q.mids2[k];
    }
  }
  const float am1 = c.s1_absmax[ti][b];
  // Rank-1 second state: its matrix shape, the block's first (row, col), the old maxima (in the
  // state) and the new ones (in the scratch, from the prepass).
  const int64_t cols = kRank1 ? c.v_cols[ti] : 0;
  const float am2 = NST >= 2 && cols == 0 ? c.s2_absmax[ti][b] : 0.0f;
  int64_t row0 = 0, col0 = 0;
  const float *old_r = nullptr, *old_c = nullptr, *new_r = nullptr, *new_c = nullptr;
  if constexpr (kRank1) {  // (other instances would divide by a constant 0)
    if (cols) {
      row0 = begin / cols;
      col0 = begin - row0 * cols;
      old_r = c.s2_absmax[ti];
      old_c = c.s2_colmax[ti];
      new_r = c.v_scratch[ti];
      new_c = new_r + n / cols;
    }
  }
  __syncthreads();

  const OptClipRow ct = clip_row(c, ti);
  float v1[E], v2[E], inv2[E];
  uint32_t mx1 = 0, mx2 = 0;
  int64_t clipped = 0;
LOWBIT_UNROLL
  for (int j = 0; j < E; ++j) {
    const int i = t + j * nt;
    v1[j] = 0.0f;
    v2[j] = 0.0f;
    inv2[j] = 0.0f;
    if (i < len) {
      const int64_t k = begin + i;
      v1[j] = dequant_value(s_code1[load_code<NC>(c1, k)], am1);
      if constexpr (NST >= 2) {
        float scale2 = am2;
        if constexpr (kRank1) {
          if (cols) {
            int64_t row, col;
            rank1_locate(row0, col0, i, cols, row, col);
            scale2 = rank1_scale(old_r[row], old_c[col]);
            inv2[j] = unit_scale(rank1_scale(new_r[row], new_c[col]));
          }
        }
        v2[j] = dequant_value(s_code2[load_code<NC>(c2, k)], scale2);
      }
      clipped +=
          step_element<KIND, DT, WB, HESS>(s, ct, p, g, comp, hess, key, k, v1[j], v2[j]) ? 1 : 0;
      mx1 = MaxU32()(mx1, abs_bits(v1[j]));
      if (NST >= 2) mx2 = MaxU32()(mx2, abs_bits(v2[j]));
    }
  }

  // The reduction's barriers also order every read of the old codes / absmax (above) before the
  // stores below.
  const typename Red::T both =
      block_allreduce(Red::pack(mx1, mx2), typename Red::Op(), (typename Red::T)0, s_red);
  const float new_am1 = bits_f32((uint32_t)both);
  const float new_am2 = bits_f32(Red::second(both));
  if (t == 0) {
    c.s1_absmax[ti][b] = new_am1;
    // (a rank-1 state's s2_absmax holds row maxima, replaced after the step)
    if (NST >= 2 && cols == 0) c.s2_absmax[ti][b] = new_am2;
  }
  float inv1[E];
LOWBIT_UNROLL
  for (int j = 0; j < E; ++j) {
    inv1[j] = unit_scale(new_am1);
    if (cols == 0) inv2[j] = unit_scale(new_am2);
  }
  requantize<NC, E>(v1, inv1, s_mids1, begin, len, c1);
  if constexpr (NST >= 2)
    requantize<NC, E>(v2, inv2, s_mids2, begin, len, c2, s_code2[0] == 0.0f);
  count_clipped(c, ti, clipped);
}

// ---- the update-clipping statistics pass (Adam, OptArgs::rms_pass) ----------------------------

// Up to kChunkTensors tensors of an rms pass. A table of its own rather than OptChunk: the pass
// reads only these fields (and writes nothing but rms), so it takes no more of the 4 KB parameter
// budget than they need. s2: the second states, fp32 or codes; s2_absmax: their block maxima
// (quantized states only).
struct RmsChunk {
  const void* p[kChunkTensors];
  const void* g[kChunkTensors];
  const void* comp[kChunkTensors];
  const void* s2[kChunkTensors];
  const float* s2_absmax[kChunkTensors];
  const OptClipRow* clip[kChunkTensors];  // clip rows in device memory, or null
  double* rms[kChunkTensors];             // the tensors' float64 sums in device memory
  int64_t n[kChunkTensors];
  int count;
};

static_assert(sizeof(RmsChunk) + sizeof(StateTables) + sizeof(StepScalars) <= kMaxParamBytes,
              "rms pass parameters exceed 4 KB: lower kChunkTensors");

// Element i's second moment as the step loads it: the fp32 state, or (NC-entry codebook staged in
// s_code) its code dequantized with the maximum of its block of 1 << shift elements.
template <int NC>
__device__ __forceinline__ float load_v(const void* s2, const float* absmax, const float* s_code,
                                        int shift, int64_t i) {
  if constexpr (NC == 0) {
    return ((const float*)s2)[i];
  } else {
    return dequant_value(s_code[load_code<NC>((const uint8_t*)s2, i)], absmax[i >> shift]);
  }
}

// log2 of a power of two (the state block, state_block_ok), without a division per element.
__device__ __forceinline__ int log2_pow2(int x) {
  int k = 0;
  while ((1 << k) < x) ++k;
  return k;
}

// Grid-stride over every tensor of the chunk, as step32_kernel, for every state layout: the
// elements' absmax is looked up per element instead of aligning CUDA blocks with quantization
// blocks, since nothing is requantized. Each thread sums the fp32 terms (adam_rms_term, the step's
// own arithmetic) of its elements in float64; each CUDA block reduces its threads' sums and adds
// the result to the tensor's total with one atomic, so the order of the float64 additions varies
// (the contract allows that). A block that holds no element of a tensor skips it: the test is
// uniform over the block, so every thread still meets the same barriers. NEED_P: only coupled (L2)
// decay makes the term depend on the parameter.
template <int DT, int WB, int NC, bool NEED_P>
__global__ void __launch_bounds__(kOptThreads)
rms_kernel(const RmsChunk c, const StateTables q, const StepScalars ss) {
  __shared__ float s_code[NC > 0 ? NC : 1];
  __shared__ double s_sum[kMaxWarps + 1];
  const Scalars s = scalars_of(ss);
  int shift = 0;
  if constexpr (NC > 0) {
    for (int k = threadIdx.x; k < NC; k += blockDim.x) s_code[k] = q.code2[k];
    shift = log2_pow2(q.block);
  }
  __syncthreads();
  const int64_t first = (int64_t)blockIdx.x * blockDim.x;
  for (int t = 0; t < c.count; ++t) {
    const int64_t n = c.n[t];
    if (first >= n) continue;
    const void* __restrict__ p = c.p[t];
    const void* __restrict__ g = c.g[t];
    const void* __restrict__ comp = c.comp[t];
    const void* __restrict__ s2 = c.s2[t];
    const float* __restrict__ absmax = c.s2_absmax[t];
    const OptClipRow ct = clip_row(c, t);
    double sum = 0.0;
    for (int64_t i = global_thread(); i < n; i += grid_stride()) {
      const float x = NEED_P ? load_param(p, comp, DT, WB, i) : 0.0f;
      const float v = load_v<NC>(s2, absmax, s_code, shift, i);
      sum += (double)adam_rms_term<true, true>(s.f, s.flags, x, load_f32(g, DT, i), 0.0f, v, ct);
    }
    sum = block_allreduce(sum, SumF64(), 0.0, s_sum);
    if (threadIdx.x == 0) atomicAdd(c.rms[t], sum);
  }
}

// ---- rank-1 second states ----------------------------------------------------------------------

constexpr int kR1Threads = 256;  // columns of a prepass tile, one per thread
constexpr int kR1Rows = 16;      // rows of a prepass tile

// Up to kChunkTensors rank-1 tensors of the step (only those). tile_start[t] = first CUDA block of
// tensor t in the prepass grid, whose tiles are kR1Rows x kR1Threads, row-major over col_tiles[t]
// tiles per band of rows.
struct Rank1Chunk {
  void* p[kChunkTensors];
  const void* g[kChunkTensors];
  void* comp[kChunkTensors];
  const void* codes[kChunkTensors];
  float* row_max[kChunkTensors];   // the state's maxima: read by the prepass, replaced at the end
  float* col_max[kChunkTensors];
  float* fresh[kChunkTensors];     // v_scratch: new row maxima, then new column maxima
  int64_t rows[kChunkTensors];
  int64_t cols[kChunkTensors];
  int64_t col_tiles[kChunkTensors];
  int64_t tile_start[kChunkTensors + 1];
  int count;
};

static_assert(sizeof(Rank1Chunk) + sizeof(StateTables) + sizeof(StepScalars) <= kMaxParamBytes,
              "rank-1 prepass parameters exceed 4 KB: lower kChunkTensors");

// fresh = 0, the identity of a max over |bits|.
__global__ void __launch_bounds__(kOptThreads) rank1_zero_kernel(const Rank1Chunk c) {
  for (int t = 0; t < c.count; ++t) {
    const int64_t n = c.rows[t] + c.cols[t];
    for (int64_t i = global_thread(); i < n; i += grid_stride()) c.fresh[t][i] = 0.0f;
  }
}

// The new maxima into the state, once the step has decoded every old code with the old ones.
__global__ void __launch_bounds__(kOptThreads) rank1_store_kernel(const Rank1Chunk c) {
  for (int t = 0; t < c.count; ++t) {
    const int64_t R = c.rows[t], n = R + c.cols[t];
    for (int64_t i = global_thread(); i < n; i += grid_stride()) {
      if (i < R) c.row_max[t][i] = c.fresh[t][i];
      else c.col_max[t][i - R] = c.fresh[t][i];
    }
  }
}

// The prepass: one CUDA block per tile of kR1Rows rows x kR1Threads columns; thread t owns column
// j of the tile. For each row it computes the new v of its element (the old code decoded with the
// old maxima, then adam_new_v), keeps the column's running maximum in a register, and the warp's
// maximum of the row goes to shared memory with an atomicMax; at the end one global atomicMax per
// row and per column of the tile. All maxima are of |bits| (non-negative patterns), where an
// unsigned integer max is the float max, exact and order-free. NEED_P: L2 decay reads p.
template <int DT, int WB, bool NEED_P>
__global__ void __launch_bounds__(kR1Threads)
rank1_maxima_kernel(const Rank1Chunk c, const StateTables q, const StepScalars ss) {
  __shared__ float s_code[16];
  __shared__ uint32_t s_row[kR1Rows];
  const int t = threadIdx.x;
  const Scalars s = scalars_of(ss);
  if (t < 16) s_code[t] = q.code2[t];
  if (t < kR1Rows) s_row[t] = 0u;

  const int64_t gb = blockIdx.x;
  int ti = 0;
  while (ti + 1 < c.count && c.tile_start[ti + 1] <= gb) ++ti;
  const int64_t tile = gb - c.tile_start[ti];
  const int64_t R = c.rows[ti], C = c.cols[ti];
  const int64_t r0 = tile / c.col_tiles[ti] * kR1Rows;
  const int64_t j = tile % c.col_tiles[ti] * kR1Threads + t;
  const bool col_ok = j < C;
  const float old_c = col_ok ? c.col_max[ti][j] : 0.0f;
  const uint8_t* __restrict__ codes = (const uint8_t*)c.codes[ti];
  const void* __restrict__ g = c.g[ti];
  const void* __restrict__ p = c.p[ti];
  const void* __restrict__ comp = c.comp[ti];
  const float* __restrict__ old_r = c.row_max[ti];
  __syncthreads();

  // the same row count for every thread of the block: the warp reductions need whole warps
  const int nrows = R - r0 < kR1Rows ? (int)(R - r0) : kR1Rows;
  uint32_t col_bits = 0u;
  for (int rr = 0; rr < nrows; ++rr) {
    const int64_t i = r0 + rr;
    uint32_t bits = 0u;
    if (col_ok) {
      const int64_t k = i * C + j;
      const float v = dequant_value(s_code[load_code<16>(codes, k)], rank1_scale(old_r[i], old_c));
      const float x = NEED_P ? load_param(p, comp, DT, WB, k) : 0.0f;
      bits = abs_bits(adam_new_v(s.f, s.flags, x, load_f32(g, DT, k), v));
    }
    col_bits = MaxU32()(col_bits, bits);
    const uint32_t row_bits = warp_allreduce(bits, MaxU32());
    if (t % kWarpSize == 0 && row_bits != 0u) atomicMax(&s_row[rr], row_bits);
  }
  __syncthreads();
  uint32_t* fresh = (uint32_t*)c.fresh[ti];
  if (t < nrows && s_row[t] != 0u) atomicMax(&fresh[r0 + t], s_row[t]);
  if (col_ok && col_bits != 0u) atomicMax(&fresh[R + j], col_bits);
}

// ---- host side ---------------------------------------------------------------------------------

bool state_block_ok(int block) {
  return block >= 32 && block <= 4096 && (block & (block - 1)) == 0;
}

// Tensors [first, first + count) of the step; returns the grid's work: CUDA blocks (quantized
// states, `block` elements each) or elements.
int64_t fill_chunk(OptChunk& c, const OptArgs& a, int first, bool quantized) {
  c = OptChunk{};
  c.count = a.ntensors - first < kChunkTensors ? a.ntensors - first : kChunkTensors;
  int64_t total = 0;
  for (int j = 0; j < c.count; ++j) {
    const OptTensor& x = a.tensors[first + j];
    c.p[j] = x.p; c.g[j] = x.g; c.comp[j] = x.comp;
    c.s1[j] = x.s1; c.s2[j] = x.s2;
    c.s1_absmax[j] = x.s1_absmax; c.s2_absmax[j] = x.s2_absmax;
    c.key[j] = x.key;
    c.clip[j] = x.clip;
    c.clipped[j] = x.clipped;
    c.n[j] = x.n;
    c.v_cols[j] = x.v_cols;
    c.s2_colmax[j] = x.s2_colmax;
    c.v_scratch[j] = x.v_scratch;
    c.hess[j] = x.hess;
    c.block_start[j] = total;
    total += quantized ? (x.n + a.block - 1) / a.block : x.n;
  }
  c.block_start[c.count] = total;
  return total;
}

// The rank-1 tensors of the step from index *next on, up to kChunkTensors of them, into c;
// returns the prepass grid size (tiles).
int64_t fill_rank1_chunk(Rank1Chunk& c, const OptArgs& a, int* next) {
  c = Rank1Chunk{};
  int64_t total = 0;
  for (; *next < a.ntensors && c.count < kChunkTensors; ++*next) {
    const OptTensor& x = a.tensors[*next];
    if (x.v_cols == 0) continue;
    const int j = c.count++;
    c.p[j] = x.p; c.g[j] = x.g; c.comp[j] = x.comp; c.codes[j] = x.s2;
    c.row_max[j] = x.s2_absmax; c.col_max[j] = x.s2_colmax; c.fresh[j] = x.v_scratch;
    c.rows[j] = x.n / x.v_cols;
    c.cols[j] = x.v_cols;
    c.col_tiles[j] = (x.v_cols + kR1Threads - 1) / kR1Threads;
    c.tile_start[j] = total;
    total += (c.rows[j] + kR1Rows - 1) / kR1Rows * c.col_tiles[j];
  }
  c.tile_start[c.count] = total;
  return total;
}

// Grid of a grid-stride launch over `work` elements.
unsigned stride_grid(int64_t work) {
  const int64_t nb = (work + kOptThreads - 1) / kOptThreads;
  return (unsigned)(nb < kOptMaxBlocks ? (nb > 0 ? nb : 1) : kOptMaxBlocks);
}

// The longest scratch of the chunk (R + C floats): the grid-stride extent of zero / store.
int64_t scratch_floats(const Rank1Chunk& c) {
  int64_t most = 0;
  for (int t = 0; t < c.count; ++t) {
    const int64_t size = c.rows[t] + c.cols[t];
    most = size > most ? size : most;
  }
  return most;
}

// Zero fill and prepass for every rank-1 tensor of the step, chunk by chunk.
template <int DT, int WB>
cudaError_t rank1_prepass(const OptArgs& a, cudaStream_t stream) {
  const StateTables q{a.code1, a.mids1, a.code2, a.mids2, a.block};
  for (int next = 0; next < a.ntensors;) {
    Rank1Chunk c;
    const int64_t tiles = fill_rank1_chunk(c, a, &next);
    if (c.count == 0) break;
    if (tiles > 0x7FFFFFFF) return cudaErrorInvalidValue;  // gridDim.x limit
    if (tiles == 0) continue;  // only empty tensors: nothing to scale
    auto zero = rank1_zero_kernel;
    LOWBIT_LAUNCH(zero, dim3(stride_grid(scratch_floats(c))), dim3(kOptThreads), 0, stream, c);
    // the parameter only matters with coupled decay, and the compensation only with kahan
    if (a.s.flags & kL2) {
      auto kernel = rank1_maxima_kernel<DT, WB == kWbKahan ? kWbKahan : kWbNearest, true>;
      LOWBIT_LAUNCH(kernel, dim3((unsigned)tiles), dim3(kR1Threads), 0, stream, c, q, a.s);
    } else {
      auto kernel = rank1_maxima_kernel<DT, kWbNearest, false>;
      LOWBIT_LAUNCH(kernel, dim3((unsigned)tiles), dim3(kR1Threads), 0, stream, c, q, a.s);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// After the step: the new maxima into the states.
cudaError_t rank1_store(const OptArgs& a, cudaStream_t stream) {
  for (int next = 0; next < a.ntensors;) {
    Rank1Chunk c;
    fill_rank1_chunk(c, a, &next);
    if (c.count == 0) break;
    auto store = rank1_store_kernel;
    LOWBIT_LAUNCH(store, dim3(stride_grid(scratch_floats(c))), dim3(kOptThreads), 0, stream, c);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Tensors [first, first + count) of an rms pass into c; returns the longest one's element count
// (the grid-stride extent).
int64_t fill_rms_chunk(RmsChunk& c, const OptArgs& a, int first) {
  c = RmsChunk{};
  c.count = a.ntensors - first < kChunkTensors ? a.ntensors - first : kChunkTensors;
  int64_t longest = 0;
  for (int j = 0; j < c.count; ++j) {
    const OptTensor& x = a.tensors[first + j];
    c.p[j] = x.p; c.g[j] = x.g; c.comp[j] = x.comp;
    c.s2[j] = x.s2; c.s2_absmax[j] = x.s2_absmax;
    c.clip[j] = x.clip;
    c.rms[j] = x.rms;
    c.n[j] = x.n;
    longest = x.n > longest ? x.n : longest;
  }
  return longest;
}

// The statistics pass instead of the step, chunk by chunk (second states of layout NC, block-wise:
// valid_args refuses rank-1 ones).
template <int DT, int WB, int NC>
cudaError_t rms_all(const OptArgs& a, cudaStream_t stream) {
  const StateTables q{a.code1, a.mids1, a.code2, a.mids2, a.block};
  for (int first = 0; first < a.ntensors; first += kChunkTensors) {
    RmsChunk c;
    const int64_t longest = fill_rms_chunk(c, a, first);
    if (longest == 0) continue;  // an empty grid is an invalid configuration on CUDA
    const dim3 grid(stride_grid(longest)), threads(kOptThreads);
    // the parameter only matters with coupled decay, and the compensation only with kahan
    if (a.s.flags & kL2) {
      auto kernel = rms_kernel<DT, WB == kWbKahan ? kWbKahan : kWbNearest, NC, true>;
      LOWBIT_LAUNCH(kernel, grid, threads, 0, stream, c, q, a.s);
    } else {
      auto kernel = rms_kernel<DT, kWbNearest, NC, false>;
      LOWBIT_LAUNCH(kernel, grid, threads, 0, stream, c, q, a.s);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <int KIND, int DT, int WB, int NST, int NC, int E, bool HESS>
void launch_q(const OptChunk& c, const StateTables& q, const StepScalars& s, int64_t nblocks,
              cudaStream_t stream) {
  auto kernel = stepq_kernel<KIND, DT, WB, NST, NC, E, HESS>;
  LOWBIT_LAUNCH(kernel, dim3((unsigned)nblocks), dim3(q.block / E), 0, stream, c, q, s);
}

// E elements per thread, block / E threads: a multiple of 32 (block >= 32, a power of two) and at
// most kOptThreads. E = 1 up to kOptThreads (the 8-bit 256 and 4-bit 128 blocks of
// reference.optim.STATE_FORMATS); larger blocks take 4 or 16 per thread (128 or 256 threads), so
// only three E instances of every kernel are compiled.
template <int KIND, int DT, int WB, int NST, int NC, bool HESS>
void dispatch_q(const OptChunk& c, const StateTables& q, const StepScalars& s, int64_t nblocks,
                cudaStream_t stream) {
  if (q.block <= kOptThreads)
    return launch_q<KIND, DT, WB, NST, NC, 1, HESS>(c, q, s, nblocks, stream);
  if (q.block <= 4 * kOptThreads)
    return launch_q<KIND, DT, WB, NST, NC, 4, HESS>(c, q, s, nblocks, stream);
  return launch_q<KIND, DT, WB, NST, NC, 16, HESS>(c, q, s, nblocks, stream);
}

// Every chunk of the step, with the kernel instance for (KIND, DT, WB, NST, NC, HESS); NC 0:
// fp32 states (or none). The rms pass and rank-1 states never come with the Hessian flags
// (valid_args), so the HESS instances compile neither.
template <int KIND, int DT, int WB, int NST, int NC, bool HESS>
cudaError_t run(const OptArgs& a, cudaStream_t stream) {
  const StateTables q{a.code1, a.mids1, a.code2, a.mids2, a.block};
  if constexpr (KIND == kAdam && NST == 2 && !HESS) {
    if (a.rms_pass) return rms_all<DT, WB, NC>(a, stream);
  }
  constexpr bool kRank1 = KIND == kAdam && NST == 2 && NC == 16 && !HESS;
  if constexpr (kRank1) {
    const cudaError_t err = rank1_prepass<DT, WB>(a, stream);
    if (err != cudaSuccess) return err;
  }
  for (int first = 0; first < a.ntensors; first += kChunkTensors) {
    OptChunk c;
    const int64_t total = fill_chunk(c, a, first, NC != 0);
    if (total == 0) continue;  // an empty grid is an invalid configuration on CUDA
    if constexpr (NC != 0) {
      if (total > 0x7FFFFFFF) return cudaErrorInvalidValue;  // gridDim.x limit
      dispatch_q<KIND, DT, WB, NST, NC, HESS>(c, q, a.s, total, stream);
    } else {
      int64_t nb = (total + kOptThreads - 1) / kOptThreads;
      nb = nb < kOptMaxBlocks ? nb : kOptMaxBlocks;
      auto kernel = step32_kernel<KIND, DT, WB, NST, HESS>;
      LOWBIT_LAUNCH(kernel, dim3((unsigned)nb), dim3(kOptThreads), 0, stream, c, a.s);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if constexpr (kRank1) return rank1_store(a, stream);
  return cudaSuccess;
}

// Runtime arguments -> template instance, one level at a time (as csrc/cpu/optim_impl.h).
template <int KIND, int DT, int WB, int NST, bool HESS>
cudaError_t by_layout(const OptArgs& a, cudaStream_t stream) {
  if constexpr (NST == 0) {
    return run<KIND, DT, WB, 0, 0, HESS>(a, stream);
  } else {
    if (a.state_bits == 32) return run<KIND, DT, WB, NST, 0, HESS>(a, stream);
    if (a.ncode == 16) return run<KIND, DT, WB, NST, 16, HESS>(a, stream);
    return run<KIND, DT, WB, NST, 256, HESS>(a, stream);
  }
}

// Adam and Sophia keep two states, Lion one, SGD one or none (momentum 0). Compile-time
// branches: every rule instantiates only the state counts it can have.
template <int KIND, int DT, int WB, bool HESS>
cudaError_t by_nstates(const OptArgs& a, cudaStream_t stream) {
  if constexpr (KIND == kAdam || KIND == kSophia) {
    return by_layout<KIND, DT, WB, 2, HESS>(a, stream);
  } else if constexpr (KIND == kSgd) {
    if (a.nstates == 0) return by_layout<KIND, DT, WB, 0, HESS>(a, stream);
    return by_layout<KIND, DT, WB, 1, HESS>(a, stream);
  } else {
    return by_layout<KIND, DT, WB, 1, HESS>(a, stream);
  }
}

template <int KIND, int DT, bool HESS>
cudaError_t by_writeback(const OptArgs& a, cudaStream_t stream) {
  switch (a.writeback) {
    case kWbStochastic: return by_nstates<KIND, DT, kWbStochastic, HESS>(a, stream);
    case kWbKahan: return by_nstates<KIND, DT, kWbKahan, HESS>(a, stream);
    default: return by_nstates<KIND, DT, kWbNearest, HESS>(a, stream);
  }
}

template <int KIND, bool HESS>
cudaError_t by_dtype(const OptArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case kBF16: return by_writeback<KIND, kBF16, HESS>(a, stream);
    case kF16: return by_writeback<KIND, kF16, HESS>(a, stream);
    default: return by_nstates<KIND, kF32, kWbF32, HESS>(a, stream);
  }
}

// The instance with the curvature flags (update_rule's CURV), which reads the Hessian estimate
// on the steps that refresh from it (kHessEma): Adam (AdaHessian) and Sophia, the rules that
// have them (valid_args).
template <int KIND>
cudaError_t by_hess(const OptArgs& a, cudaStream_t stream) {
  if (a.s.flags & kCurvFlags) return by_dtype<KIND, true>(a, stream);
  return by_dtype<KIND, false>(a, stream);
}

constexpr int kHessFlags = kCurvFlags;

// The argument combinations the kernels implement (optim_call checks the same for Python).
bool valid_args(const OptArgs& a) {
  if (a.ntensors < 0 || (a.ntensors > 0 && a.tensors == nullptr)) return false;
  const int kind = a.s.kind;
  if (kind != kAdam && kind != kLion && kind != kSgd && kind != kSophia) return false;
  const int want = kind == kAdam || kind == kSophia ? 2 : 1;
  if (a.nstates != want && !(kind == kSgd && a.nstates == 0)) return false;
  // the Hessian flags: Adam (AdaHessian) or Sophia, never with update clipping or the spike clip
  const int flags = a.s.flags;
  if ((flags & kHessFlags) &&
      ((kind != kAdam && kind != kSophia) || a.rms_pass || (flags & (kUpdateScale | kSpikeClip))))
    return false;
  if (a.dtype != kF32 && a.dtype != kBF16 && a.dtype != kF16) return false;
  if (a.dtype == kF32 ? a.writeback != kWbF32
                      : (a.writeback != kWbNearest && a.writeback != kWbStochastic &&
                         a.writeback != kWbKahan))
    return false;
  if (a.state_bits != 32 && a.nstates > 0) {
    if (!((a.state_bits == 8 && a.ncode == 256) || (a.state_bits == 4 && a.ncode == 16)))
      return false;
    if (!state_block_ok(a.block)) return false;
  } else if (a.state_bits != 32 && a.state_bits != 8 && a.state_bits != 4) {
    return false;
  }
  if (a.rms_pass && kind != kAdam) return false;  // update clipping is Adam's
  for (int i = 0; i < a.ntensors; ++i) {
    const OptTensor& t = a.tensors[i];
    if (t.n < 0 || t.v_cols < 0) return false;
    // kHessEma reads an estimate of every tensor (the HESS instances load it unchecked)
    if ((flags & kHessEma) && t.hess == nullptr) return false;
    // the rms pass: a sum for every tensor; rank-1 second states are not supported yet
    if (a.rms_pass && (t.rms == nullptr || t.v_cols > 0)) return false;
    // rank-1 second states: 4-bit Adam without the clip (or Hessian) flags, which the prepass
    // (adam_new_v) does not apply, a whole number of rows, maxima and scratch given
    if (t.v_cols > 0 &&
        (kind != kAdam || (flags & kAnyClip) || a.state_bits != 4 || a.ncode != 16 ||
         a.nstates != 2 || t.n % t.v_cols != 0 || t.s2_colmax == nullptr ||
         t.v_scratch == nullptr))
      return false;
  }
  return true;
}

}  // namespace

cudaError_t optim_step(const OptArgs& a, cudaStream_t stream) {
  if (!valid_args(a)) return cudaErrorInvalidValue;
  // every kind by name: an unknown one must not run some other rule (valid_args refuses it too)
  switch (a.s.kind) {
    case kAdam: return by_hess<kAdam>(a, stream);
    case kSophia: return by_hess<kSophia>(a, stream);
    case kLion: return by_dtype<kLion, false>(a, stream);
    case kSgd: return by_dtype<kSgd, false>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lowbit
