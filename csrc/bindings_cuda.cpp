// lowbit._C_cuda: the CUDA kernels (csrc/cuda/*.cu, compiled by nvcc) bound with pybind11 on raw
// pointers, like lowbit._C, plus (device_index, stream) on every op. Compiled by the host compiler
// against cuda_runtime_api.h and linked with the static cudart, so the module imports on machines
// without a driver or GPU; it only fails, with a RuntimeError, when asked to launch there.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/launchers.h"
#include "optim_lists.h"
#include "stats_lists.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Raised as RuntimeError: "lowbit CUDA <what>: cudaErrorX (message)".
[[noreturn]] void raise(const char* what, cudaError_t err) {
  throw std::runtime_error(std::string("lowbit CUDA ") + what + ": " + cudaGetErrorName(err) +
                           " (" + cudaGetErrorString(err) + ")");
}

void check(const char* what, cudaError_t err) {
  if (err != cudaSuccess) raise(what, err);
}

// Makes `device` current for this host thread. Our static cudart is a separate runtime instance
// from torch's libcudart, so torch's current device says nothing about ours; the driver's primary
// context is shared, which is what makes torch's pointers and stream handles valid here.
cudaError_t set_device(int device) { return cudaSetDevice(device); }

int device_count() {
  int n = 0;
  // Without a driver (cudaErrorInsufficientDriver, cudaErrorNoDevice, ...) there is no device to
  // use: that is an answer, not an error. Clear the error so it does not stick to later calls.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

int runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

void py_quantize_blockwise(uintptr_t x, int x_dtype, int64_t n, int block, uintptr_t code,
                           uintptr_t mids, int ncode, uintptr_t codes, uintptr_t absmax,
                           bool stochastic, uint64_t seed, uint64_t offset, int device,
                           uintptr_t stream) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = set_device(device);
    if (err == cudaSuccess) err = lowbit::cuda::quantize_blockwise(
        ptr<const void>(x), x_dtype, n, block, ptr<const float>(code), ptr<const float>(mids),
        ncode, ptr<uint8_t>(codes), ptr<float>(absmax), stochastic, seed, offset,
        reinterpret_cast<cudaStream_t>(stream));
  }
  check("quantize_blockwise launch", err);
}

void py_dequantize_blockwise(uintptr_t codes, uintptr_t absmax, uintptr_t code, int ncode,
                             int64_t n, int block, uintptr_t out, int out_dtype, int device,
                             uintptr_t stream) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = set_device(device);
    if (err == cudaSuccess) err = lowbit::cuda::dequantize_blockwise(
        ptr<const uint8_t>(codes), ptr<const float>(absmax), ptr<const float>(code), ncode, n,
        block, ptr<void>(out), out_dtype, reinterpret_cast<cudaStream_t>(stream));
  }
  check("dequantize_blockwise launch", err);
}

void py_stochastic_round(uintptr_t x, int64_t n, uintptr_t out, int fmt, uint64_t seed,
                         uint64_t offset, int device, uintptr_t stream) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = set_device(device);
    if (err == cudaSuccess)
      err = lowbit::cuda::stochastic_round(ptr<const float>(x), n, ptr<void>(out), fmt, seed,
                                           offset, reinterpret_cast<cudaStream_t>(stream));
  }
  check("stochastic_round launch", err);
}

void py_philox_words(uintptr_t out, int64_t n, int words, uint64_t seed, uint64_t counter0,
                     int device, uintptr_t stream) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = set_device(device);
    if (err == cudaSuccess)
      err = lowbit::cuda::philox_words(ptr<uint32_t>(out), n, words, seed, counter0,
                                       reinterpret_cast<cudaStream_t>(stream));
  }
  check("philox_words launch", err);
}

// One fused optimizer step over a list of tensors sharing a rule, dtype and state format:
// lowbit._C's optim_step (csrc/bindings.cpp) plus (device, stream). Every pointer, including the
// code / mids tables of quantized states, is device memory; the tensor table is packed into
// kernel parameters, so it can go away once the launch is enqueued.
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
                   const std::vector<uintptr_t>& hess, int device, uintptr_t stream) {
  lowbit::OptCall call;
  lowbit::optim_call(call, kind, p, g, numel, s1, s1_absmax, s2, s2_absmax, comp, keys,
                     state_bits, block, code1, mids1, code2, mids2, ncode, dtype, writeback,
                     scalars, flags, clip_table, clipped, rms, v_cols, s2_colmax, v_scratch,
                     hess);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = set_device(device);
    if (err == cudaSuccess)
      err = lowbit::cuda::optim_step(call.args, reinterpret_cast<cudaStream_t>(stream));
  }
  check("optim_step launch", err);
}

// Bytes of device workspace grad_stats needs for tensors of these element counts.
size_t py_grad_stats_workspace(const std::vector<int64_t>& numel) {
  return lowbit::cuda::grad_stats_workspace(numel.data(), (int)numel.size());
}

// Per-tensor statistics: lowbit._C's grad_stats (csrc/bindings.cpp) plus a device workspace of
// py_grad_stats_workspace(numel) bytes and (device, stream). Everything but the two lists is
// device memory; the workspace must live until the launches on `stream` complete (a torch
// allocation on that stream, freed after this returns, does).
void py_grad_stats(const std::vector<uintptr_t>& g, const std::vector<int64_t>& numel, int dtype,
                   uintptr_t xform, double cv, int flags, uintptr_t out, uintptr_t tau,
                   uintptr_t over, uintptr_t over_count, int64_t capacity, uintptr_t workspace,
                   size_t workspace_bytes, int device, uintptr_t stream) {
  lowbit::StatsCall call;
  lowbit::stats_call(call, g, numel, dtype, xform, cv, flags, out, tau, over, over_count,
                     capacity);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = set_device(device);
    if (err == cudaSuccess)
      err = lowbit::cuda::grad_stats(call.args, ptr<void>(workspace), workspace_bytes,
                                     reinterpret_cast<cudaStream_t>(stream));
  }
  check("grad_stats launch", err);
}

// lowbit.ops' lowprec contract (lowbit._C's lowprec, csrc/bindings.cpp) plus (device, stream).
// Pointers are device memory; codes / scales / out may be 0 (not wanted). absmax: zeroed fp32
// scratch, one float per scale group, which must live until the launches complete.
void py_lowprec(uintptr_t x, int x_dtype, int64_t rows, int64_t cols, int fmt, int scaling,
                int block_size, bool e8m0, bool stochastic, uint64_t seed, uint64_t offset,
                int had_block, uintptr_t codes, uintptr_t scales, uintptr_t out, uintptr_t absmax,
                int device, uintptr_t stream) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = set_device(device);
    if (err == cudaSuccess)
      err = lowbit::cuda::lowprec(ptr<const void>(x), x_dtype, rows, cols, fmt, scaling,
                                  block_size, e8m0, stochastic, seed, offset, had_block,
                                  ptr<uint8_t>(codes), ptr<void>(scales), ptr<void>(out),
                                  ptr<float>(absmax), reinterpret_cast<cudaStream_t>(stream));
  }
  check("lowprec launch", err);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lowbit CUDA kernels (raw-pointer API; use the lowbit Python package instead)";
  m.def("device_count", &device_count,
        "CUDA devices usable by this module; 0 (never an exception) without a driver or GPU");
  m.def("runtime_version", &runtime_version, "CUDA runtime version linked in, e.g. 13000");
  m.def("driver_version", &driver_version, "CUDA version the driver supports; 0 without one");
  m.def("quantize_blockwise", &py_quantize_blockwise);
  m.def("dequantize_blockwise", &py_dequantize_blockwise);
  m.def("stochastic_round", &py_stochastic_round);
  m.def("philox_words", &py_philox_words);
  m.def("optim_step", &py_optim_step, "fused multi-tensor optimizer step (Adam, Lion, SGD)");
  m.def("grad_stats_workspace", &py_grad_stats_workspace,
        "device workspace bytes grad_stats needs for tensors of these sizes");
  m.def("grad_stats", &py_grad_stats,
        "per-tensor sum of squares, non-finite count, max |g|, NaN count");
  m.def("lowprec", &py_lowprec,
        "scaled low-precision quantize / fake quant (INT8/INT4/FP8/FP4), block Hadamard rotation");
}
