// The Adam / AdamW update of one element, exactly as lowbit.reference.optim.adam_update: every
// operation rounded once in fp32 (explicit _rn intrinsics on the GPU so nothing contracts into an
// FMA), in torch.optim.AdamW's order.
#pragma once
#include "hd.h"

namespace lowbit {

// Host-computed (float64, rounded once) scalars of one step; see reference/optim.py.
struct AdamScalars {
  float decay;      // AdamW: 1 - lr * weight_decay (1 for Adam)
  float wd;         // Adam with L2 weight decay (0 for AdamW)
  float a1;         // 1 - beta1
  float b2;         // beta2
  float a2;         // 1 - beta2
  float bc2;        // sqrt(1 - beta2^step)
  float eps;
  float step_size;  // lr / (1 - beta1^step)
  int maximize;
};

LOWBIT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

LOWBIT_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

LOWBIT_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

LOWBIT_HD void adam_update_one(float* p, float g, float* m, float* v, const AdamScalars& s) {
  if (s.maximize) g = -g;
  float pv = *p;
  if (s.decay != 1.0f) pv = mul_rn(pv, s.decay);
  if (s.wd != 0.0f) g = add_rn(g, mul_rn(s.wd, pv));
  const float mv = add_rn(*m, mul_rn(s.a1, sub_rn(g, *m)));
  const float vv = add_rn(mul_rn(*v, s.b2), mul_rn(s.a2, mul_rn(g, g)));
  const float d = add_rn(div_rn(sqrt_rn(vv), s.bc2), s.eps);
  *p = sub_rn(pv, mul_rn(s.step_size, div_rn(mv, d)));
  *m = mv;
  *v = vv;
}

}  // namespace lowbit
