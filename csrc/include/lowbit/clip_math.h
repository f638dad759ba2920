// The per-element gradient transform of the clipping policies (lowbit.clip), shared by the
// statistics pass and the fused optimizer step on every backend; the spec is
// lowbit.reference.clip.transform_grad. Canonical order (research/clipping.md §7.2): value clip,
// per-tensor scalar pre-scale (global / component-wise / AdaGC), AdaClip (proportional rescale of
// the elements above a per-tensor threshold), AdaGN's per-tensor norm scale. Each step rounds
// once in fp32; NaN passes through every step unchanged (comparisons with NaN are false), as
// torch.clamp and torch.where keep it.
#pragma once
#include "hd.h"

namespace lowbit {

// Which steps of the transform run (bits shared with the optimizer's OptFlag, above its own).
enum ClipFlag : int {
  kValueClip = 64,    // g = clamp(g, -cv, cv)
  kTensorScale = 128,  // g = g * s_t
  kAdaClip = 256,     // g = g * r_t where |g| > thr_t
  kNormScale = 512,   // g = g * k_t
};

// Per-tensor parameters of the transform: one row of the [ntensors, 4] fp32 table.
struct ClipTensor {
  float s, thr, r, k;
};

// `clipped` is set when an element-wise step (value clip, AdaClip) changed g. Bitwise & and |
// on the conditions, not && and ||: short-circuit evaluation is control flow, which keeps gcc
// from vectorizing the CPU loops over elements.
LOWBIT_HD float clip_transform(float g, int flags, float cv, const ClipTensor& ct,
                               bool& clipped) {
  const bool vc = (flags & kValueClip) != 0;
  const bool hi = vc & (g > cv), lo = vc & (g < -cv);
  g = hi ? cv : (lo ? -cv : g);
  g = (flags & kTensorScale) ? mul_rn(g, ct.s) : g;
  const float a = g < 0.0f ? -g : g;
  const bool over = ((flags & kAdaClip) != 0) & (a > ct.thr);
  g = over ? mul_rn(g, ct.r) : g;
  g = (flags & kNormScale) ? mul_rn(g, ct.k) : g;
  clipped = hi | lo | over;
  return g;
}

// The same transform with every step applied unconditionally: equal to clip_transform for the
// row that identity_row makes (steps that are off get values that change nothing: a bound of
// +inf compares false, NaN included, and x * 1 == x exactly). A CPU loop then has no blend per
// step and no flag masks to keep live.
LOWBIT_HD float clip_transform_all(float g, float cv, const ClipTensor& ct, bool& clipped) {
  const bool hi = g > cv, lo = g < -cv;
  g = hi ? cv : (lo ? -cv : g);
  g = mul_rn(g, ct.s);
  const float a = g < 0.0f ? -g : g;
  const bool over = a > ct.thr;
  g = over ? mul_rn(g, ct.r) : g;
  g = mul_rn(g, ct.k);
  clipped = hi | lo | over;
  return g;
}

// (value-clip bound, row) for clip_transform_all from the flags: the identity for the steps that
// are off.
LOWBIT_HD void identity_row(int flags, float& cv, ClipTensor& ct) {
  const float inf = __builtin_inff();
  cv = (flags & kValueClip) ? cv : inf;
  ct.s = (flags & kTensorScale) ? ct.s : 1.0f;
  ct.thr = (flags & kAdaClip) ? ct.thr : inf;
  ct.k = (flags & kNormScale) ? ct.k : 1.0f;
}

}  // namespace lowbit
