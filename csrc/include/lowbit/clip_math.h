// The per-element gradient transform of the clipping policies (lowbit.clip), shared by the
// statistics pass and the fused optimizer step on every backend; the spec is
// lowbit.reference.clip.transform_grad. Canonical order (research/clipping.md §7.2): value clip,
// per-tensor scalar pre-scale (global / component-wise / AdaGC), AdaClip (proportional rescale of
// the elements above a per-tensor threshold). Each step rounds once in fp32; NaN passes through
// every step unchanged (comparisons with NaN are false), as torch.clamp and torch.where keep it.
#pragma once
#include "hd.h"

namespace lowbit {

// Which steps of the transform run (bits shared with the optimizer's OptFlag, above its own).
enum ClipFlag : int {
  kValueClip = 64,    // g = clamp(g, -cv, cv)
  kTensorScale = 128,  // g = g * s_t
  kAdaClip = 256,     // g = g * r_t where |g| > thr_t
};

// Per-tensor parameters of the transform, in this order in the [ntensors, 3] fp32 table.
struct ClipTensor {
  float s, thr, r;
};

LOWBIT_HD float clip_transform(float g, int flags, float cv, float s, float thr, float r) {
  g = (flags & kValueClip) ? (g > cv ? cv : (g < -cv ? -cv : g)) : g;
  g = (flags & kTensorScale) ? mul_rn(g, s) : g;
  const float a = g < 0.0f ? -g : g;
  g = ((flags & kAdaClip) && a > thr) ? mul_rn(g, r) : g;
  return g;
}

}  // namespace lowbit
