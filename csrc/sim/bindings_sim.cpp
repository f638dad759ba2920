// lowbit._C_sim (test-only): the CUDA kernels of csrc/cuda/*.cu, compiled as C++ with
// -DLOWBIT_CUDA_SIM and run by the fiber simulator (sim.h) on CPU memory. Same signatures as
// lowbit._C (grad_stats adds the workspace lowbit._C_cuda takes), so the Python "cuda_sim"
// backend is a drop-in for "cpu"; the parity tests compare it with the torch reference bit for
// bit. Also exposes tiny self-test kernels for the simulator's
// own primitives (tests/test_cuda_sim_primitives.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

// The kernels themselves, textually: exactly the source nvcc compiles.
#include "cuda/quant.cu"
#include "cuda/optim.cu"
#include "cuda/stats.cu"
#include "cuda/lowprec.cu"
#include "optim_lists.h"
#include "stats_lists.h"

namespace py = pybind11;
namespace lc = lowbit::cuda;

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void check(const char* what, cudaError_t err) {
  if (err != cudaSuccess)
    throw std::invalid_argument(std::string("lowbit sim ") + what + ": invalid argument");
}

void py_quantize_blockwise(uintptr_t x, int x_dtype, int64_t n, int block, uintptr_t code,
                           uintptr_t mids, int ncode, uintptr_t codes, uintptr_t absmax,
                           bool stochastic, uint64_t seed, uint64_t offset) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = lc::quantize_blockwise(ptr<const void>(x), x_dtype, n, block, ptr<const float>(code),
                                 ptr<const float>(mids), ncode, ptr<uint8_t>(codes),
                                 ptr<float>(absmax), stochastic, seed, offset, nullptr);
  }
  check("quantize_blockwise", err);
}

void py_dequantize_blockwise(uintptr_t codes, uintptr_t absmax, uintptr_t code, int ncode,
                             int64_t n, int block, uintptr_t out, int out_dtype) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = lc::dequantize_blockwise(ptr<const uint8_t>(codes), ptr<const float>(absmax),
                                   ptr<const float>(code), ncode, n, block, ptr<void>(out),
                                   out_dtype, nullptr);
  }
  check("dequantize_blockwise", err);
}

void py_stochastic_round(uintptr_t x, int64_t n, uintptr_t out, int fmt, uint64_t seed,
                         uint64_t offset) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = lc::stochastic_round(ptr<const float>(x), n, ptr<void>(out), fmt, seed, offset,
                               nullptr);
  }
  check("stochastic_round", err);
}

void py_philox_words(uintptr_t out, int64_t n, int words, uint64_t seed, uint64_t counter0) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = lc::philox_words(ptr<uint32_t>(out), n, words, seed, counter0, nullptr);
  }
  check("philox_words", err);
}

// lowbit._C's optim_step signature (csrc/bindings.cpp); runs csrc/cuda/optim.cu.
void py_optim_step(int kind, const std::vector<uintptr_t>& p, const std::vector<uintptr_t>& g,
                   const std::vector<int64_t>& numel, const std::vector<uintptr_t>& s1,
                   const std::vector<uintptr_t>& s1_absmax, const std::vector<uintptr_t>& s2,
                   const std::vector<uintptr_t>& s2_absmax, const std::vector<uintptr_t>& comp,
                   const std::vector<uint64_t>& keys, int state_bits, int block, uintptr_t code1,
                   uintptr_t mids1, uintptr_t code2, uintptr_t mids2, int ncode, int dtype,
                   int writeback, const std::vector<double>& scalars, int flags,
                   uintptr_t clip_table, uintptr_t clipped, uintptr_t rms,
                   const std::vector<int64_t>& v_cols, const std::vector<uintptr_t>& s2_colmax,
                   const std::vector<uintptr_t>& v_scratch,
                   const std::vector<uintptr_t>& hess) {
  lowbit::OptCall call;
  lowbit::optim_call(call, kind, p, g, numel, s1, s1_absmax, s2, s2_absmax, comp, keys,
                     state_bits, block, code1, mids1, code2, mids2, ncode, dtype, writeback,
                     scalars, flags, clip_table, clipped, rms, v_cols, s2_colmax, v_scratch,
                     hess);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = lc::optim_step(call.args, nullptr);
  }
  check("optim_step", err);
}

size_t py_grad_stats_workspace(const std::vector<int64_t>& numel) {
  return lc::grad_stats_workspace(numel.data(), (int)numel.size());
}

// lowbit._C's grad_stats signature plus the workspace (CPU memory here) of
// py_grad_stats_workspace(numel) bytes, as lowbit._C_cuda takes it; runs csrc/cuda/stats.cu.
void py_grad_stats(const std::vector<uintptr_t>& g, const std::vector<int64_t>& numel, int dtype,
                   uintptr_t xform, double cv, int flags, uintptr_t out, uintptr_t tau,
                   uintptr_t over, uintptr_t over_count, int64_t capacity, uintptr_t workspace,
                   size_t workspace_bytes) {
  lowbit::StatsCall call;
  lowbit::stats_call(call, g, numel, dtype, xform, cv, flags, out, tau, over, over_count,
                     capacity);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = lc::grad_stats(call.args, ptr<void>(workspace), workspace_bytes, nullptr);
  }
  check("grad_stats", err);
}

// lowbit._C's lowprec signature (csrc/bindings.cpp); runs csrc/cuda/lowprec.cu. absmax: zeroed
// fp32 scratch, one float per scale group.
void py_lowprec(uintptr_t x, int x_dtype, int64_t rows, int64_t cols, int fmt, int scaling,
                int block_size, bool e8m0, bool stochastic, uint64_t seed, uint64_t offset,
                int had_block, uintptr_t codes, uintptr_t scales, uintptr_t out,
                uintptr_t absmax) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = lc::lowprec(ptr<const void>(x), x_dtype, rows, cols, fmt, scaling, block_size, e8m0,
                      stochastic, seed, offset, had_block, ptr<uint8_t>(codes), ptr<void>(scales),
                      ptr<void>(out), ptr<float>(absmax), nullptr);
  }
  check("lowprec", err);
}

// ---- self-test kernels: each checks one primitive's CUDA semantics ------------------------------

// Every thread writes its slot, then reads its neighbour's: correct only if no thread passes the
// barrier before all have written (fibers run in order, so thread 0 would read an unwritten slot).
__global__ void barrier_kernel(int64_t* out) {
  __shared__ int64_t s[1024];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = 1000 + t + 1000000 * (int64_t)blockIdx.x;
  __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
  __syncthreads();  // nobody overwrites s (next block) before everybody has read it
}

__global__ void shfl_xor_kernel(int64_t* out, int lane_mask, int width) {
  out[threadIdx.x] = __shfl_xor_sync(lc::kFullMask, (int)(100 + threadIdx.x), lane_mask, width);
}

__global__ void shfl_down_kernel(int64_t* out, int delta, int width) {
  out[threadIdx.x] = __shfl_down_sync(lc::kFullMask, (int)(100 + threadIdx.x), delta, width);
}

// Reductions of known inputs: sum of t (exact in fp32 for <= 1024 threads), max of a permutation,
// twice in a row on the same scratch (the reuse block_allreduce documents as safe).
__global__ void block_reduce_kernel(int64_t* out) {
  __shared__ float s_sum[lc::kMaxWarps + 1];
  __shared__ uint32_t s_max[lc::kMaxWarps + 1];
  const int t = threadIdx.x, n = blockDim.x;
  const float sum = lc::block_allreduce((float)t, lc::SumF32(), 0.0f, s_sum);
  const uint32_t mx = lc::block_allreduce((uint32_t)((t * 37) % n), lc::MaxU32(), 0u, s_max);
  const uint32_t mx2 = lc::block_allreduce((uint32_t)(n - t), lc::MaxU32(), 0u, s_max);
  out[3 * t] = (int64_t)sum;
  out[3 * t + 1] = mx;
  out[3 * t + 2] = mx2;
}

// atomicMax on shared memory (every thread of the block, values a permutation of 1..n) and on
// global memory (every thread of every block; block b adds b * 10000): out[b] = the block's
// shared maximum, out[nblocks] = the global maximum, out[nblocks + 1] = how many calls returned
// an old value above the value they tried to store (the others raised the maximum or tied).
__global__ void atomic_max_kernel(int64_t* out, unsigned int* global_max, int nblocks) {
  __shared__ unsigned int s_max;
  __shared__ unsigned int s_lower;
  const unsigned t = threadIdx.x, n = blockDim.x;
  if (t == 0) {
    s_max = 0u;
    s_lower = 0u;
  }
  __syncthreads();
  const unsigned mine = (t * 37u) % n + 1u;
  const unsigned old = atomicMax(&s_max, mine);
  if (old > mine) atomicMax(&s_lower, old);  // (any nonzero value marks "seen")
  (void)atomicMax(global_max, mine + 10000u * blockIdx.x);
  __syncthreads();
  if (t == 0) {
    out[blockIdx.x] = s_max;
    out[nblocks + 1] += s_lower ? 1 : 0;
  }
  if (blockIdx.x == (unsigned)nblocks - 1 && t == 0) out[nblocks] = *global_max;
}

// Deliberate misuse; each must raise a RuntimeError naming the problem, never hang.
__global__ void misuse_kernel(int which) {
  const int t = threadIdx.x;
  if (which == 0) {  // divergent barrier: the halves of the block sync at different places
    if (t < 32) __syncthreads();
    else __syncthreads();
  } else if (which == 1) {  // some threads exit before a barrier the others wait at
    if (t >= 40) return;
    __syncthreads();
  } else if (which == 2) {  // lanes disagree about the shuffle mask
    (void)__shfl_xor_sync(t < 16 ? 0x0000FFFFu : lc::kFullMask, t, 1);
  } else if (which == 3) {  // a lane named in the mask never comes to the shuffle
    if (t == 5) return;
    (void)__shfl_xor_sync(lc::kFullMask, t, 1);
  }
}

std::vector<int64_t> selftest_barrier(int nthreads, int nblocks) {
  std::vector<int64_t> out((size_t)nthreads * nblocks, -1);
  auto k = barrier_kernel;
  LOWBIT_LAUNCH(k, dim3(nblocks), dim3(nthreads), 0, nullptr, out.data());
  return out;
}

std::vector<int64_t> selftest_shfl(const std::string& kind, int nthreads, int arg, int width) {
  std::vector<int64_t> out(nthreads, -1);
  if (kind == "xor") {
    auto k = shfl_xor_kernel;
    LOWBIT_LAUNCH(k, dim3(1), dim3(nthreads), 0, nullptr, out.data(), arg, width);
  } else if (kind == "down") {
    auto k = shfl_down_kernel;
    LOWBIT_LAUNCH(k, dim3(1), dim3(nthreads), 0, nullptr, out.data(), arg, width);
  } else {
    throw std::invalid_argument("kind must be 'xor' or 'down'");
  }
  return out;
}

std::vector<int64_t> selftest_block_reduce(int nthreads) {
  std::vector<int64_t> out((size_t)3 * nthreads, -1);
  auto k = block_reduce_kernel;
  LOWBIT_LAUNCH(k, dim3(1), dim3(nthreads), 0, nullptr, out.data());
  return out;
}

std::vector<int64_t> selftest_atomic_max(int nthreads, int nblocks) {
  std::vector<int64_t> out((size_t)nblocks + 2, 0);
  unsigned int global_max = 0u;
  auto k = atomic_max_kernel;
  LOWBIT_LAUNCH(k, dim3(nblocks), dim3(nthreads), 0, nullptr, out.data(), &global_max, nblocks);
  return out;
}

void selftest_misuse(int which) {
  auto k = misuse_kernel;
  LOWBIT_LAUNCH(k, dim3(1), dim3(64), 0, nullptr, which);
}

}  // namespace

PYBIND11_MODULE(_C_sim, m) {
  m.doc() = "lowbit's CUDA kernels run on the CPU by a fiber simulator (test-only)";
  m.def("quantize_blockwise", &py_quantize_blockwise);
  m.def("dequantize_blockwise", &py_dequantize_blockwise);
  m.def("stochastic_round", &py_stochastic_round);
  m.def("philox_words", &py_philox_words);
  m.def("optim_step", &py_optim_step, "fused multi-tensor optimizer step (Adam, Lion, SGD)");
  m.def("grad_stats_workspace", &py_grad_stats_workspace,
        "workspace bytes grad_stats needs for tensors of these sizes");
  m.def("grad_stats", &py_grad_stats,
        "per-tensor sum of squares, non-finite count, max |g|, NaN count");
  m.def("lowprec", &py_lowprec,
        "scaled low-precision quantize / fake quant (INT8/INT4/FP8/FP4), block Hadamard rotation");
  m.def("sim_selftest_barrier", &selftest_barrier, py::arg("nthreads"), py::arg("nblocks") = 1,
        "out[b*n + t] = value thread (t+1)%n of block b wrote before a __syncthreads()");
  m.def("sim_selftest_shfl", &selftest_shfl, py::arg("kind"), py::arg("nthreads"), py::arg("arg"),
        py::arg("width") = 32,
        "per-thread result of __shfl_{kind}_sync(full, 100 + t, arg, width)");
  m.def("sim_selftest_block_reduce", &selftest_block_reduce, py::arg("nthreads"),
        "per thread: block sum of t, block max of (37 t) % n, block max of n - t");
  m.def("sim_selftest_atomic_max", &selftest_atomic_max, py::arg("nthreads"),
        py::arg("nblocks"),
        "per block: shared atomicMax of a permutation of 1..n; then the global atomicMax over "
        "all blocks (block b adds b * 10000); then how many blocks saw an old value above theirs");
  m.def("sim_selftest_misuse", &selftest_misuse, py::arg("which"),
        "0 divergent barrier, 1 early exit before a barrier, 2 mismatched shuffle masks, "
        "3 lane missing from a shuffle; each raises RuntimeError");
}
