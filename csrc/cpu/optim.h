// Fused multi-tensor optimizer steps on the CPU (issue 3).
#pragma once
#include <stdint.h>

#include "lowbit/adam.h"

namespace lowbit {
namespace cpu {

struct AdamTensor {
  float* p;
  const float* g;
  int64_t n;
  void* m;          // fp32 moments (32-bit states) or uint8 codes
  float* m_absmax;  // per block (quantized states only)
  void* v;
  float* v_absmax;
};

struct AdamArgs {
  const AdamTensor* tensors;
  int ntensors;
  int state_bits;   // 32, 8 or 4
  int block;        // quantization block of the states (8-bit: 256, 4-bit: 128)
  const float* m_code; const float* m_mids;
  const float* v_code; const float* v_mids;
  int ncode;        // 256 (8-bit) or 16 (4-bit)
  AdamScalars s;
};

void adam_step(const AdamArgs& a);

}  // namespace cpu
}  // namespace lowbit
