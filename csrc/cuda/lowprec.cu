// CUDA kernel of the scaled low-precision quantizers and the block Hadamard rotation
// (lowbit.ops' lowprec contract; spec: lowbit.backends.reference.lowprec). Every rounding comes
// from lowbit/lowprec.h (scale, encode, decode), formats.h (the final cast) and philox.h, the code
// the CPU kernel compiles too, so codes, scales and outputs are bit-identical to the reference;
// this file adds only the parallel structure.
//
// Work unit: a tile = up to kLpTile consecutive elements of one row, held in shared memory as
// fp32, one CUDA block per tile (grid-stride over tiles). A tile is a whole number of Hadamard
// segments, so the butterfly never leaves shared memory; its stages are plain fp32 adds, exact
// in any thread order, with a barrier between stages.
//
// Scale groups: when every group lies inside one tile (block scaling with tiles a multiple of
// the block, or rows that fit a tile, ...) one launch reduces each group's absmax in shared
// memory and quantizes. Otherwise (column and tensor scaling, long rows) two launches: the first
// atomicMax-es the tile's group maxima into the caller's zeroed absmax scratch, the second reads
// them back. A group's maximum is taken on the bit patterns of |v| (integer max: exact and
// order-free; a NaN's bits exceed inf's, so a NaN makes the group's scale NaN, like torch.amax).
// The Hadamard rotation is then computed in both launches, from x: the contract provides no
// memory for a global fp32 copy of the rotated tensor.
//
// NaN outputs are the canonical 0x7FC00000 (lowprec.h lp_canonical_nan: a GPU's fp32 ops
// return 0x7FFFFFFF for any NaN operand).
#include "cuda/launchers.h"
#include "cuda/primitives.cuh"
#include "lowbit/formats.h"
#include "lowbit/lowprec.h"
#include "lowbit/philox.h"
#include "lowbit/quant.h"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kLpTile = 4096;      // largest tile (elements); also the largest Hadamard block
constexpr int kLpThreads = 256;    // threads per CUDA block (fewer for small tiles)
constexpr int64_t kLpMaxBlocks = 65536;  // grid cap (grid-stride over tiles)

// Which part of the work a launch does.
enum LpPass : int {
  kLpOnePass = 0,   // group maxima in shared memory, then quantize
  kLpMaxPass = 1,   // group maxima into the absmax scratch (global atomicMax), nothing else
  kLpQuantPass = 2  // quantize with the maxima of the scratch
};

struct LpArgs {
  const void* x;
  int64_t rows, cols;
  int fmt, scaling, block_size;
  bool e8m0, stochastic;
  uint64_t seed, offset;
  int had;               // 0: no rotation
  float norm;            // hadamard_norm(had)
  uint8_t* codes;        // or null
  void* scales;          // fp32 or e8m0 bytes, or null
  void* out;             // x's dtype, or null
  uint32_t* absmax;      // scratch: |x| bits per group, zeroed by the caller
  int tile;              // elements per tile (a multiple of had)
  int64_t tiles_per_row, ntiles, nblocks;  // nblocks: scale blocks per row (block scaling)
};

// In-place butterfly stages of the Hadamard transform over the had-segments of s[0, len)
// (len a multiple of had; the 1/sqrt(had) factor is left to the caller). The caller has
// published s with a barrier; each stage ends with one.
__device__ __forceinline__ void butterfly(float* s, int len, int had) {
  const int t = threadIdx.x, nt = blockDim.x;
  for (int h = 1; h < had; h <<= 1) {
    for (int p = t; p < len / 2; p += nt) {
      const int i = (p / h) * 2 * h + p % h;  // pair p of the stage: (i, i + h)
      const float a = s[i], c = s[i + h];
      s[i] = a + c;
      s[i + h] = a - c;
    }
    __syncthreads();
  }
}


// The scale groups a tile (row, columns [c0, c0 + len)) touches form one contiguous range of
// the scratch / scales layout: its first index, its size, and element i's offset in it.
__device__ __forceinline__ int64_t first_group(const LpArgs& a, int64_t row, int64_t c0) {
  switch (a.scaling) {
    case kLpBlock: return row * a.nblocks + c0 / a.block_size;
    case kLpRow: return row;
    case kLpColumn: return c0;
    default: return 0;
  }
}
__device__ __forceinline__ int group_count(const LpArgs& a, int64_t c0, int len) {
  if (a.scaling == kLpBlock) return (int)((c0 + len - 1) / a.block_size - c0 / a.block_size) + 1;
  return a.scaling == kLpColumn ? len : 1;
}
__device__ __forceinline__ int group_of(const LpArgs& a, int64_t c0, int i) {
  if (a.scaling == kLpBlock) return (int)((c0 + i) / a.block_size - c0 / a.block_size);
  return a.scaling == kLpColumn ? i : 0;
}
// Whether this tile holds group k's first element (row-major): that tile alone stores its
// scale, so a scale shared by several tiles has one writer.
__device__ __forceinline__ bool owns_group(const LpArgs& a, int64_t row, int64_t c0, int k) {
  switch (a.scaling) {
    case kLpBlock: return k > 0 || c0 % a.block_size == 0;
    case kLpRow: return c0 == 0;
    case kLpColumn: return row == 0;
    default: return row == 0 && c0 == 0;
  }
}

template <int DT>
__global__ void __launch_bounds__(kLpThreads) lowprec_kernel(LpArgs a, int pass) {
  __shared__ float s_v[kLpTile];     // the tile: x, rotated x, then the dequantized values
  __shared__ uint32_t s_g[kLpTile];  // per group of the tile: absmax bits, then the scale's bits
  __shared__ uint32_t s_red[kMaxWarps + 1];
  const int t = threadIdx.x, nt = blockDim.x;
  const bool quant = a.fmt >= 0;
  for (int64_t tile = blockIdx.x; tile < a.ntiles; tile += gridDim.x) {
    const int64_t row = tile / a.tiles_per_row;
    const int64_t c0 = (tile % a.tiles_per_row) * a.tile;
    const int len = (int)(a.cols - c0 < a.tile ? a.cols - c0 : a.tile);
    const int64_t base = row * a.cols + c0;  // row-major index of the tile's first element

    for (int i = t; i < len; i += nt) s_v[i] = load_f32(a.x, DT, base + i);
    if (a.had) {
      __syncthreads();
      butterfly(s_v, len, a.had);
      // Each thread scales the elements it reads below (same i = t + k * nt in every loop), so
      // the normalized values need no further barrier.
      for (int i = t; i < len; i += nt) s_v[i] = mul_rn(s_v[i], a.norm);
    }

    if (!quant) {  // the rotation alone
      for (int i = t; i < len; i += nt) store_rne(a.out, DT, base + i, lp_canonical_nan(s_v[i]));
      __syncthreads();  // s_v / s_g are rewritten by the next tile
      continue;
    }

    const int64_t g0 = first_group(a, row, c0);
    const int ng = group_count(a, c0, len);
    if (pass != kLpQuantPass) {
      if (ng == 1) {  // one group (row / tensor scaling, or a tile inside one block): reduce
        uint32_t m = 0;
        for (int i = t; i < len; i += nt) m = MaxU32()(m, abs_bits(s_v[i]));
        m = block_allreduce(m, MaxU32(), 0u, s_red);
        if (t == 0) s_g[0] = m;
      } else {
        for (int k = t; k < ng; k += nt) s_g[k] = 0u;
        __syncthreads();
        for (int i = t; i < len; i += nt) atomicMax(&s_g[group_of(a, c0, i)], abs_bits(s_v[i]));
      }
      __syncthreads();
      if (pass == kLpMaxPass) {
        for (int k = t; k < ng; k += nt)
          if (s_g[k]) atomicMax(&a.absmax[g0 + k], s_g[k]);  // scratch starts at 0
        __syncthreads();
        continue;
      }
    }

    // Scales of the tile's groups: stored once (by the group's owner), kept as fp32 bits.
    for (int k = t; k < ng; k += nt) {
      const float am = bits_f32(pass == kLpQuantPass ? a.absmax[g0 + k] : s_g[k]);
      uint8_t code = 0;
      const float sc = lp_scale(am, a.fmt, a.e8m0, &code);
      if (a.scales && owns_group(a, row, c0, k)) {
        if (a.e8m0) ((uint8_t*)a.scales)[g0 + k] = code;
        else ((float*)a.scales)[g0 + k] = sc;
      }
      s_g[k] = f32_bits(sc);
    }
    __syncthreads();

    for (int i = t; i < len; i += nt) {
      const float sc = bits_f32(s_g[group_of(a, c0, i)]);
      // Element e = offset + base + i takes word e % 4 of counter e / 4 (philox_word_of: the
      // optimizer write-back's stream, the words of the reference and the CPU kernel). Each
      // thread evaluates Philox for its own element's counter and keeps one word: the same
      // bits with no exchange between threads.
      const uint32_t r =
          a.stochastic ? philox_word_of(a.seed, a.offset + (uint64_t)(base + i)) : 0u;
      uint8_t code;
      const float v = lp_fake_quant(s_v[i], sc, a.fmt, a.stochastic, r, &code);
      if (a.codes) a.codes[base + i] = code;
      s_v[i] = v;
    }
    if (a.out) {
      if (a.had) {  // rotate the dequantized tile back
        __syncthreads();
        butterfly(s_v, len, a.had);
        for (int i = t; i < len; i += nt) s_v[i] = mul_rn(s_v[i], a.norm);
      }
      for (int i = t; i < len; i += nt) store_rne(a.out, DT, base + i, lp_canonical_nan(s_v[i]));
    }
    __syncthreads();
  }
}

template <int DT>
cudaError_t launch_lowprec(const LpArgs& a, int threads, int pass, cudaStream_t stream) {
  const int64_t blocks = a.ntiles < kLpMaxBlocks ? a.ntiles : kLpMaxBlocks;
  auto kernel = lowprec_kernel<DT>;
  LOWBIT_LAUNCH(kernel, dim3((unsigned)blocks), dim3(threads), 0, stream, a, pass);
  return cudaGetLastError();
}

template <int DT>
cudaError_t run_lowprec(const LpArgs& a, bool one_pass, cudaStream_t stream) {
  const int threads = a.tile < kLpThreads ? (a.tile + kWarpSize - 1) / kWarpSize * kWarpSize
                                          : kLpThreads;
  if (one_pass) return launch_lowprec<DT>(a, threads, kLpOnePass, stream);
  const cudaError_t err = launch_lowprec<DT>(a, threads, kLpMaxPass, stream);
  if (err != cudaSuccess) return err;
  return launch_lowprec<DT>(a, threads, kLpQuantPass, stream);  // same stream: sees the maxima
}

int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

}  // namespace

cudaError_t lowprec(const void* x, int x_dtype, int64_t rows, int64_t cols, int fmt, int scaling,
                    int block_size, bool e8m0, bool stochastic, uint64_t seed, uint64_t offset,
                    int had_block, uint8_t* codes, void* scales, void* out, float* absmax,
                    cudaStream_t stream) {
  if (rows < 0 || cols < 0 || fmt < kLpNone || fmt > kLpE2M1 || scaling < kLpBlock ||
      scaling > kLpTensor || (scaling == kLpBlock && block_size < 1) || had_block < 0 ||
      had_block > kLpTile || (had_block & (had_block - 1)) != 0 ||
      (had_block && cols % had_block != 0) || (fmt == kLpNone && (!had_block || !out)))
    return cudaErrorInvalidValue;
  if (x_dtype != kF32 && x_dtype != kBF16 && x_dtype != kF16) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;  // an empty grid is an invalid configuration

  // Tile: a multiple of the Hadamard segment and, for block scaling, of the scale block too
  // where their lcm fits, so that no scale block straddles two tiles; no longer than the row
  // (rounded up to that multiple) needs.
  int64_t unit = had_block ? had_block : 1;
  if (fmt != kLpNone && scaling == kLpBlock) {
    const int64_t l = unit / gcd64(unit, block_size) * block_size;
    if (l <= kLpTile) unit = l;
  }
  const int64_t fit = (cols + unit - 1) / unit * unit, most = kLpTile / unit * unit;
  const int tile = (int)(fit < most ? fit : most);
  const bool one_row_tile = cols <= tile;
  bool one_pass = true;  // every scale group inside one tile
  if (fmt != kLpNone) {
    switch (scaling) {
      case kLpBlock: one_pass = one_row_tile || tile % block_size == 0; break;
      case kLpRow: one_pass = one_row_tile; break;
      case kLpColumn: one_pass = rows == 1; break;
      default: one_pass = rows == 1 && one_row_tile; break;
    }
  }
  if (!one_pass && !absmax) return cudaErrorInvalidValue;

  LpArgs a;
  a.x = x;
  a.rows = rows;
  a.cols = cols;
  a.fmt = fmt;
  a.scaling = scaling;
  a.block_size = block_size < 1 ? 1 : block_size;
  a.e8m0 = e8m0;
  a.stochastic = stochastic;
  a.seed = seed;
  a.offset = offset;
  a.had = had_block;
  a.norm = had_block ? hadamard_norm(had_block) : 1.0f;
  a.codes = codes;
  a.scales = scales;
  a.out = out;
  a.absmax = (uint32_t*)absmax;  // the maxima are kept as bit patterns
  a.tile = tile;
  a.tiles_per_row = (cols + tile - 1) / tile;
  a.ntiles = rows * a.tiles_per_row;
  a.nblocks = (cols + a.block_size - 1) / a.block_size;
  switch (x_dtype) {
    case kF32: return run_lowprec<kF32>(a, one_pass, stream);
    case kBF16: return run_lowprec<kBF16>(a, one_pass, stream);
    default: return run_lowprec<kF16>(a, one_pass, stream);
  }
}

}  // namespace cuda
}  // namespace lowbit
