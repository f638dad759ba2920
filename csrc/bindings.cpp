// lowbit._C: the CPU kernels, bound with pybind11 on raw pointers so the build never needs torch
// (DESIGN.md contract 6). Python passes data_ptr() integers, sizes and dtype codes; every
// validation of shapes and dtypes happens in python/lowbit before these are called.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <mutex>
#include <stdexcept>
#include <unordered_map>
#include <vector>
#include <string>

#include "cpu/cpu_kernels.h"
#include "optim_lists.h"
#include "stats_lists.h"

namespace py = pybind11;
using namespace lowbit::cpu;

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// The nearest-code lookup table depends only on the midpoints; codebooks are few, so cache one
// table per distinct midpoint vector (keyed by its bytes).
struct LutStorage {
  std::vector<int32_t> table;
  std::vector<uint32_t> packed;
  int max_inside = 0;
};

NearestLut lut_for(const float* mids, int nmid) {
  static std::mutex mu;
  static std::unordered_map<std::string, LutStorage> cache;
  std::string key(reinterpret_cast<const char*>(mids), sizeof(float) * nmid);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) {
    LutStorage st;
    st.table.resize(65536);
    st.packed.resize(65536);
    build_nearest_lut(mids, nmid, st.table.data(), &st.max_inside, st.packed.data());
    it = cache.emplace(key, std::move(st)).first;
  }
  // Entries are never erased, so the pointers stay valid for the process.
  const LutStorage& st = it->second;
  return NearestLut{st.table.data(), st.max_inside, st.packed.data()};
}

void py_quantize_blockwise(uintptr_t x, int x_dtype, int64_t n, int block, uintptr_t code,
                        uintptr_t mids, int ncode, uintptr_t codes, uintptr_t absmax,
                           bool stochastic, uint64_t seed, uint64_t offset) {
  QuantArgs a{};
  a.x = ptr<const void>(x); a.x_dtype = x_dtype; a.n = n; a.block = block;
  a.code = ptr<const float>(code); a.mids = ptr<const float>(mids); a.ncode = ncode;
  if (ncode == 256) a.lut = lut_for(a.mids, ncode - 1);  // (stochastic: its bracket search)
  a.codes = ptr<uint8_t>(codes); a.absmax = ptr<float>(absmax);
  a.stochastic = stochastic; a.seed = seed; a.offset = offset;
  py::gil_scoped_release release;
  lowbit::cpu::quantize_blockwise(a);
}

void py_dequantize_blockwise(uintptr_t codes, uintptr_t absmax, uintptr_t code, int ncode,
                          int64_t n, int block, uintptr_t out, int out_dtype) {
  DequantArgs a{ptr<const uint8_t>(codes), ptr<const float>(absmax), ptr<const float>(code),
                ncode, n, block, ptr<void>(out), out_dtype};
  py::gil_scoped_release release;
  lowbit::cpu::dequantize_blockwise(a);
}

void py_stochastic_round(uintptr_t x, int64_t n, uintptr_t out, int fmt, uint64_t seed,
                      uint64_t offset) {
  RoundArgs a{ptr<const float>(x), n, ptr<void>(out), fmt, seed, offset};
  py::gil_scoped_release release;
  lowbit::cpu::stochastic_round(a);
}

void py_philox_words(uintptr_t out, int64_t n, int words, uint64_t seed, uint64_t counter0) {
  // (lowbit.rounding.philox_words validates these for users; the guard keeps the buffer in bounds)
  if (n < 0 || words < 1 || words > 4)
    throw std::invalid_argument("philox_words: n must be >= 0 and words in 1..4");
  PhiloxArgs a{ptr<uint32_t>(out), n, words, seed, counter0};
  py::gil_scoped_release release;
  lowbit::cpu::philox_words(a);
}

// One fused optimizer step over a list of tensors sharing a rule, dtype and state format: the
// lists hold data_ptr()s (lowbit/optim_args.h, csrc/optim_lists.h); the 8-bit states' nearest-code
// tables come from the same cache as quantize_blockwise's.
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
  OptimCpuArgs a{};
  a.a = call.args;
  if (state_bits == 8) {
    a.lut1 = lut_for(ptr<const float>(mids1), ncode - 1);
    a.lut2 = lut_for(ptr<const float>(mids2), ncode - 1);
  }
  py::gil_scoped_release release;
  lowbit::cpu::optim_step(a);
}

// Per-tensor statistics (lowbit/stats_args.h) of tensors of one dtype into `out` (float64, 4 per
// tensor), after the clip transform when flags != 0 (xform: fp32 [ntensors, 4] = s, thr, r, k per
// tensor).
void py_grad_stats(const std::vector<uintptr_t>& g, const std::vector<int64_t>& numel, int dtype,
                   uintptr_t xform, double cv, int flags, uintptr_t out, uintptr_t tau,
                   uintptr_t over, uintptr_t over_count, int64_t capacity) {
  lowbit::StatsCall call;
  lowbit::stats_call(call, g, numel, dtype, xform, cv, flags, out, tau, over, over_count,
                     capacity);
  py::gil_scoped_release release;
  lowbit::cpu::grad_stats(call.args);
}

// Scaled low-precision quantization / fake quantization / block Hadamard rotation of the (rows,
// cols) matrix x (lowbit.ops' lowprec contract); codes, scales and out may be 0 (null).
void py_lowprec(uintptr_t x, int dtype, int64_t rows, int64_t cols, int fmt, int scaling,
                int block, bool e8m0, bool stochastic, uint64_t seed, uint64_t offset, int had,
                uintptr_t codes, uintptr_t scales, uintptr_t out, uintptr_t absmax) {
  LowprecArgs a{ptr<const void>(x), dtype, rows, cols, fmt, scaling, block, e8m0, stochastic,
                seed, offset, had, ptr<uint8_t>(codes), ptr<void>(scales), ptr<void>(out),
                ptr<float>(absmax)};
  py::gil_scoped_release release;
  lowbit::cpu::lowprec(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowbit CPU kernels (raw-pointer API; use the lowbit Python package instead)";
  m.def("isa", &isa_name, "SIMD instruction set the kernels dispatched to on this CPU");
  m.def("quantize_blockwise", &py_quantize_blockwise);
  m.def("dequantize_blockwise", &py_dequantize_blockwise);
  m.def("stochastic_round", &py_stochastic_round);
  m.def("philox_words", &py_philox_words, "raw Philox4x32-10 words of a counter range");
  m.def("grad_stats", &py_grad_stats, "per-tensor sum of squares, non-finite count, max |g|, NaN count");
  m.def("lowprec", &py_lowprec, "scaled low-precision (fake) quantization, Hadamard rotation");
  m.def("optim_step", &py_optim_step, "fused multi-tensor optimizer step (Adam, Lion, SGD)");
}
