// The per-element math of the fused optimizer steps (Adam/AdamW, Lion, SGD with momentum), and
// the write-back of the new parameter into its storage dtype — exactly as
// lowbit.reference.optim specifies it. Every operation is rounded once in fp32 (explicit _rn
// intrinsics on the GPU, so nothing contracts into an FMA), in the order of the torch optimizer
// (or the Lion paper's code) each rule reproduces. Shared by the CPU kernels, the CUDA kernels
// and the CUDA simulator; Triton ports it in triton_kernels/optim.py.
#pragma once
#include "clip_math.h"
#include "formats.h"
#include "hd.h"
#include "philox.h"

namespace lowbit {

enum OptKind : int { kAdam = 0, kLion = 1, kSgd = 2, kSophia = 3 };

// Which branches of a rule run. Decided on the host (lowbit.reference.optim.step_flags), so every
// backend evaluates the same operations: "p * 1" and "g + 0 * p" are not identities for -0, inf
// and NaN, so they are skipped rather than computed.
enum OptFlag : int {
  kMaximize = 1,   // g = -g
  kDecay = 2,      // p = p * decay (decoupled weight decay: AdamW, Lion)
  kL2 = 4,         // g = g + wd * p (coupled weight decay: Adam, SGD)
  kNesterov = 8,   // SGD
  kFirstStep = 16,  // SGD: the momentum buffer starts as the gradient (torch's clone)
  kNoMomentum = 32,  // SGD with momentum 0: no state, the step is the gradient itself
  // 64 .. 512: the gradient transform of the clipping policies (clip_math.h)
  kSpikeClip = 1024,  // Adam: g = copysign(sqrt(lim), g) where g * g > lim = theta * max(v, floor)
  kReset = 2048,      // the loaded states count as zero (momentum reset)
  kDecayAfter = 4096,  // decoupled decay after the update instead of before (SPAM)
  kUpdateScale = 8192,  // Adam: step size and decay from the tensor's clip row (StableAdamW)
  // The curvature optimizers (lowbit.optim.SophiaH / SophiaG / AdaHessian):
  kHessEma = 16384,     // Sophia: s2 = s2 * b2 + a2 * h; Adam with kHessV: v from h * h
  kHessV = 32768,       // Adam (AdaHessian): v takes the Hessian estimate h instead of g
  kQuarter = 65536,     // Adam (AdaHessian, hessian_power 1/2): d = sqrt(sqrt(v)) + eps_t
  kSophiaAddEps = 131072  // Sophia: d = gamma * s2 + eps (official SophiaG) for max(., eps)
};

// Every flag that only lowbit.clip's policies set: kernels without them compile the plain rule.
constexpr int kAnyClip = kValueClip | kTensorScale | kAdaClip | kNormScale | kSpikeClip |
                         kReset | kDecayAfter | kUpdateScale;
// The curvature optimizers' flags: only update_rule<..., CURV = true> reads them.
constexpr int kCurvFlags = kHessEma | kHessV | kQuarter | kSophiaAddEps;

// How the new fp32 parameter is stored (reference.optim.WRITEBACK).
enum WriteBack : int {
  kWbF32 = 0,         // fp32 parameter: stored as is
  kWbNearest = 1,     // bf16/fp16, round to nearest-even
  kWbStochastic = 2,  // bf16/fp16, stochastic rounding, Philox word i%4 of (key, counter i/4)
  kWbKahan = 3        // bf16/fp16 value + bf16/fp16 compensation (see store_param)
};

// A tensor's row of the optimizer's [ntensors, 6] fp32 clip table: the clip transform's four
// values, then (read only with kUpdateScale, StableAdamW's update clipping) Adam's step size and
// decoupled-decay factor for this tensor, replacing the group's f[6] and f[0].
struct OptClipRow {
  ClipTensor xf;
  float step, decay;
};

// The row that changes nothing.
LOWBIT_HD OptClipRow no_clip_row() {
  return OptClipRow{ClipTensor{1.0f, 0.0f, 1.0f, 1.0f}, 0.0f, 1.0f};
}

// Host-computed scalars (float64 then rounded to fp32 once), meaning by kind:
//   kAdam: decay, wd, a1 = 1-beta1, b2, a2 = 1-beta2, eps * bc2, lr * bc2 / (1-beta1^t), -
//          with bc2 = sqrt(1-beta2^t) (the bias corrections folded into eps and the step size,
//          as bitsandbytes does: one division per element instead of two)
//   kLion: decay, b1, a1 = 1-beta1, b2, a2 = 1-beta2, lr, -, -
//   kSgd:  wd, momentum, damp = 1-dampening, lr, -, -, -, -
//   kSophia: decay, gamma, a1 = 1-beta1, b2, a2 = 1-beta2, eps, lr, clip threshold c
// followed by the clip scalars: f[8] = value-clip bound cv, f[9] = SPAM's threshold theta,
// f[10] = the floor of v in the spike test (a v quantized to 0 must not clamp every gradient).
constexpr int kNumScalars = 11;
struct StepScalars {
  float f[kNumScalars];
  int kind;
  int flags;
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

// torch.sign: +-1, and the argument itself for +-0 and NaN.
LOWBIT_HD float sign_of(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x); }

// Adam's first operations on the parameter and the gradient (already negated for kMaximize):
// decoupled decay of p, then the coupled L2 term added to g, which uses the decayed p.
LOWBIT_HD void adam_decay(const float* f, int flags, float& p, float& g) {
  p = (flags & kDecay) ? mul_rn(p, f[0]) : p;
  g = (flags & kL2) ? add_rn(g, mul_rn(f[1], p)) : g;
}

// Adam's new second moment from the old one and the (decayed, maximize-negated) gradient.
LOWBIT_HD float adam_second_moment(const float* f, float s2, float g) {
  return add_rn(mul_rn(s2, f[3]), mul_rn(f[4], mul_rn(g, g)));
}

// The new second moment update_rule<kAdam> computes for element (p, g, s2), without the rest of
// the step: the rank-1 prepass needs the row and column maxima of every new v before the step
// can quantize any of them. p matters only with kL2 (callers may pass 0 otherwise).
LOWBIT_HD float adam_new_v(const float* f, int flags, float p, float g, float s2) {
  g = (flags & kMaximize) ? -g : g;
  adam_decay(f, flags, p, g);
  return adam_second_moment(f, s2, g);
}

// The first part of update_rule: everything up to the gradient the moments take (maximize, the
// clip transform, momentum reset of s1/s2, decay of p before the update, coupled L2 decay,
// SPAM's spike clip). decay: the decoupled-decay factor in force.
// ALL: the transform's steps unconditional (clip_transform_all; the caller passed f[8] and the
// row through identity_row).
template <int KIND, bool CLIP, bool SPIKE, bool ALL = false>
LOWBIT_HD float rule_grad(const float* f, int flags, float& p, float g, float& s1, float& s2,
                          const OptClipRow& ct, float decay, bool& clipped) {
  g = (flags & kMaximize) ? -g : g;
  clipped = false;
  if (CLIP && ALL) g = clip_transform_all(g, f[8], ct.xf, clipped);
  else if (CLIP) g = clip_transform(g, flags, f[8], ct.xf, clipped);
  const float s2_loaded = s2;
  if (CLIP) {
    s1 = (flags & kReset) ? 0.0f : s1;
    s2 = (flags & kReset) ? 0.0f : s2;
  }
  const bool decay_now = ((flags & kDecay) != 0) & !(CLIP && (flags & kDecayAfter));
  if (KIND == kAdam) {
    p = decay_now ? mul_rn(p, decay) : p;
    g = (flags & kL2) ? add_rn(g, mul_rn(f[1], p)) : g;
    if (SPIKE) {
      const float lim = mul_rn(f[9], s2_loaded > f[10] ? s2_loaded : f[10]);
      const bool over = ((flags & kSpikeClip) != 0) & (mul_rn(g, g) > lim);
      const float root = sqrt_rn(lim);
      g = over ? (g < 0.0f ? -root : root) : g;
      clipped = clipped | over;
    }
  } else if (KIND == kLion || KIND == kSophia) {
    p = decay_now ? mul_rn(p, decay) : p;
  } else {  // kSgd
    g = (flags & kL2) ? add_rn(g, mul_rn(f[0], p)) : g;
  }
  (void)s2_loaded;
  return g;
}

// Adam's decoupled-decay factor and step size for a tensor: its clip row's with kUpdateScale.
template <bool CLIP>
LOWBIT_HD float adam_decay_factor(const float* f, int flags, const OptClipRow& ct) {
  return (CLIP && (flags & kUpdateScale)) ? ct.decay : f[0];
}

// One element of one step, rule KIND. p: the fp32 parameter (kahan: value + compensation);
// s1/s2: the dequantized (or fp32) states — Adam: exp_avg / exp_avg_sq; Lion: exp_avg / unused;
// SGD: momentum_buffer (untouched with kNoMomentum) / unused. All updated in place. The flag
// branches are written as selects of values computed either way: same results as skipping the
// operation, and a CPU loop over elements stays branch-free (vectorizes). CLIP = false compiles
// the rule without the clipping steps (flags & kAnyClip must then be 0) and SPIKE = false without
// the spike clip (flags & kSpikeClip must be 0): the CPU's plain steps pay nothing for them, and
// only SPAM's pay for the spike clip's square root. ct: the tensor's clip row. Returns whether an
// element-wise clip (value clip, AdaClip, spike clip) changed the gradient.
// CURV = false compiles the rule without the curvature flags (flags & kCurvFlags must then be
// 0): their selects, and AdaHessian's second square root, cost the CPU's other steps nothing.
// h: the Hessian-diagonal estimate of this element (read with kHessEma only).
template <int KIND, bool CLIP = true, bool SPIKE = CLIP, bool ALL = false, bool CURV = false>
LOWBIT_HD bool update_rule(const float* f, int flags, float& p, float g, float& s1, float& s2,
                           const OptClipRow& ct, float h = 0.0f) {
  const float decay = KIND == kAdam ? adam_decay_factor<CLIP>(f, flags, ct) : f[0];
  bool clipped;
  g = rule_grad<KIND, CLIP, SPIKE, ALL>(f, flags, p, g, s1, s2, ct, decay, clipped);
  const bool hess_ema = CURV && (flags & kHessEma);
  if (KIND == kAdam) {
    s1 = add_rn(s1, mul_rn(f[2], sub_rn(g, s1)));
    const float v_g = adam_second_moment(f, s2, g);
    if (CURV) {  // AdaHessian (kHessV): v follows the Hessian estimate, not g
      const float v_h = hess_ema ? adam_second_moment(f, s2, h) : s2;
      s2 = (flags & kHessV) ? v_h : v_g;
    } else {
      s2 = v_g;
    }
    float root = sqrt_rn(s2);
    if (CURV) root = (flags & kQuarter) ? sqrt_rn(root) : root;
    const float d = add_rn(root, f[5]);
    const float step = (CLIP && (flags & kUpdateScale)) ? ct.step : f[6];
    p = sub_rn(p, mul_rn(step, div_rn(s1, d)));
  } else if (KIND == kSophia) {
    s1 = add_rn(s1, mul_rn(f[2], sub_rn(g, s1)));
    s2 = hess_ema ? add_rn(mul_rn(s2, f[3]), mul_rn(f[4], h)) : s2;
    const float gh = mul_rn(f[1], s2);
    const float d = (CURV && (flags & kSophiaAddEps)) ? add_rn(gh, f[5]) : (gh > f[5] ? gh : f[5]);
    float u = div_rn(s1, d);
    u = u > f[7] ? f[7] : (u < -f[7] ? -f[7] : u);
    p = sub_rn(p, mul_rn(f[6], u));
  } else if (KIND == kLion) {
    const float c = add_rn(mul_rn(f[1], s1), mul_rn(f[2], g));
    p = sub_rn(p, mul_rn(f[5], sign_of(c)));
    s1 = add_rn(mul_rn(f[3], s1), mul_rn(f[4], g));
  } else {  // kSgd
    const float b = (flags & kFirstStep) ? g : add_rn(mul_rn(f[1], s1), mul_rn(f[2], g));
    const float d = (flags & kNesterov) ? add_rn(g, mul_rn(f[1], b)) : b;
    const bool plain = flags & kNoMomentum;
    s1 = plain ? s1 : b;
    p = sub_rn(p, mul_rn(f[3], plain ? g : d));
  }
  if (CLIP && (KIND == kAdam || KIND == kLion))
    p = (flags & kDecay) && (flags & kDecayAfter) ? mul_rn(p, decay) : p;
  (void)s2;
  return clipped;
}

// One element's term of the update-clipping statistics (StableAdamW's RMS; reference.optim):
// q = g*g / max(v, eps_t*eps_t) with the gradient and the new second moment of the Adam step
// (same arithmetic as update_rule<kAdam>; nothing is written).
template <bool CLIP, bool SPIKE, bool ALL = false>
LOWBIT_HD float adam_rms_term(const float* f, int flags, float p, float g, float s1, float s2,
                              const OptClipRow& ct) {
  bool clipped;
  g = rule_grad<kAdam, CLIP, SPIKE, ALL>(f, flags, p, g, s1, s2, ct,
                                    adam_decay_factor<CLIP>(f, flags, ct), clipped);
  const float v = adam_second_moment(f, s2, g);
  const float floor = mul_rn(f[5], f[5]);
  return div_rn(mul_rn(g, g), v > floor ? v : floor);
}

// The fp32 value a step starts from: the parameter widened exactly, plus the compensation for
// kahan (one fp32 rounding).
LOWBIT_HD float load_param(const void* p, const void* comp, int dtype, int wb, int64_t i) {
  const float v = load_f32(p, dtype, i);
  return wb == kWbKahan ? add_rn(v, load_f32(comp, dtype, i)) : v;
}

// Store the new fp32 value x of element i. Stochastic: Philox word i mod 4 of counter i / 4 under
// the tensor's step key (reference.optim.sr_key). Kahan: hi = nearest(x), comp = nearest(x - hi),
// where x - hi is exact in fp32, so (hi, comp) carries ~16 significant bits.
LOWBIT_HD void store_param(void* p, void* comp, int dtype, int wb, uint64_t key, int64_t i,
                           float x) {
  if (wb == kWbF32) {
    ((float*)p)[i] = x;
    return;
  }
  const Fmt fmt = fmt_of(dtype);
  if (wb == kWbStochastic) {
    ((uint16_t*)p)[i] =
        (uint16_t)round_to_fmt(f32_bits(x), fmt, true, philox_word_of(key, (uint64_t)i));
    return;
  }
  const uint16_t hi = (uint16_t)round_to_fmt(f32_bits(x), fmt, false, 0u);
  ((uint16_t*)p)[i] = hi;
  if (wb == kWbKahan) {
    const float hv = dtype == kBF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
    ((uint16_t*)comp)[i] = (uint16_t)round_to_fmt(f32_bits(sub_rn(x, hv)), fmt, false, 0u);
  }
}

}  // namespace lowbit
