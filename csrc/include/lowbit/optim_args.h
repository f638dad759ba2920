// The argument block of one fused multi-tensor optimizer step (lowbit::optim_step), shared by the
// CPU kernel (csrc/cpu/optim_impl.h), the CUDA launcher (csrc/cuda/optim.cu) and the three
// pybind11 modules. Host-side only; plain data so nvcc and gcc agree on it.
#pragma once
#include <stdint.h>

#include "optim_math.h"

namespace lowbit {

// One parameter tensor of the step. States are fp32 arrays shaped like p (state_bits 32) or flat
// uint8 codes (8-bit: one per element; 4-bit: element 2j in the high nibble of byte j) with one
// fp32 absmax per block. Unused pointers are null.
//
// Rank-1 second state (Adam, 4-bit; lowbit/rank1.h): v_cols = C > 0 views the tensor as
// [R = n / C, C]; s2_absmax then holds the R row maxima and s2_colmax the C column maxima, both
// replaced by those of the new v. v_scratch is R + C floats of working memory (device memory for
// CUDA; contents ignored on entry) where the step gathers the new maxima before it writes codes.
struct OptTensor {
  void* p;            // param, OptArgs::dtype
  const void* g;      // grad, same dtype
  int64_t n;          // elements
  void* s1;           // first state (Adam/Lion exp_avg, SGD momentum_buffer)
  float* s1_absmax;
  void* s2;           // second state (Adam exp_avg_sq)
  float* s2_absmax;   // per block, or per row (rank-1)
  void* comp;         // kahan compensation, OptArgs::dtype
  uint64_t key;       // stochastic-rounding Philox key of this tensor at this step
  const OptClipRow* clip;  // this tensor's clip row (device memory for CUDA), or null
  int64_t* clipped;   // += elements whose gradient an element-wise clip changed, or null
  double* rms;        // rms pass: += the tensor's update-clipping sum (adam_rms_term), or null
  int64_t v_cols;     // 0: block-wise second state; C: rank-1
  float* s2_colmax;   // rank-1: C column maxima
  float* v_scratch;   // rank-1: R + C floats
  const float* hess;  // the Hessian-diagonal estimate (fp32, n elements) with kHessEma, or null
};

struct OptArgs {
  const OptTensor* tensors;
  int ntensors;
  int nstates;        // 0 (SGD without momentum), 1 (Lion, SGD) or 2 (Adam)
  int state_bits;     // 32, 8 or 4
  int block;          // quantization block of the states (8-bit: 256, 4-bit: 128)
  const float* code1; const float* mids1;  // first state's codebook and its midpoints
  const float* code2; const float* mids2;  // second state's
  int ncode;          // 256 (8-bit) or 16 (4-bit); 0 for 32-bit states
  int dtype;          // param/grad dtype: kF32, kBF16 or kF16 (formats.h)
  int writeback;      // WriteBack (optim_math.h)
  // The update-clipping statistics pass (Adam): nothing is written; each tensor's sum of
  // adam_rms_term over its elements is added to *rms (lowbit.reference.optim).
  bool rms_pass;
  StepScalars s;
};

}  // namespace lowbit
