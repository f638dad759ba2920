// lowbit._C: the CPU kernels, bound with pybind11 on raw pointers so the build never needs torch
// (DESIGN.md contract 6). Python passes data_ptr() integers, sizes and dtype codes; every
// validation of shapes and dtypes happens in python/lowbit before these are called.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <mutex>
#include <unordered_map>
#include <vector>
#include <string>

#include "adam_lists.h"
#include "cpu/cpu_kernels.h"
#include "cpu/optim.h"

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
  if (ncode == 256 && !stochastic) a.lut = lut_for(a.mids, ncode - 1);
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

// One fused Adam/AdamW step over a list of tensors sharing a state format. Each list holds
// data_ptr()s; absmax lists are empty for 32-bit states. `scalars` = (decay, wd, a1, b2, a2,
// bc2, eps, step_size) as computed by lowbit.reference.optim.adam_scalars.
void py_adam_step(const std::vector<uintptr_t>& p, const std::vector<uintptr_t>& g,
                  const std::vector<int64_t>& numel, const std::vector<uintptr_t>& m,
                  const std::vector<uintptr_t>& m_absmax, const std::vector<uintptr_t>& v,
                  const std::vector<uintptr_t>& v_absmax, int state_bits, int block,
                  uintptr_t m_code, uintptr_t m_mids, uintptr_t v_code, uintptr_t v_mids,
                  int ncode, const std::vector<double>& scalars, bool maximize) {
  const std::vector<AdamTensor> ts = lowbit::adam_tensor_table<AdamTensor>(
      p, g, numel, m, m_absmax, v, v_absmax, state_bits);
  const size_t n = ts.size();
  AdamArgs a{};
  a.tensors = ts.data(); a.ntensors = (int)n; a.state_bits = state_bits; a.block = block;
  a.m_code = ptr<const float>(m_code); a.m_mids = ptr<const float>(m_mids);
  a.v_code = ptr<const float>(v_code); a.v_mids = ptr<const float>(v_mids); a.ncode = ncode;
  a.s = lowbit::adam_scalars_from(scalars, maximize);
  py::gil_scoped_release release;
  lowbit::cpu::adam_step(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowbit CPU kernels (raw-pointer API; use the lowbit Python package instead)";
  m.def("isa", &isa_name, "SIMD instruction set the kernels dispatched to on this CPU");
  m.def("quantize_blockwise", &py_quantize_blockwise);
  m.def("dequantize_blockwise", &py_dequantize_blockwise);
  m.def("stochastic_round", &py_stochastic_round);
  m.def("adam_step", &py_adam_step, "fused multi-tensor Adam/AdamW step (issue 3, first slice)");
}
