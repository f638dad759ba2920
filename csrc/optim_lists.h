// Marshalling shared by the three pybind11 modules (_C, _C_cuda, _C_sim) for the fused optimizer
// step: Python passes parallel lists of data_ptr()s; these build the OptArgs of
// lowbit/optim_args.h. Header-only, no pybind11.
#pragma once
#include <stdexcept>
#include <stdint.h>
#include <vector>

#include "lowbit/optim_args.h"

namespace lowbit {

// Owns the tensor table an OptArgs points into.
struct OptCall {
  std::vector<OptTensor> tensors;
  OptArgs args{};
};

// Lists of the states a rule does not have (and absmax lists for 32-bit states, comps unless
// kahan, keys unless stochastic) are empty; every other list has one entry per tensor.
// clip_table: fp32 [n, 6] rows (OptClipRow) or 0; clipped: int64 [n] counters or 0; rms: float64
// [n] sums of the update-clipping statistics or 0 (with it, the call only adds to them). v_cols,
// s2_colmax and v_scratch (rank-1 second states, optim_args.h) are all empty when every tensor's
// second state is block-wise; otherwise one entry per tensor (0 / null for block-wise ones).
// hess: one fp32 Hessian-diagonal estimate per tensor with kHessEma, else empty.
inline void optim_call(OptCall& c, int kind, const std::vector<uintptr_t>& p,
                       const std::vector<uintptr_t>& g, const std::vector<int64_t>& numel,
                       const std::vector<uintptr_t>& s1, const std::vector<uintptr_t>& s1_absmax,
                       const std::vector<uintptr_t>& s2, const std::vector<uintptr_t>& s2_absmax,
                       const std::vector<uintptr_t>& comp, const std::vector<uint64_t>& keys,
                       int state_bits, int block, uintptr_t code1, uintptr_t mids1,
                       uintptr_t code2, uintptr_t mids2, int ncode, int dtype, int writeback,
                       const std::vector<double>& scalars, int flags, uintptr_t clip_table,
                       uintptr_t clipped, uintptr_t rms,
                       const std::vector<int64_t>& v_cols,
                       const std::vector<uintptr_t>& s2_colmax,
                       const std::vector<uintptr_t>& v_scratch,
                       const std::vector<uintptr_t>& hess) {
  const size_t n = p.size();
  const int nstates = s2.empty() ? (s1.empty() ? 0 : 1) : 2;
  const bool quantized = state_bits != 32;
  auto fits = [n](size_t size, bool needed) { return needed ? size == n : size == 0 || size == n; };
  if (g.size() != n || numel.size() != n || !fits(s1.size(), nstates >= 1) ||
      !fits(s2.size(), nstates >= 2) || (quantized && s1_absmax.size() != s1.size()) ||
      (quantized && s2_absmax.size() != s2.size()) ||
      !fits(comp.size(), writeback == kWbKahan) || !fits(keys.size(), writeback == kWbStochastic))
    throw std::invalid_argument("optim_step: tensor lists of inconsistent lengths");
  if (scalars.size() != kNumScalars)
    throw std::invalid_argument("optim_step: expected 11 scalars (reference.optim.NSCALARS)");
  const int per_tensor_clip = kTensorScale | kAdaClip | kNormScale | kUpdateScale;
  if ((flags & per_tensor_clip) && clip_table == 0)
    throw std::invalid_argument("optim_step: the per-tensor clip flags need the clip table");
  if ((rms != 0 || (flags & kUpdateScale)) && kind != kAdam)
    throw std::invalid_argument("optim_step: update clipping (rms, kUpdateScale) needs Adam");
  const int hess_flags = kHessEma | kHessV | kQuarter | kSophiaAddEps;
  if ((flags & hess_flags) && kind != kAdam && kind != kSophia)
    throw std::invalid_argument("optim_step: the Hessian flags need Adam (AdaHessian) or Sophia");
  if ((flags & kHessEma) ? hess.size() != n : !hess.empty())
    throw std::invalid_argument("optim_step: kHessEma takes one Hessian estimate per tensor");
  if ((flags & hess_flags) && (rms != 0 || (flags & (kUpdateScale | kSpikeClip))))
    throw std::invalid_argument(
        "optim_step: the Hessian flags do not combine with update or spike clipping");
  if (kind == kSophia && nstates != 2)
    throw std::invalid_argument("optim_step: Sophia takes two states (exp_avg, hessian)");
  if (state_bits != 32 && state_bits != 8 && state_bits != 4)
    throw std::invalid_argument("optim_step: state_bits must be 32, 8 or 4");
  if (quantized && nstates > 0 && ncode != (state_bits == 8 ? 256 : 16))
    throw std::invalid_argument("optim_step: codebook size does not match state_bits");
  if (dtype != kF32 && dtype != kBF16 && dtype != kF16)
    throw std::invalid_argument("optim_step: params must be fp32, bf16 or fp16");
  if ((dtype == kF32) != (writeback == kWbF32))
    throw std::invalid_argument("optim_step: fp32 params take writeback f32, others not");
  if (!fits(v_cols.size(), false) || s2_colmax.size() != v_cols.size() ||
      v_scratch.size() != v_cols.size())
    throw std::invalid_argument("optim_step: rank-1 lists of inconsistent lengths");
  for (size_t i = 0; i < v_cols.size(); ++i) {
    if (v_cols[i] == 0) continue;
    if (kind != kAdam || state_bits != 4 || nstates != 2)
      throw std::invalid_argument("optim_step: rank-1 second states need Adam with 4-bit states");
    // the rank-1 prepass computes the new v without the clipping steps (adam_new_v)
    if ((flags & kAnyClip) || rms != 0)  // (kAnyClip includes the Hessian flags)
      throw std::invalid_argument(
          "optim_step: rank-1 second states do not support the clip flags yet");
    if (v_cols[i] < 0 || numel[i] % v_cols[i] != 0 || s2_colmax[i] == 0 || v_scratch[i] == 0)
      throw std::invalid_argument(
          "optim_step: a rank-1 tensor needs numel divisible by v_cols, column maxima and scratch");
  }
  auto at = [](const std::vector<uintptr_t>& v, size_t i) {
    return i < v.size() ? reinterpret_cast<void*>(v[i]) : nullptr;
  };
  c.tensors.resize(n);
  for (size_t i = 0; i < n; ++i) {
    c.tensors[i] = OptTensor{at(p, i), at(g, i), numel[i],
                             nstates >= 1 ? at(s1, i) : nullptr,
                             quantized && nstates >= 1 ? (float*)at(s1_absmax, i) : nullptr,
                             nstates >= 2 ? at(s2, i) : nullptr,
                             quantized && nstates >= 2 ? (float*)at(s2_absmax, i) : nullptr,
                             writeback == kWbKahan ? at(comp, i) : nullptr,
                             writeback == kWbStochastic ? keys[i] : 0,
                             clip_table ? reinterpret_cast<const OptClipRow*>(clip_table) + i
                                        : nullptr,
                             clipped ? reinterpret_cast<int64_t*>(clipped) + i : nullptr,
                             rms ? reinterpret_cast<double*>(rms) + i : nullptr,
                             i < v_cols.size() ? v_cols[i] : 0,
                             i < v_cols.size() ? (float*)at(s2_colmax, i) : nullptr,
                             i < v_cols.size() ? (float*)at(v_scratch, i) : nullptr,
                             i < hess.size() ? (const float*)at(hess, i) : nullptr};
    if (numel[i] < 0) throw std::invalid_argument("optim_step: negative element count");
  }
  OptArgs& a = c.args;
  a.tensors = c.tensors.data();
  a.ntensors = (int)n;
  a.nstates = nstates;
  a.state_bits = state_bits;
  a.block = block;
  a.code1 = reinterpret_cast<const float*>(code1); a.mids1 = reinterpret_cast<const float*>(mids1);
  a.code2 = reinterpret_cast<const float*>(code2); a.mids2 = reinterpret_cast<const float*>(mids2);
  a.ncode = ncode;
  a.dtype = dtype;
  a.writeback = writeback;
  a.rms_pass = rms != 0;
  for (int k = 0; k < kNumScalars; ++k) a.s.f[k] = (float)scalars[k];
  a.s.kind = kind;
  a.s.flags = flags;
}

}  // namespace lowbit
