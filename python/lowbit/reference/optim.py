"""Reference fused optimizer step (Adam/AdamW, Lion, SGD with momentum) with 32-, 8- and 4-bit
states and fp32 / bf16 / fp16 parameters: the spec every backend's lowbit::optim_step must
reproduce bit for bit. The per-element math is csrc/include/lowbit/optim_math.h.

Per element, every operation rounded once in fp32, in this order:

  load     x = fp32(p)                                  exact widening
           x = x + fp32(comp)                           kahan write-back only
  all      g = -g                                       if MAXIMIZE
           g = clip transform (value clip, per-tensor   if any of its flags (reference.clip;
               scale, AdaClip, AdaGN scale k_t)         lowbit.clip's policies set them)
  Adam     x = x * decay                                if DECAY and not DECAY_AFTER
           g = g + wd * x                               if L2      (Adam's coupled decay)
           g = copysign(sqrt(lim), g)                   if SPIKE_CLIP and g * g > lim, where
                                                        lim = theta * max(v, floor) (SPAM,
                                                        against the loaded v; the floor keeps
                                                        a v quantized to 0 from zeroing g)
           m = 0, v = 0                                 if RESET   (momentum reset)
           m = m + a1 * (g - m)                         a1 = 1 - beta1   (torch's lerp)
           v = v * b2 + a2 * (g * g)                    b2 = beta2, a2 = 1 - beta2
           d = sqrt(v) + eps_t                          eps_t = eps * bc2
           x = x - step_size * (m / d)                  step_size = lr * bc2 / (1 - beta1**t)
                                                        bc2 = sqrt(1 - beta2**t)
           (with UPDATE_SCALE the tensor's clip row gives step_size (column 4) and the decay
           factor (column 5) instead of the group's: StableAdamW's update clipping)
           x = x * decay                                if DECAY and DECAY_AFTER (SPAM's order)
           (torch's sqrt(v) / bc2 + eps with both bias corrections folded into the scalars, as
           bitsandbytes does: one division per element instead of two, equal up to rounding)
           (with HESS_V, AdaHessian: v takes the Hessian-diagonal estimate h instead of g:
           v = v * b2 + a2 * (h * h) with HESS_EMA, v unchanged without; with QUARTER,
           d = sqrt(sqrt(v)) + eps_t, hessian_power 1/2 with the bias corrections folded
           likewise)
  Sophia   x = x * decay                                if DECAY
           m = m + a1 * (g - m)
           s = s * b2 + a2 * h                          if HESS_EMA (h: the estimate, fp32)
           d = max(gamma * s, eps)                      (gamma * s + eps with SOPHIA_ADD_EPS,
                                                        the official SophiaG code's form;
                                                        max: gamma * s > eps ? gamma * s : eps)
           u = clamp(m / d, -c, c)                      (c: the clip threshold)
           x = x - lr * u
  Lion     x = x * decay                                if DECAY   (decay = 1 - lr*wd)
           m = 0                                        if RESET
           c = b1 * m + a1 * g                          (Chen et al. 2023, Alg. 2)
           x = x - lr * sign(c)                         sign(+-0) = +-0, sign(NaN) = NaN
           m = b2 * m + a2 * g
  SGD      g = g + wd * x                               if L2
           b = 0 before the update                      if RESET
           b = g                                        if FIRST_STEP (torch clones the grad)
           b = momentum * b + damp * g                  otherwise     (damp = 1 - dampening)
           d = g + momentum * b if NESTEROV else b      (d = g with NO_MOMENTUM: no state)
           x = x - lr * d
  store    fp32 params: x.  bf16/fp16: "nearest" -> round-to-nearest-even(x); "stochastic" ->
           stochastic rounding with Philox word i % 4 of counter i // 4 for element i (one
           Philox evaluation per four elements), key = sr_key(seed, param_id, step);
           "kahan" -> p = nearest(x), comp = nearest(x - fp32(p)) (exact difference), so the
           pair holds ~16 significant bits.

Update-clipping statistics (fused_step with `rms`, Adam only): nothing is written; per tensor,
the sum over its elements of q = (g * g) / max(v, eps_t * eps_t), with g the gradient that enters
the moments and v the new second moment, both exactly as the step above computes them (fp32,
each operation rounded once), added into rms[i] in float64 (backends may add in another order).
lowbit.clip.UpdateClip turns the sums into each tensor's StableAdamW step size.

Host scalars are computed in float64 and rounded to fp32 once. Quantized states (first state,
signed: 8-bit "dynamic" / 4-bit "dynamic4"; second state, unsigned: "udynamic" /
"linear4_nozero", except Sophia's, whose Hessian EMA can be negative: signed like the first;
blocks of 256 / 128) are dequantized before the update; the parameter update
uses the unquantized new states, which are then quantized with nearest rounding against the
absmax of the new values (lowbit.reference.quant), with one exception (zero_floor): a positive
8-bit second moment never takes the unsigned map's zero code, but its smallest positive one.

Rank-1 second moment (Adam, 4-bit states, per tensor: v_cols > 0): v is stored as
"linear4_nozero" codes of the tensor viewed as a [numel // v_cols, v_cols] matrix, scaled by
min(row maximum, column maximum) instead of a block absmax (lowbit.reference.rank1). The new v is
computed per element exactly as above; its row and column maxima (which need every new element
before any code can be written) scale the new codes, while the old codes decode with the old
maxima. The first moment stays block-wise.
"""
import math
import struct

import torch

from . import rank1
from .quant import dequantize_blockwise, quantize_blockwise
from .rounding import round_to_format
from .philox import philox_word_of
from . import clip
from .. import codebooks

# state_bits -> (first-state codebook, second-state codebook, block size)
STATE_FORMATS = {8: ("dynamic", "udynamic", 256), 4: ("dynamic4", "linear4_nozero", 128)}

KINDS = {"adam": 0, "lion": 1, "sgd": 2, "sophia": 3}
MAXIMIZE, DECAY, L2, NESTEROV, FIRST_STEP, NO_MOMENTUM = 1, 2, 4, 8, 16, 32
# The clipping bits (lowbit.clip): the gradient transform's (reference.clip: VALUE_CLIP 64,
# TENSOR_SCALE 128, ADA_CLIP 256, NORM_SCALE 512), then these.
SPIKE_CLIP, RESET, DECAY_AFTER, UPDATE_SCALE = 1024, 2048, 4096, 8192
CLIP_FLAGS = clip.TRANSFORM_FLAGS | SPIKE_CLIP | RESET | DECAY_AFTER | UPDATE_SCALE
# The curvature optimizers' bits: the step takes a Hessian-diagonal estimate (HESS_EMA; Sophia's
# EMA, or AdaHessian's v with HESS_V), AdaHessian's hessian_power 1/2 (QUARTER), and the
# official SophiaG denominator gamma * h + eps (SOPHIA_ADD_EPS).
HESS_EMA, HESS_V, QUARTER, SOPHIA_ADD_EPS = 16384, 32768, 65536, 131072
HESS_FLAGS = HESS_EMA | HESS_V | QUARTER | SOPHIA_ADD_EPS
# Scalars per step: the rule's 8 (below), then the value-clip bound, SPAM's threshold theta and
# the floor of v in its spike test.
NSCALARS = 11
# The flags that read the per-tensor clip table.
PER_TENSOR_FLAGS = clip.TENSOR_SCALE | clip.ADA_CLIP | clip.NORM_SCALE | UPDATE_SCALE
# Per-tensor clip row (s, thr, r, k, step size, decay; the last two read only with UPDATE_SCALE)
# that changes nothing.
NO_CLIP = (1.0, 0.0, 1.0, 1.0, 0.0, 1.0)
WRITEBACK = {"f32": 0, "nearest": 1, "stochastic": 2, "kahan": 3}

# State tensor names per rule (torch's names where torch has the optimizer).
STATE_NAMES = {"adam": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg",),
               "sgd": ("momentum_buffer",), "sophia": ("exp_avg", "hessian")}
# Rules whose second state is signed (quantized with the first state's codebook).
SIGNED_SECOND = ("sophia",)


def f32(x: float) -> float:
    """Round a Python float (float64) to the nearest fp32 value."""
    return struct.unpack("f", struct.pack("f", x))[0]


def with_clip_scalars(scalars, value_clip: float = 0.0, spike_threshold: float = 0.0,
                      spike_floor: float = 0.0) -> list:
    """The rule's 8 scalars followed by the clip scalars (NSCALARS in all)."""
    return list(scalars[:8]) + [f32(value_clip), f32(spike_threshold), f32(spike_floor)]


def adam_scalars(lr, beta1, beta2, eps, weight_decay, step, decoupled=True) -> list:
    """[decay, wd, a1, b2, a2, eps_t, step_size, 0] of one Adam/AdamW step (then the two clip
    scalars, 0: with_clip_scalars sets them)."""
    bc2 = math.sqrt(1.0 - beta2 ** step)
    return with_clip_scalars([f32(1.0 - lr * weight_decay) if decoupled else 1.0,
                              0.0 if decoupled else f32(weight_decay),
                              f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2),
                              f32(eps * bc2), f32(lr * bc2 / (1.0 - beta1 ** step)), 0.0])


def lion_scalars(lr, beta1, beta2, weight_decay) -> list:
    """[decay, b1, a1, b2, a2, lr, 0, 0] of one Lion step (decoupled weight decay), then the clip
    scalars."""
    return with_clip_scalars([f32(1.0 - lr * weight_decay), f32(beta1), f32(1.0 - beta1),
                              f32(beta2), f32(1.0 - beta2), f32(lr), 0.0, 0.0])


def sophia_scalars(lr, beta1, beta2, gamma, eps, clip_threshold, weight_decay) -> list:
    """[decay, gamma, a1, b2, a2, eps, lr, c] of one Sophia step (decoupled weight decay), then
    the clip scalars."""
    return with_clip_scalars([f32(1.0 - lr * weight_decay), f32(gamma), f32(1.0 - beta1),
                              f32(beta2), f32(1.0 - beta2), f32(eps), f32(lr),
                              f32(clip_threshold)])


def sgd_scalars(lr, momentum, dampening, weight_decay) -> list:
    """[wd, momentum, 1 - dampening, lr, 0, 0, 0, 0] of one SGD step, then the clip scalars."""
    return with_clip_scalars([f32(weight_decay), f32(momentum), f32(1.0 - dampening), f32(lr),
                              0.0, 0.0, 0.0, 0.0])


def step_flags(kind: str, scalars, maximize=False, nesterov=False, first_step=False) -> int:
    """The branch flags of one step, decided from the scalars as every backend must."""
    flags = MAXIMIZE if maximize else 0
    if kind in ("adam", "lion", "sophia") and scalars[0] != 1.0:
        flags |= DECAY
    if kind == "adam" and scalars[1] != 0.0:
        flags |= L2
    if kind == "sgd":
        if scalars[0] != 0.0:
            flags |= L2
        if scalars[1] == 0.0:
            flags |= NO_MOMENTUM
        else:
            flags |= (NESTEROV if nesterov else 0) | (FIRST_STEP if first_step else 0)
    return flags


def _mix64(z: int) -> int:
    # splitmix64's finalizer: a bijection of 64-bit integers with good avalanche
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def sr_key(seed: int, param_id: int, step: int) -> int:
    """Philox key of the stochastic-rounding stream of one parameter at one step: a hash of (seed,
    param_id, step), 63 bits (it travels as a signed int64). Element i uses counter i, so every
    (parameter, step) has its own stream and a resumed run draws the same bits."""
    z = _mix64((seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    z ^= ((step & 0xFFFFFFFF) << 32) | (param_id & 0xFFFFFFFF)
    return _mix64(z) >> 1


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # IEEE fp32 division; float64 then one rounding is exact, and avoids torch's reciprocal
    # multiply for scalar divisors.
    return (a.double() / b.double()).float()


def _sqrt(a: torch.Tensor) -> torch.Tensor:
    # Correctly rounded fp32 square root: torch's vectorized CPU sqrt is not (it differs from
    # IEEE sqrt in the last bit for some inputs); float64 then one rounding is exact.
    return torch.sqrt(a.double()).float()


def _sign(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c > 0, _t(1.0), torch.where(c < 0, _t(-1.0), c))


def update(kind: str, x, g, s1, s2, sc, flags, ct=NO_CLIP, rms_terms=False, h=None):
    """One fp32 update (module docstring) of parameter value x by gradient g with states s1, s2
    (None where the rule has none); ct: the tensor's clip row (s, thr, r, k, step size, decay);
    h: the Hessian-diagonal estimate (fp32, read with HESS_EMA).
    Returns the new (x, s1, s2) and the mask of the elements whose gradient an element-wise clip
    (value clip, AdaClip, SPAM's spike clip) changed. With rms_terms (Adam), returns only the
    per-element terms q of the update-clipping statistics instead."""
    x, g = x.float(), g.float()
    if flags & MAXIMIZE:
        g = -g
    g, clipped = clip.transform_grad(g, flags, sc[8] if len(sc) > 8 else 0.0, *ct[:4],
                                     with_mask=True)
    per_tensor_step = kind == "adam" and flags & UPDATE_SCALE
    decay = ct[5] if per_tensor_step else sc[0]
    decay_now = flags & DECAY and not flags & DECAY_AFTER
    if flags & RESET:
        s1 = None if s1 is None else torch.zeros_like(s1)
        s2_loaded, s2 = s2, None if s2 is None else torch.zeros_like(s2)
    else:
        s2_loaded = s2
    if kind == "adam":
        if decay_now:
            x = x * _t(decay)
        if flags & L2:
            g = g + _t(sc[1]) * x
        if flags & SPIKE_CLIP:
            lim = _t(sc[9]) * torch.where(s2_loaded > sc[10], s2_loaded, _t(sc[10]))
            over = g * g > lim
            g = torch.where(over, torch.copysign(_sqrt(lim), g), g)
            clipped = clipped | over
        s1 = s1 + _t(sc[2]) * (g - s1)
        if not flags & HESS_V:
            s2 = s2 * _t(sc[3]) + _t(sc[4]) * (g * g)
        elif flags & HESS_EMA:
            h = h.float()
            s2 = s2 * _t(sc[3]) + _t(sc[4]) * (h * h)
        if rms_terms:
            floor = _t(sc[5]) * _t(sc[5])
            return _div(g * g, torch.where(s2 > floor, s2, floor))
        root = _sqrt(_sqrt(s2)) if flags & QUARTER else _sqrt(s2)
        d = root + _t(sc[5])
        x = x - _t(ct[4] if per_tensor_step else sc[6]) * _div(s1, d)
    elif kind == "sophia":
        if decay_now:
            x = x * _t(decay)
        s1 = s1 + _t(sc[2]) * (g - s1)
        if flags & HESS_EMA:
            s2 = s2 * _t(sc[3]) + _t(sc[4]) * h.float()
        gh = _t(sc[1]) * s2
        if flags & SOPHIA_ADD_EPS:
            d = gh + _t(sc[5])
        else:
            d = torch.where(gh > sc[5], gh, _t(sc[5]))
        u = _div(s1, d)
        u = torch.where(u > sc[7], _t(sc[7]), torch.where(u < -sc[7], _t(-sc[7]), u))
        x = x - _t(sc[6]) * u
    elif kind == "lion":
        if decay_now:
            x = x * _t(decay)
        c = _t(sc[1]) * s1 + _t(sc[2]) * g
        x = x - _t(sc[5]) * _sign(c)
        s1 = _t(sc[3]) * s1 + _t(sc[4]) * g
    else:
        if flags & L2:
            g = g + _t(sc[0]) * x
        d = g
        if not flags & NO_MOMENTUM:
            s1 = g.clone() if flags & FIRST_STEP else _t(sc[1]) * s1 + _t(sc[2]) * g
            d = g + _t(sc[1]) * s1 if flags & NESTEROV else s1
        x = x - _t(sc[3]) * d
    if kind in ("adam", "lion") and flags & DECAY and flags & DECAY_AFTER:
        x = x * _t(decay)
    return x, s1, s2, clipped


def load_param(p: torch.Tensor, comp: torch.Tensor | None, writeback: str) -> torch.Tensor:
    x = p.float()
    if writeback == "kahan":
        x = x + comp.float()
    return x


def store_param(x: torch.Tensor, dtype: torch.dtype, writeback: str, key: int = 0):
    """(new parameter, new compensation or None) in `dtype` from the fp32 value x."""
    if writeback == "f32":
        return x, None
    if writeback == "stochastic":
        r = philox_word_of(key, torch.arange(x.numel(), dtype=torch.int64)).reshape(x.shape)
        return round_to_format(x, dtype, r), None
    hi = round_to_format(x, dtype)
    if writeback == "kahan":
        return hi, round_to_format(x - hi.float(), dtype)
    return hi, None


# --- state storage ------------------------------------------------------------------------------

BLOCK_SIZES = tuple(2**k for k in range(5, 13))  # 32 .. 4096: what every backend supports


def state_codebook(index: int, state_bits: int, block_size: int = 0, kind: str = "adam") -> tuple:
    """(codebook name, block size) of state `index` (0: signed first state, 1: the second,
    unsigned but for the rules of SIGNED_SECOND); block_size 0 means the format's default (256
    for 8-bit, 128 for 4-bit)."""
    first, second, block = STATE_FORMATS[state_bits]
    signed = index == 0 or kind in SIGNED_SECOND
    return (first if signed else second), block_size or block


def quantize_state(x: torch.Tensor, index: int, state_bits: int, block_size: int = 0,
                   kind: str = "adam"):
    """(flat uint8 codes, fp32 absmax per block) of fp32 state values: nearest rounding, except
    that a positive value never takes the zero code of an unsigned codebook (zero_floor)."""
    name, block = state_codebook(index, state_bits, block_size, kind)
    code = codebooks.codebook(name)
    flat = x.reshape(-1).float()
    codes, absmax = quantize_blockwise(flat, code, block)
    return zero_floor(codes, flat, code), absmax


def zero_floor(codes: torch.Tensor, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Codes of an optimizer state with the zero floor: where the codebook starts with 0 (the
    unsigned 8-bit "udynamic" map of the second moment), a value x > 0 whose nearest code is
    that 0 takes code 1 (the smallest positive entry, 3.25e-7 x absmax) instead.

    Why: v ~ m**2 underflows the block's range long before m does (a gradient 4e-4 times the
    block's largest gives v below the map's first midpoint, 1.6e-7 of its absmax, while m is
    still representable). A v stored as 0 with m non-zero makes the next step lr * m / eps —
    hundreds of lr, e.g. for rare embedding rows that share a block with frequent ones (the
    reason bitsandbytes advises 32-bit states for embeddings; the 4-bit optimizer paper's
    "zero-point problem" of the second moment). The floor bounds that step and otherwise
    changes nothing: v = 0 stays 0. 4-bit maps and signed maps do not start with 0: no-op.
    Only 8-bit codes (one per byte) can hit it."""
    if float(code[0]) != 0.0 or code.numel() != 256:
        return codes
    return torch.where((codes == 0) & (x > 0), torch.ones_like(codes), codes)


def dequantize_state(codes, absmax, index: int, state_bits: int, shape,
                     block_size: int = 0, kind: str = "adam") -> torch.Tensor:
    name, block = state_codebook(index, state_bits, block_size, kind)
    return dequantize_blockwise(codes, absmax, codebooks.codebook(name), block, shape,
                                torch.float32)


def quantize_state_rank1(x: torch.Tensor, cols: int):
    """(packed codes, row maxima, column maxima) of a 4-bit second state (fp32 values) viewed as
    [numel // cols, cols]."""
    return rank1.quantize(x.reshape(-1).float(), cols, codebooks.codebook(STATE_FORMATS[4][1]))


def dequantize_state_rank1(codes, row_max, col_max, shape) -> torch.Tensor:
    return rank1.dequantize(codes, row_max, col_max, codebooks.codebook(STATE_FORMATS[4][1]),
                            shape)


def fused_step(kind: str, params, grads, state1, absmax1, state2, absmax2, comps, keys,
               state_bits: int, block_size: int, scalars, flags: int, writeback: str,
               v_cols=(), v_colmax=(), clip_table=None, clipped=None, rms=None,
               hess=()) -> None:
    """lowbit.ops.optim_step's contract, one tensor at a time, in place. state1/state2 are fp32
    tensors shaped like the params (state_bits 32) or flat uint8 codes with fp32 absmax per block;
    empty lists where the rule has no such state. comps: kahan compensations (else empty); keys:
    per-tensor stochastic-rounding keys (else ignored); block_size: of the quantized states (0:
    the format's default). v_cols (empty: all 0): per tensor, 0 for a block-wise second state, or
    the column count C of a rank-1 one (Adam, state_bits 4), whose absmax2 entry then holds the
    row maxima [numel // C] and v_colmax entry the column maxima [C]. scalars: NSCALARS;
    clip_table: fp32 [n, 6] clip rows (s, thr, r, k, step size, decay) or None; clipped: int64
    [n] counters of the elements an element-wise clip changed, or None. rms: float64 [n], or
    None: with it (Adam only), the call writes nothing and adds each tensor's update-clipping
    sum (module docstring) into rms[i]. hess: per tensor, the fp32 Hessian-diagonal estimate
    shaped like the param, needed with HESS_EMA (else empty)."""
    if len(scalars) != NSCALARS:
        raise ValueError(f"expected {NSCALARS} scalars (with_clip_scalars), got {len(scalars)}")
    if flags & PER_TENSOR_FLAGS and clip_table is None:
        raise ValueError("the per-tensor clip flags need the clip table (clip_table)")
    if (rms is not None or flags & UPDATE_SCALE) and kind != "adam":
        raise ValueError("update clipping (rms, UPDATE_SCALE) needs the Adam rule")
    if flags & HESS_FLAGS and kind not in ("adam", "sophia"):
        raise ValueError("the Hessian flags need the Adam (AdaHessian) or Sophia rule")
    if flags & HESS_EMA and len(hess) != len(params):
        raise ValueError("HESS_EMA needs one Hessian-diagonal estimate per tensor (hess)")
    if flags & HESS_FLAGS and (rms is not None or flags & (UPDATE_SCALE | SPIKE_CLIP)):
        raise ValueError("the Hessian flags do not combine with update or spike clipping")
    if any(v_cols) and (flags & (CLIP_FLAGS | HESS_FLAGS) or rms is not None):
        # the backends' rank-1 prepass computes the new v without the clipping steps
        raise ValueError("rank-1 second states do not support the clip flags yet")
    nstates = 2 if state2 else (1 if state1 else 0)
    if any(v_cols) and (kind != "adam" or state_bits != 4 or nstates != 2):
        raise ValueError("rank-1 second states need Adam with 4-bit states")
    for i, (p, g) in enumerate(zip(params, grads)):
        cols = v_cols[i] if v_cols else 0
        if cols:
            rank1.matrix_shape(p.numel(), cols)  # before anything changes
        x = load_param(p, comps[i] if comps else None, writeback)
        s = [None, None]
        for j, (st, am) in enumerate(((state1, absmax1), (state2, absmax2))[:nstates]):
            if state_bits == 32:
                s[j] = st[i].float()
            elif j == 1 and cols:
                s[j] = dequantize_state_rank1(st[i], am[i], v_colmax[i], p.shape)
            else:
                s[j] = dequantize_state(st[i], am[i], j, state_bits, p.shape, block_size, kind)
        ct = NO_CLIP if clip_table is None else tuple(clip_table[i].tolist())
        if rms is not None:
            rms[i] += update(kind, x, g, s[0], s[1], scalars, flags, ct, True).double().sum()
            continue
        x, s[0], s[1], changed = update(kind, x, g, s[0], s[1], scalars, flags, ct,
                                        h=hess[i] if flags & HESS_EMA else None)
        if clipped is not None:
            clipped[i] += int(changed.sum())
        for j, (st, am) in enumerate(((state1, absmax1), (state2, absmax2))[:nstates]):
            if state_bits == 32:
                st[i].copy_(s[j])
            elif j == 1 and cols:
                codes, r, c = quantize_state_rank1(s[j], cols)
                st[i].copy_(codes)
                am[i].copy_(r)
                v_colmax[i].copy_(c)
            else:
                codes, a = quantize_state(s[j], j, state_bits, block_size, kind)
                st[i].copy_(codes)
                am[i].copy_(a)
        new_p, new_c = store_param(x, p.dtype, writeback, keys[i] if keys else 0)
        p.copy_(new_p)
        if new_c is not None:
            comps[i].copy_(new_c)
