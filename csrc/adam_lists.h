// Marshalling shared by the three pybind11 modules (_C, _C_cuda, _C_sim) for the fused Adam
// step: Python passes parallel lists of data_ptr()s; these turn them into the per-tensor table
// of a backend and into the step's scalars. Header-only, no pybind11.
#pragma once
#include <stdexcept>
#include <stdint.h>
#include <vector>

#include "lowbit/adam.h"

namespace lowbit {

// TensorT is an aggregate {float* p; const float* g; int64_t n; void* m; float* m_absmax;
// void* v; float* v_absmax;} (cpu::AdamTensor, cuda::AdamTensorArgs).
template <typename TensorT>
std::vector<TensorT> adam_tensor_table(const std::vector<uintptr_t>& p,
                                       const std::vector<uintptr_t>& g,
                                       const std::vector<int64_t>& numel,
                                       const std::vector<uintptr_t>& m,
                                       const std::vector<uintptr_t>& m_absmax,
                                       const std::vector<uintptr_t>& v,
                                       const std::vector<uintptr_t>& v_absmax, int state_bits) {
  const size_t n = p.size();
  const bool quantized = state_bits != 32;
  if (g.size() != n || numel.size() != n || m.size() != n || v.size() != n ||
      (quantized && (m_absmax.size() != n || v_absmax.size() != n)))
    throw std::invalid_argument("adam_step: tensor lists of different lengths");
  std::vector<TensorT> ts(n);
  for (size_t i = 0; i < n; ++i) {
    ts[i] = TensorT{reinterpret_cast<float*>(p[i]), reinterpret_cast<const float*>(g[i]),
                    numel[i], reinterpret_cast<void*>(m[i]),
                    quantized ? reinterpret_cast<float*>(m_absmax[i]) : nullptr,
                    reinterpret_cast<void*>(v[i]),
                    quantized ? reinterpret_cast<float*>(v_absmax[i]) : nullptr};
  }
  return ts;
}

// scalars = (decay, wd, a1, b2, a2, bc2, eps, step_size), lowbit.reference.optim.adam_scalars.
inline AdamScalars adam_scalars_from(const std::vector<double>& s, bool maximize) {
  if (s.size() != 8) throw std::invalid_argument("adam_step: expected 8 scalars");
  return AdamScalars{(float)s[0], (float)s[1], (float)s[2], (float)s[3], (float)s[4],
                     (float)s[5], (float)s[6], (float)s[7], maximize ? 1 : 0};
}

}  // namespace lowbit
