"""Fused multi-tensor optimizer step (Adam/AdamW, Lion, SGD with momentum, Sophia) in Triton. Spec:
lowbit.reference.optim.fused_step; per-element math: csrc/include/lowbit/optim_math.h.

One launch per call updates every tensor of a parameter group: the host builds a pointer table
(int64 addresses of param, grad, state1, absmax1, state2, absmax2, kahan compensation, the
stochastic-rounding key and the element count of each tensor, its rank-1 fields, its clip row,
its clipped-element counter and its Hessian-diagonal estimate) and a work table of (tensor, first
block) items; program w loads item w, casts the addresses back to typed pointers and updates ROWS
consecutive blocks of that tensor as a [ROWS, BLOCK] tile. Checked: the int64 -> pointer cast
works under TRITON_INTERPRET=1 and compiles for sm_80/sm_90 (tests/test_triton_aot.py).

Per element, every operation is rounded once in fp32 (launched with enable_fp_fusion=False, IEEE
tl.math.div_rn / sqrt_rn), in the spec's order. bf16/fp16 params, grads and compensations travel
as int16 bits: widened exactly on load and narrowed with the integer routine round_to_fmt (the
interpreter's float casts mis-round). Quantized states (8-bit: block 256, one code per byte; 4-bit:
block 128, element 2j in the high nibble of byte j) are dequantized per block, updated, and
requantized against the absmax of the new values with nearest rounding, exactly as
triton_kernels/quant.py does. The rule and its flags (maximize, decay, L2, Nesterov, first step,
no momentum) are constexprs decided on the host, so "p * 1" and "g + 0 * p" are never evaluated
(they are not identities for -0, inf and NaN) and each variant carries only its own ops.

Rank-1 second states (4-bit Adam, per tensor v_cols = C > 0; lowbit/rank1.h) scale each element
of the [numel // C, C] view by min(row maximum, column maximum) of the NEW v. A call with such
tensors first runs _rank1_maxima_kernel over them (tiles of the matrix; the new v of every
element, whose |bits| go into zeroed scratch with tl.atomic_max per row and column, exact for
non-negative floats), then the step (RANK1: old codes decoded with the state's maxima, new codes
against the scratch's), then copies the new maxima into the state.

Update clipping (StableAdamW, Adam only): UPDATE_SCALE takes the step size and the decoupled-decay
factor from the tensor's clip row (columns 4 and 5). The statistics pass (optim_step rms=) is the
step kernel with the constexpr RMS: the same decode and rule_grad arithmetic up to the new v, then
q = g*g / max(v, eps_t*eps_t) (div_rn) summed per program in float64 and added by tl.atomic_add
into the tensor's rms slot (carried in the pointer table's counter column); no stores. The sums'
order differs from the CPU's (float64 rounding only). Rank-1 second states are refused there, as
with every clip flag.

Curvature optimizers: Sophia (KIND 3: decay, m lerp, with HESS_EMA the Hessian EMA s = s*b2 + a2*h,
d = max(gamma*s, eps) or gamma*s + eps with SOPHIA_ADD_EPS, u = clamp(div_rn(m, d), -c, c),
x - lr*u; its second state is signed, quantized with the first state's codebook) and AdaHessian
(Adam with HESS_V: v from h*h with HESS_EMA, unchanged without; QUARTER: sqrt_rn(sqrt_rn(v))). The
per-element fp32 estimate h comes from the pointer table's last column and is loaded only with
the constexpr HESS_EMA.
"""
import torch
import triton
import triton.language as tl

from ._common import (FORMATS, INTERP_MAX_PROGRAMS, INTERP_MAX_TILE, KINDS, LAUNCH_OPTS,
                      clip_transform, code_index, interpreting, load_as_f32, neg, pair_layout,
                      philox_word_of, quiet_fp_warnings, round_to_fmt, tile_rows, widen_to_f32)
from .quant import _scale_back, _unit_scale
from ..reference import clip as clip_ref
from ..reference import optim as ref

# Elements per "block" for 32-bit states (no quantization blocks: just the unit of a work item).
F32_BLOCK = 1024


@triton.jit
def _sign(c):
    # torch.sign: +-1, and c itself for +-0 and NaN
    return tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, c))


@triton.jit
def _negate(g, MAXIMIZE: tl.constexpr):
    if MAXIMIZE:
        g = neg(g)
    return g


@triton.jit
def _adam_decay(x, g, sc_ptr, DECAY: tl.constexpr, L2: tl.constexpr):
    """adam_decay of optim_math.h: decoupled decay of x, then the L2 term (of the decayed x)."""
    if DECAY:
        x = x * tl.load(sc_ptr + 0)
    if L2:
        g = g + tl.load(sc_ptr + 1) * x
    return x, g


@triton.jit
def _adam_second_moment(s2, g, sc_ptr):
    return s2 * tl.load(sc_ptr + 3) + tl.load(sc_ptr + 4) * (g * g)


@triton.jit
def _adam_new_v(x, g, s2, sc_ptr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr,
                L2: tl.constexpr):
    """adam_new_v of optim_math.h: the new second moment alone (the rank-1 prepass)."""
    x, g = _adam_decay(x, _negate(g, MAXIMIZE), sc_ptr, DECAY, L2)
    return _adam_second_moment(s2, g, sc_ptr)


@triton.jit
def _rule_grad(x, g, s1, s2, sc_ptr, ct_ptr, decay_ptr, KIND: tl.constexpr,
               MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, L2: tl.constexpr,
               VALUE_CLIP: tl.constexpr, TENSOR_SCALE: tl.constexpr, ADA_CLIP: tl.constexpr,
               NORM_SCALE: tl.constexpr, SPIKE_CLIP: tl.constexpr, RESET: tl.constexpr,
               DECAY_AFTER: tl.constexpr):
    """rule_grad of optim_math.h: everything up to the gradient the moments take (maximize, the
    clip transform, momentum reset, decay of x before the update, L2, SPAM's spike clip). Returns
    (x, g, s1, s2, clipped); decay_ptr: the decoupled-decay factor in force."""
    g = _negate(g, MAXIMIZE)
    g, clipped = clip_transform(g, ct_ptr, sc_ptr + 8, VALUE_CLIP, TENSOR_SCALE, ADA_CLIP,
                                NORM_SCALE)
    s2_loaded = s2
    if RESET:  # (an unused state's placeholder becomes a zero tile: harmless)
        s1 = tl.zeros_like(g)
        s2 = tl.zeros_like(g)
    if KIND == 0:  # Adam: decay, wd, a1, b2, a2, eps_t, step_size
        if DECAY and not DECAY_AFTER:
            x = x * tl.load(decay_ptr)
        if L2:
            g = g + tl.load(sc_ptr + 1) * x
        if SPIKE_CLIP:
            floor = tl.load(sc_ptr + 10)
            lim = tl.load(sc_ptr + 9) * tl.where(s2_loaded > floor, s2_loaded, floor)
            over = g * g > lim
            root = tl.math.sqrt_rn(lim)
            g = tl.where(over, tl.where(g < 0.0, neg(root), root), g)
            clipped = clipped | over
    elif KIND == 1 or KIND == 3:  # Lion: decay, b1, a1, b2, a2, lr; Sophia: decay, gamma, ...
        if DECAY and not DECAY_AFTER:
            x = x * tl.load(decay_ptr)
    else:  # SGD: wd, momentum, damp, lr
        if L2:
            g = g + tl.load(sc_ptr + 0) * x
    return x, g, s1, s2, clipped


@triton.jit
def _adam_ptrs(sc_ptr, ct_ptr, KIND: tl.constexpr, UPDATE_SCALE: tl.constexpr):
    """(decay factor, step size) addresses: the scalars', or with UPDATE_SCALE (Adam) the clip
    row's columns 5 and 4 (adam_decay_factor / kUpdateScale of optim_math.h)."""
    decay_ptr = sc_ptr
    step_ptr = sc_ptr + 6
    if UPDATE_SCALE and KIND == 0:
        decay_ptr = ct_ptr + 5
        step_ptr = ct_ptr + 4
    return decay_ptr, step_ptr


@triton.jit
def _update(x, g, s1, s2, h, sc_ptr, ct_ptr, KIND: tl.constexpr, MAXIMIZE: tl.constexpr,
            DECAY: tl.constexpr, L2: tl.constexpr, NESTEROV: tl.constexpr,
            FIRST_STEP: tl.constexpr, NO_MOMENTUM: tl.constexpr, VALUE_CLIP: tl.constexpr,
            TENSOR_SCALE: tl.constexpr, ADA_CLIP: tl.constexpr, NORM_SCALE: tl.constexpr,
            SPIKE_CLIP: tl.constexpr, RESET: tl.constexpr, DECAY_AFTER: tl.constexpr,
            UPDATE_SCALE: tl.constexpr, HESS_EMA: tl.constexpr, HESS_V: tl.constexpr,
            QUARTER: tl.constexpr, SOPHIA_ADD_EPS: tl.constexpr):
    """update_rule of optim_math.h: the new (x, s1, s2) and the clipped mask. Scalars
    sc_ptr[0..10] as there; ct_ptr: the tensor's clip row (s, thr, r, k, step size, decay);
    h: the Hessian-diagonal estimate (read only with HESS_EMA)."""
    decay_ptr, step_ptr = _adam_ptrs(sc_ptr, ct_ptr, KIND, UPDATE_SCALE)
    x, g, s1, s2, clipped = _rule_grad(x, g, s1, s2, sc_ptr, ct_ptr, decay_ptr, KIND, MAXIMIZE,
                                       DECAY, L2, VALUE_CLIP, TENSOR_SCALE, ADA_CLIP,
                                       NORM_SCALE, SPIKE_CLIP, RESET, DECAY_AFTER)
    if KIND == 0:  # Adam
        s1 = s1 + tl.load(sc_ptr + 2) * (g - s1)
        if HESS_V:  # AdaHessian: v follows the Hessian estimate, not g (frozen without HESS_EMA)
            if HESS_EMA:
                s2 = _adam_second_moment(s2, h, sc_ptr)
        else:
            s2 = _adam_second_moment(s2, g, sc_ptr)
        root = tl.math.sqrt_rn(s2)
        if QUARTER:  # hessian_power 1/2
            root = tl.math.sqrt_rn(root)
        d = root + tl.load(sc_ptr + 5)
        x = x - tl.load(step_ptr) * tl.math.div_rn(s1, d)
    elif KIND == 3:  # Sophia: decay, gamma, a1, b2, a2, eps, lr, c
        s1 = s1 + tl.load(sc_ptr + 2) * (g - s1)
        if HESS_EMA:
            s2 = s2 * tl.load(sc_ptr + 3) + tl.load(sc_ptr + 4) * h
        gh = tl.load(sc_ptr + 1) * s2
        eps = tl.load(sc_ptr + 5)
        if SOPHIA_ADD_EPS:  # the official SophiaG code's gamma * h + eps
            d = gh + eps
        else:
            d = tl.where(gh > eps, gh, eps)
        u = tl.math.div_rn(s1, d)
        c = tl.load(sc_ptr + 7)
        u = tl.where(u > c, c, tl.where(u < neg(c), neg(c), u))
        x = x - tl.load(sc_ptr + 6) * u
    elif KIND == 1:  # Lion
        c = tl.load(sc_ptr + 1) * s1 + tl.load(sc_ptr + 2) * g
        x = x - tl.load(sc_ptr + 5) * _sign(c)
        s1 = tl.load(sc_ptr + 3) * s1 + tl.load(sc_ptr + 4) * g
    else:  # SGD
        d = g
        if not NO_MOMENTUM:
            if FIRST_STEP:
                s1 = g  # torch starts the buffer as a clone of the gradient
            else:
                s1 = tl.load(sc_ptr + 1) * s1 + tl.load(sc_ptr + 2) * g
            if NESTEROV:
                d = g + tl.load(sc_ptr + 1) * s1
            else:
                d = s1
        x = x - tl.load(sc_ptr + 3) * d
    if (KIND == 0 or KIND == 1) and DECAY and DECAY_AFTER:
        x = x * tl.load(decay_ptr)
    return x, s1, s2, clipped


@triton.jit
def _adam_rms_term(x, g, s2, sc_ptr, ct_ptr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr,
                   L2: tl.constexpr, VALUE_CLIP: tl.constexpr, TENSOR_SCALE: tl.constexpr,
                   ADA_CLIP: tl.constexpr, NORM_SCALE: tl.constexpr, SPIKE_CLIP: tl.constexpr,
                   RESET: tl.constexpr, DECAY_AFTER: tl.constexpr, UPDATE_SCALE: tl.constexpr):
    """adam_rms_term of optim_math.h: q = g*g / max(v, eps_t*eps_t) with the gradient and the
    new second moment of the Adam step (same arithmetic as _update; nothing is written)."""
    decay_ptr, _ = _adam_ptrs(sc_ptr, ct_ptr, 0, UPDATE_SCALE)
    x, g, _, s2, _ = _rule_grad(x, g, 0.0, s2, sc_ptr, ct_ptr, decay_ptr, 0, MAXIMIZE, DECAY, L2,
                                VALUE_CLIP, TENSOR_SCALE, ADA_CLIP, NORM_SCALE, SPIKE_CLIP, RESET,
                                DECAY_AFTER)
    v = _adam_second_moment(s2, g, sc_ptr)
    eps = tl.load(sc_ptr + 5)
    floor = eps * eps
    return tl.math.div_rn(g * g, tl.where(v > floor, v, floor))


@triton.jit
def _as_param_ptr(addr, P_KIND: tl.constexpr):
    # fp32 params as floats; bf16/fp16 as their int16 bits (load_as_f32 / round_to_fmt)
    if P_KIND == 0:
        return addr.to(tl.pointer_type(tl.float32))
    else:
        return addr.to(tl.pointer_type(tl.int16))


@triton.jit
def _store_param(x, p_ptr, comp_ptr, idx, msk, key, P_KIND: tl.constexpr, WRITEBACK: tl.constexpr,
                 MBITS: tl.constexpr, EMIN: tl.constexpr, MAX_FINITE: tl.constexpr,
                 OVERFLOW: tl.constexpr, NAN: tl.constexpr, NAN_KEEPS_SIGN: tl.constexpr):
    """store_param of optim_math.h: fp32 as is; else nearest-even, stochastic (Philox word idx % 4
    of counter idx // 4 under the tensor's key) or kahan (value nearest, then the exact remainder
    x - value rounded to nearest as the compensation)."""
    if WRITEBACK == 0:
        tl.store(p_ptr + idx, x, mask=msk)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        if WRITEBACK == 2:
            h = round_to_fmt(bits, 16, MBITS, EMIN, MAX_FINITE, OVERFLOW, NAN, NAN_KEEPS_SIGN,
                             True, philox_word_of(key, idx))
        else:
            h = round_to_fmt(bits, 16, MBITS, EMIN, MAX_FINITE, OVERFLOW, NAN, NAN_KEEPS_SIGN,
                             False, 0)
        tl.store(p_ptr + idx, h.to(tl.uint16).to(tl.int16, bitcast=True), mask=msk)
        if WRITEBACK == 3:
            rest = x - widen_to_f32(h.to(tl.int32), P_KIND)
            lo = round_to_fmt(rest.to(tl.uint32, bitcast=True), 16, MBITS, EMIN, MAX_FINITE,
                              OVERFLOW, NAN, NAN_KEEPS_SIGN, False, 0)
            tl.store(comp_ptr + idx, lo.to(tl.uint16).to(tl.int16, bitcast=True), mask=msk)


@triton.jit
def _load_state(addr, abs_addr, code_ptr, rows, row_ok, idx, msk, bidx, m_e, r1_scale, is_r1,
                STATE_BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                RANK1: tl.constexpr):
    """The fp32 values of one state over the tile (dequantized for 8/4 bits). RANK1: where is_r1
    (the tensor's second state is rank-1), each element's scale is r1_scale instead of its
    block's absmax (whose array then holds row maxima, so it is not read)."""
    if STATE_BITS == 32:
        return tl.load(addr.to(tl.pointer_type(tl.float32)) + idx, mask=msk, other=0.0)
    else:
        codes_ptr = addr.to(tl.pointer_type(tl.uint8))
        if RANK1:
            row_ok = tl.where(is_r1, False, row_ok)
        am = tl.load(abs_addr.to(tl.pointer_type(tl.float32)) + rows, mask=row_ok,
                     other=0.0)[:, None]
        if RANK1:
            am = tl.where(is_r1, r1_scale, am)
        if STATE_BITS == 8:
            c = tl.load(codes_ptr + idx, mask=msk, other=0).to(tl.int32)
        else:
            # byte j holds elements 2j (high nibble) and 2j+1: interleaving the two nibble
            # tiles gives the [ROWS, BLOCK] element order, so the math runs once on the whole
            # tile instead of once per half
            byte = tl.load(codes_ptr + bidx, mask=m_e, other=0).to(tl.int32)
            c = tl.reshape(tl.join(byte >> 4, byte & 0xF), (ROWS, BLOCK))
        return _scale_back(tl.load(code_ptr + c), am)


@triton.jit
def _store_state(s, addr, abs_addr, code_ptr, mids_ptr, rows, row_ok, idx, msk, bidx, m_e,
                 r1_inv, is_r1, STATE_BITS: tl.constexpr, NCODE: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr, RANK1: tl.constexpr):
    """Store one state's new fp32 values: as is, or requantized per block (absmax of the new
    values over the valid elements, NaN winning, as quant.h; nearest codes). RANK1: where is_r1,
    each element is scaled by r1_inv (the unit scale of its new rank-1 maxima) and no absmax is
    written (the host moves the new maxima into the state after the step)."""
    if STATE_BITS == 32:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + idx, s, mask=msk)
    else:
        codes_ptr = addr.to(tl.pointer_type(tl.uint8))
        bits = tl.where(msk, s.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
        am = tl.max(bits, axis=1).to(tl.float32, bitcast=True)
        inv = _unit_scale(am)[:, None]
        if RANK1:
            row_ok = tl.where(is_r1, False, row_ok)
            inv = tl.where(is_r1, r1_inv, inv)
        tl.store(abs_addr.to(tl.pointer_type(tl.float32)) + rows, am, mask=row_ok)
        c = code_index(s * inv, code_ptr, mids_ptr, NCODE, False, 0)
        if NCODE == 256:
            # zero_floor (lowbit.reference.optim): under a codebook starting with 0 (the unsigned
            # second-moment map) a positive value never takes that zero code
            # (where c is 0 the new code is 1 if code[0] is 0, else c itself: 0)
            floor = (tl.load(code_ptr) == 0.0).to(tl.int32)
            c = tl.where((c == 0) & (s > 0), floor, c)
        if STATE_BITS == 8:
            tl.store(codes_ptr + idx, c.to(tl.uint8), mask=msk)
        else:
            # back to (even, odd) pairs; an odd tail leaves its low nibble 0
            c_e, c_o = tl.split(tl.reshape(tl.where(msk, c, 0), (ROWS, BLOCK // 2, 2)))
            tl.store(codes_ptr + bidx, ((c_e << 4) | c_o).to(tl.uint8), mask=m_e)


# Pointer table row (int64 each): p, g, s1, s1_absmax, s2, s2_absmax, comp, key, n, then the
# rank-1 fields v_cols (0: block-wise), column maxima, scratch (R new row maxima, C new column
# maxima; both addresses are s2_absmax's for block-wise tensors, never read through), then the
# tensor's clip row (s, thr, r, k, step size, decay) and its int64 clipped-element counter (0 when
# unused), or in the statistics pass (RMS) its float64 rms slot, then its fp32 Hessian-diagonal
# estimate (0 unless HESS_EMA).
TAB_COLS = tl.constexpr(15)


@triton.jit
def _as_bits_ptr(addr):
    return addr.to(tl.pointer_type(tl.int32))


@triton.jit
def _rank1_scales(row, n, idx, msk):
    """(is_r1, old scales, unit scales of the new maxima) of the tile's elements, from the table
    row of a tensor whose second state may be rank-1: per element min(row max, col max) on the
    bit patterns (rank1_scale), the old from the state, the new from the scratch."""
    vcols = tl.load(row + 9)
    is_r1 = vcols > 0
    cols = tl.where(is_r1, vcols, 1)
    nrows = n // cols
    r = idx // cols
    c = idx - r * cols
    m = msk & (idx * 0 + vcols > 0)  # a block of bools: triton 3.9 rejects a block & scalar mask
    old_r = _as_bits_ptr(tl.load(row + 5))
    old_c = _as_bits_ptr(tl.load(row + 10))
    fresh = _as_bits_ptr(tl.load(row + 11))
    old = tl.minimum(tl.load(old_r + r, mask=m, other=0), tl.load(old_c + c, mask=m, other=0))
    new = tl.minimum(tl.load(fresh + r, mask=m, other=0),
                     tl.load(fresh + nrows + c, mask=m, other=0))
    return is_r1, old.to(tl.float32, bitcast=True), _unit_scale(new.to(tl.float32, bitcast=True))


@triton.jit
def _optim_kernel(work_ptr, tab_ptr, sc_ptr, code1_ptr, mids1_ptr, code2_ptr, mids2_ptr,
                  KIND: tl.constexpr, NSTATES: tl.constexpr, STATE_BITS: tl.constexpr,
                  BLOCK: tl.constexpr, ROWS: tl.constexpr, NCODE: tl.constexpr,
                  P_KIND: tl.constexpr, WRITEBACK: tl.constexpr, MBITS: tl.constexpr,
                  EMIN: tl.constexpr, MAX_FINITE: tl.constexpr, OVERFLOW: tl.constexpr,
                  NAN: tl.constexpr, NAN_KEEPS_SIGN: tl.constexpr, MAXIMIZE: tl.constexpr,
                  DECAY: tl.constexpr, L2: tl.constexpr, NESTEROV: tl.constexpr,
                  FIRST_STEP: tl.constexpr, NO_MOMENTUM: tl.constexpr, RANK1: tl.constexpr,
                  VALUE_CLIP: tl.constexpr, TENSOR_SCALE: tl.constexpr, ADA_CLIP: tl.constexpr,
                  NORM_SCALE: tl.constexpr, SPIKE_CLIP: tl.constexpr, RESET: tl.constexpr,
                  DECAY_AFTER: tl.constexpr, HAS_CLIP_ROW: tl.constexpr, COUNT: tl.constexpr,
                  UPDATE_SCALE: tl.constexpr, RMS: tl.constexpr, HESS_EMA: tl.constexpr,
                  HESS_V: tl.constexpr, QUARTER: tl.constexpr, SOPHIA_ADD_EPS: tl.constexpr):
    """The step over work item w (module docstring). RMS (Adam, block-wise states): the
    update-clipping statistics pass instead: the sum of the tile's _adam_rms_term in float64 is
    added atomically to the tensor's rms slot (the table's counter column), nothing is stored."""
    w = tl.program_id(0).to(tl.int64)
    t = tl.load(work_ptr + 2 * w)
    b0 = tl.load(work_ptr + 2 * w + 1)
    row = tab_ptr + t * TAB_COLS
    p_ptr = _as_param_ptr(tl.load(row + 0), P_KIND)
    g_ptr = _as_param_ptr(tl.load(row + 1), P_KIND)
    n = tl.load(row + 8)
    rows = b0 + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows * BLOCK < n
    idx = rows[:, None] * BLOCK + tl.arange(0, BLOCK).to(tl.int64)[None, :]
    msk = idx < n
    if STATE_BITS == 4:
        _, _, m_e, _, bidx = pair_layout(rows, n, BLOCK)
    else:  # only 4-bit states address bytes of element pairs
        m_e = msk
        bidx = idx

    x = 0.0  # the statistics pass reads the parameter only for the L2 term
    comp_ptr = p_ptr  # unused unless kahan
    if L2 or not RMS:
        x = load_as_f32(p_ptr, idx, msk, P_KIND)
        if WRITEBACK == 3:
            comp_ptr = _as_param_ptr(tl.load(row + 6), P_KIND)
            x = x + load_as_f32(comp_ptr, idx, msk, P_KIND)
    g = load_as_f32(g_ptr, idx, msk, P_KIND)
    s1 = 0.0  # placeholders for the states a rule does not have
    s2 = 0.0
    is_r1 = False  # and for the rank-1 fields of calls without rank-1 tensors
    r1_old = 0.0
    r1_inv = 0.0
    if RANK1:
        is_r1, r1_old, r1_inv = _rank1_scales(row, n, idx, msk)
    if NSTATES >= 1 and not RMS:  # (the statistics pass does not need m)
        s1_addr = tl.load(row + 2)
        s1_abs = tl.load(row + 3)
        s1 = _load_state(s1_addr, s1_abs, code1_ptr, rows, row_ok, idx, msk, bidx, m_e, 0.0,
                         False, STATE_BITS, ROWS, BLOCK, False)
    if NSTATES >= 2:
        s2_addr = tl.load(row + 4)
        s2_abs = tl.load(row + 5)
        s2 = _load_state(s2_addr, s2_abs, code2_ptr, rows, row_ok, idx, msk, bidx, m_e, r1_old,
                         is_r1, STATE_BITS, ROWS, BLOCK, RANK1)

    ct_ptr = sc_ptr  # placeholder: read only with the per-tensor clip flags
    if HAS_CLIP_ROW:
        ct_ptr = tl.load(row + 12).to(tl.pointer_type(tl.float32))
    if RMS:
        q = _adam_rms_term(x, g, s2, sc_ptr, ct_ptr, MAXIMIZE, DECAY, L2, VALUE_CLIP,
                           TENSOR_SCALE, ADA_CLIP, NORM_SCALE, SPIKE_CLIP, RESET, DECAY_AFTER,
                           UPDATE_SCALE)
        part = tl.sum(tl.sum(tl.where(msk, q, 0.0).to(tl.float64), axis=1), axis=0)
        tl.atomic_add(tl.load(row + 13).to(tl.pointer_type(tl.float64)), part)
    else:
        h = 0.0  # the Hessian-diagonal estimate: read only with HESS_EMA
        if HESS_EMA:
            h_ptr = tl.load(row + 14).to(tl.pointer_type(tl.float32))
            h = tl.load(h_ptr + idx, mask=msk, other=0.0)
        x, s1, s2, clipped = _update(x, g, s1, s2, h, sc_ptr, ct_ptr, KIND, MAXIMIZE, DECAY, L2,
                                     NESTEROV, FIRST_STEP, NO_MOMENTUM, VALUE_CLIP, TENSOR_SCALE,
                                     ADA_CLIP, NORM_SCALE, SPIKE_CLIP, RESET, DECAY_AFTER,
                                     UPDATE_SCALE, HESS_EMA, HESS_V, QUARTER, SOPHIA_ADD_EPS)
        if COUNT:
            count = tl.sum(tl.sum((clipped & msk).to(tl.int64), axis=1), axis=0)
            tl.atomic_add(tl.load(row + 13).to(tl.pointer_type(tl.int64)), count)

        _store_param(x, p_ptr, comp_ptr, idx, msk, tl.load(row + 7), P_KIND, WRITEBACK, MBITS,
                     EMIN, MAX_FINITE, OVERFLOW, NAN, NAN_KEEPS_SIGN)
        if NSTATES >= 1:
            _store_state(s1, s1_addr, s1_abs, code1_ptr, mids1_ptr, rows, row_ok, idx, msk,
                         bidx, m_e, 0.0, False, STATE_BITS, NCODE, ROWS, BLOCK, False)
        if NSTATES >= 2:
            _store_state(s2, s2_addr, s2_abs, code2_ptr, mids2_ptr, rows, row_ok, idx, msk,
                         bidx, m_e, r1_inv, is_r1, STATE_BITS, NCODE, ROWS, BLOCK, RANK1)


@triton.jit
def _rank1_maxima_kernel(work_ptr, tab_ptr, sc_ptr, code2_ptr, P_KIND: tl.constexpr,
                         WRITEBACK: tl.constexpr, NEED_P: tl.constexpr, MAXIMIZE: tl.constexpr,
                         DECAY: tl.constexpr, L2: tl.constexpr, TR: tl.constexpr,
                         TC: tl.constexpr):
    """The rank-1 prepass: program w takes work item (tensor, row tile, column tile) and the
    [TR, TC] tile of that tensor's matrix there; the new v of each element (old code decoded with
    the state's maxima, then _adam_new_v), and the tile's maxima of |bits| per row and per column
    into the zeroed scratch by atomic max (non-negative int32 patterns: the float max, exact and
    order-free). NEED_P: L2 decay reads the parameter (and the compensation for kahan)."""
    w = tl.program_id(0).to(tl.int64)
    t = tl.load(work_ptr + 3 * w)
    rows = tl.load(work_ptr + 3 * w + 1) * TR + tl.arange(0, TR).to(tl.int64)
    cols = tl.load(work_ptr + 3 * w + 2) * TC + tl.arange(0, TC).to(tl.int64)
    row = tab_ptr + t * TAB_COLS
    n = tl.load(row + 8)
    ncols = tl.load(row + 9)
    nrows = n // ncols
    row_ok = rows < nrows
    col_ok = cols < ncols
    msk = row_ok[:, None] & col_ok[None, :]
    k = rows[:, None] * ncols + cols[None, :]
    codes = tl.load(row + 4).to(tl.pointer_type(tl.uint8))
    byte = tl.load(codes + (k >> 1), mask=msk, other=0).to(tl.int32)
    nib = tl.where((k & 1) == 1, byte & 0xF, byte >> 4)     # element 2j: high nibble
    old_r = tl.load(_as_bits_ptr(tl.load(row + 5)) + rows, mask=row_ok, other=0)
    old_c = tl.load(_as_bits_ptr(tl.load(row + 10)) + cols, mask=col_ok, other=0)
    scale = tl.minimum(old_r[:, None], old_c[None, :]).to(tl.float32, bitcast=True)
    v = _scale_back(tl.load(code2_ptr + nib), scale)
    x = 0.0
    if NEED_P:
        p_ptr = _as_param_ptr(tl.load(row + 0), P_KIND)
        x = load_as_f32(p_ptr, k, msk, P_KIND)
        if WRITEBACK == 3:
            x = x + load_as_f32(_as_param_ptr(tl.load(row + 6), P_KIND), k, msk, P_KIND)
    g = load_as_f32(_as_param_ptr(tl.load(row + 1), P_KIND), k, msk, P_KIND)
    v = _adam_new_v(x, g, v, sc_ptr, MAXIMIZE, DECAY, L2)
    bits = tl.where(msk, v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
    fresh = _as_bits_ptr(tl.load(row + 11))
    tl.atomic_max(fresh + rows, tl.max(bits, axis=1), mask=row_ok)
    tl.atomic_max(fresh + nrows + cols, tl.max(bits, axis=0), mask=col_ok)


def _rows_per_item(nblocks: list, block: int) -> int:
    """Blocks per work item. GPU: a ~2K-element tile. Interpreter (cost per program and per op):
    the tile_rows policy on the total, then doubled until the work list has at most
    max(INTERP_MAX_PROGRAMS, ntensors) items or the tile reaches INTERP_MAX_TILE."""
    rows = tile_rows(sum(nblocks), block, gpu_tile=2048)
    if interpreting():
        limit = max(INTERP_MAX_PROGRAMS, len(nblocks))
        while (sum(triton.cdiv(nb, rows) for nb in nblocks) > limit
               and rows * 2 * block <= INTERP_MAX_TILE):
            rows *= 2
    return rows


def _rank1_tile(shapes) -> tuple:
    """(TR, TC) of the prepass tiles for matrices of these (R, C): TC columns (a power of two
    covering the widest row, at most 256 on a GPU / 4096 in the interpreter), TR rows for a tile
    of ~2K elements on a GPU, or as many as fit INTERP_MAX_TILE under the interpreter (whose cost
    is per program and per op)."""
    widest = max(c for _, c in shapes)
    tallest = max(r for r, _ in shapes)
    tc = min(triton.next_power_of_2(widest), 4096 if interpreting() else 256)
    budget = INTERP_MAX_TILE if interpreting() else 2048
    tr = max(1, min(budget // tc, triton.next_power_of_2(tallest)))
    return tr, tc


_tables_cache = {}


def _tables(state_bits: int, device, signed_second: bool = False):
    """(code1, mids1, code2, mids2) of a quantized state format, on `device`. signed_second: the
    second state takes the first's (signed) codebook (the rules of ref.SIGNED_SECOND: Sophia)."""
    key = (state_bits, str(device), signed_second)
    if key not in _tables_cache:
        from ..codebooks import codebook
        from ..reference.quant import midpoints
        first, second, _ = ref.STATE_FORMATS[state_bits]
        c1, c2 = codebook(first), codebook(first if signed_second else second)
        _tables_cache[key] = tuple(t.to(device=device, dtype=torch.float32).contiguous()
                                   for t in (c1, midpoints(c1), c2, midpoints(c2)))
    return _tables_cache[key]


def _check_rank1(params, absmax2, v_cols, v_colmax, kind, state_bits, nstates):
    """The rank-1 lists' rules (as csrc/optim_lists.h checks them)."""
    if not v_cols:
        return
    if len(v_cols) != len(params) or len(v_colmax) != len(params):
        raise ValueError(f"v_cols and v_colmax need {len(params)} entries (or none), got "
                         f"{len(v_cols)} and {len(v_colmax)}")
    for i, (p, cols) in enumerate(zip(params, v_cols)):
        if not cols:
            continue
        if kind != "adam" or state_bits != 4 or nstates != 2:
            raise ValueError("rank-1 second states need Adam with 4-bit states")
        n = p.numel()
        if cols < 0 or n % cols:
            raise ValueError(f"tensor {i}: {n} elements are not rows of v_cols={cols}")
        for name, t, want in (("absmax2", absmax2[i], n // cols), ("v_colmax", v_colmax[i], cols)):
            if t.numel() != want or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"tensor {i}: {name} must be {want} contiguous fp32 maxima")


def _check(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind, state_bits,
           block, scalars, flags, writeback, v_cols=(), v_colmax=()) -> int:
    """The contract's argument rules (as csrc/optim_lists.h checks them); returns nstates."""
    if kind not in ref.KINDS:
        raise ValueError(f"kind must be one of {', '.join(ref.KINDS)}, got {kind!r}")
    if writeback not in ref.WRITEBACK:
        raise ValueError(f"writeback must be one of {', '.join(ref.WRITEBACK)}, got {writeback!r}")
    if state_bits not in (32, 8, 4):
        raise ValueError(f"state_bits must be 32, 8 or 4, got {state_bits}")
    if len(scalars) != ref.NSCALARS:
        raise ValueError(f"expected {ref.NSCALARS} scalars, got {len(scalars)}")
    nstates = 2 if state2 else (1 if state1 else 0)
    want = {"adam": 2, "lion": 1, "sgd": 0 if flags & ref.NO_MOMENTUM else 1,
            "sophia": 2}[kind]
    if nstates != want:
        raise ValueError(f"{kind} with flags {flags} takes {want} state(s), got {nstates}")
    n = len(params)
    quantized = state_bits != 32
    # lists the call does not use may be empty; every other list has one entry per tensor
    for name, lst, needed in (("grads", grads, True), ("state1", state1, nstates >= 1),
                              ("state2", state2, nstates >= 2),
                              ("absmax1", absmax1, quantized and nstates >= 1),
                              ("absmax2", absmax2, quantized and nstates >= 2),
                              ("comps", comps, writeback == "kahan"),
                              ("keys", keys, writeback == "stochastic")):
        if len(lst) != n and (needed or lst):
            raise ValueError(f"{name} has {len(lst)} entries for {n} params")
    dtype = params[0].dtype
    if dtype not in KINDS:
        raise TypeError(f"params must be float32, bfloat16 or float16, got {dtype}")
    if (dtype == torch.float32) != (writeback == "f32"):
        raise ValueError(f"{dtype} params cannot take writeback {writeback!r} (fp32 params take "
                         "'f32'; bf16/fp16 'nearest', 'stochastic' or 'kahan')")
    same_dtype = [*params, *grads, *(comps if writeback == "kahan" else [])]
    if any(t.dtype != dtype for t in same_dtype):
        raise TypeError(f"grads and comps must have the params' dtype {dtype}")
    if not all(t.is_contiguous() for t in [*same_dtype, *state1, *state2]):
        raise ValueError("optim_step needs contiguous tensors")
    if quantized and block not in ref.BLOCK_SIZES:
        raise ValueError(f"block size must be a power of two from 32 to 4096, got {block}")
    # sizes, since the kernel writes through raw addresses
    for i, p in enumerate(params):
        n = p.numel()
        sizes = [(grads[i], n)] + ([(comps[i], n)] if writeback == "kahan" else [])
        for j, (st, am) in enumerate(((state1, absmax1), (state2, absmax2))[:nstates]):
            sizes.append((st[i], (n + 1) // 2 if state_bits == 4 else n))
            if quantized and not (j == 1 and v_cols and v_cols[i]):
                sizes.append((am[i], triton.cdiv(n, block)))
        if any(t.numel() != want for t, want in sizes):
            raise ValueError(f"tensor {i}: a grad, state, absmax or comp has the wrong size "
                             f"for {n} elements")
    _check_rank1(params, absmax2, v_cols, v_colmax, kind, state_bits, nstates)
    return nstates


def _check_clip(params, clip, clipped, rms, kind, flags, per_tensor) -> None:
    """The clipping arguments' rules (as csrc/optim_lists.h checks them, plus the sizes the
    kernel reads through raw addresses)."""
    n = len(params)
    device = params[0].device
    if per_tensor:
        if clip is None:
            raise ValueError("the per-tensor clip flags need the clip table")
        if (clip.dtype != torch.float32 or tuple(clip.shape) != (n, len(ref.NO_CLIP))
                or not clip.is_contiguous() or clip.device != device):
            raise ValueError(f"the clip table must be contiguous fp32 [{n}, {len(ref.NO_CLIP)}] "
                             "on the params' device")
    if (rms is not None or flags & ref.UPDATE_SCALE) and kind != "adam":
        raise ValueError("update clipping (rms, UPDATE_SCALE) needs the Adam rule")
    for name, t, dtype in (("clipped", clipped, torch.int64), ("rms", rms, torch.float64)):
        if t is not None and (t.dtype != dtype or t.numel() != n or not t.is_contiguous()
                              or t.device != device):
            raise ValueError(f"{name} must be {n} contiguous {dtype} on the params' device")


def _check_hess(params, hess, rms, kind, flags) -> None:
    """The curvature arguments' rules (as csrc/optim_lists.h checks them, plus the estimates'
    sizes, which the kernel reads through raw addresses)."""
    if flags & ref.HESS_FLAGS and kind not in ("adam", "sophia"):
        raise ValueError("the Hessian flags need the Adam (AdaHessian) or Sophia rule")
    if (len(hess) != len(params)) if flags & ref.HESS_EMA else len(hess):
        raise ValueError(f"HESS_EMA takes one Hessian-diagonal estimate per tensor (hess), none "
                         f"without it; got {len(hess)} for {len(params)} params")
    if flags & ref.HESS_FLAGS and (rms is not None
                                   or flags & (ref.UPDATE_SCALE | ref.SPIKE_CLIP)):
        raise ValueError("the Hessian flags do not combine with update or spike clipping")
    device = params[0].device
    for i, (p, h) in enumerate(zip(params, hess)):
        if (h.dtype != torch.float32 or h.numel() != p.numel() or not h.is_contiguous()
                or h.device != device):
            raise ValueError(f"tensor {i}: the Hessian estimate must be {p.numel()} contiguous "
                             "fp32 elements on the params' device")


def optim_step(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind, state_bits,
               block_size, scalars, flags, writeback, v_cols=(), v_colmax=(), clip=None,
               clipped=None, rms=None, hess=()) -> None:
    """One fused optimizer step over all tensors (lowbit.ops.optim_step's contract,
    lowbit.reference.optim.fused_step): everything is written in place, in a single launch (three
    with rank-1 second states: the prepass, the step, and the copy of the new maxima). With rms
    (Adam): the update-clipping statistics pass instead, one launch of the step kernel in RMS
    mode that writes nothing but adds each tensor's sum into rms[i]. hess: per tensor, the fp32
    Hessian-diagonal estimate that HESS_EMA reads (Sophia, AdaHessian); empty otherwise."""
    if not params:
        return
    hess = list(hess)
    per_tensor = flags & ref.PER_TENSOR_FLAGS
    _check_clip(params, clip, clipped, rms, kind, flags, per_tensor)
    _check_hess(params, hess, rms, kind, flags)
    block = (block_size or ref.STATE_FORMATS[state_bits][2]) if state_bits != 32 else 1
    nstates = _check(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind,
                     state_bits, block, scalars, flags, writeback, v_cols, v_colmax)
    if v_cols and any(v_cols) and (flags & (ref.CLIP_FLAGS | ref.HESS_FLAGS) or rms is not None):
        # the rank-1 prepass computes the new v without the clipping steps
        raise ValueError("rank-1 second states do not support the clip flags yet")
    stats_pass = rms is not None
    if stats_pass:
        clipped = None  # the counter column carries the rms slot instead
    device = params[0].device
    quantized = state_bits != 32 and nstates > 0
    if quantized:
        code_tabs = _tables(state_bits, device, kind in ref.SIGNED_SECOND)
        ncode = code_tabs[0].numel()
    else:  # no quantization blocks: the code tables are never read
        block, ncode = F32_BLOCK, 0
        code_tabs = (torch.zeros(1, dtype=torch.float32, device=device),) * 4
    kahan, stochastic = writeback == "kahan", writeback == "stochastic"
    hess_ema = bool(flags & ref.HESS_EMA)

    def addr(lst, i, used):
        return lst[i].data_ptr() if used else 0

    # rank-1 tensors: (table row, R, C, offset of their R + C new maxima in the zeroed scratch,
    # index in params)
    v_cols = [int(c) for c in v_cols] if v_cols and any(v_cols) else [0] * len(params)
    rank1, scratch = [], None
    if any(v_cols):
        scratch = torch.zeros(sum(p.numel() // c + c for p, c in zip(params, v_cols) if c),
                              dtype=torch.float32, device=device)
    tab, nblocks, off = [], [], 0
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        s2_abs = addr(absmax2, i, quantized and nstates >= 2)
        cols, colmax, fresh = v_cols[i], s2_abs, s2_abs
        if cols:
            colmax, fresh = v_colmax[i].data_ptr(), scratch.data_ptr() + 4 * off
            rank1.append((len(tab), n // cols, cols, off, i))
            off += n // cols + cols
        tab.append([p.data_ptr(), grads[i].data_ptr(),
                    addr(state1, i, nstates >= 1), addr(absmax1, i, quantized),
                    addr(state2, i, nstates >= 2), s2_abs,
                    addr(comps, i, kahan), int(keys[i]) if stochastic else 0, n,
                    cols, colmax, fresh,
                    clip[i].data_ptr() if per_tensor else 0,
                    rms[i].data_ptr() if stats_pass
                    else clipped[i].data_ptr() if clipped is not None else 0,
                    addr(hess, i, hess_ema)])
        nblocks.append(triton.cdiv(n, block))
    if not tab:
        return
    rows = _rows_per_item(nblocks, block)
    work = [(t, b) for t, nb in enumerate(nblocks) for b in range(0, nb, rows)]
    tab_t = torch.tensor(tab, dtype=torch.int64, device=device)
    work_t = torch.tensor(work, dtype=torch.int64, device=device)
    sc_t = torch.tensor([float(s) for s in scalars], dtype=torch.float32, device=device)
    p_kind = KINDS[params[0].dtype]
    # round_to_fmt's constants of the 16-bit param format (unused for fp32 params)
    fmt = FORMATS[params[0].dtype][1:] if p_kind else (0, 0, 0, 0, 0, False)
    mbits, emin, max_finite, overflow, nan, nan_sign = fmt
    num_warps = 8 if rows * block >= 4096 else 4
    if rank1:
        _rank1_prepass(rank1, tab_t, sc_t, code_tabs[2], p_kind, writeback, flags)
    with quiet_fp_warnings():
        _optim_kernel[(len(work),)](
            work_t, tab_t, sc_t, *code_tabs, KIND=ref.KINDS[kind], NSTATES=nstates,
            STATE_BITS=state_bits if quantized else 32, BLOCK=block, ROWS=rows, NCODE=ncode,
            P_KIND=p_kind, WRITEBACK=ref.WRITEBACK[writeback], MBITS=mbits, EMIN=emin,
            MAX_FINITE=max_finite, OVERFLOW=overflow, NAN=nan, NAN_KEEPS_SIGN=nan_sign,
            MAXIMIZE=bool(flags & ref.MAXIMIZE), DECAY=bool(flags & ref.DECAY),
            L2=bool(flags & ref.L2), NESTEROV=bool(flags & ref.NESTEROV),
            FIRST_STEP=bool(flags & ref.FIRST_STEP), NO_MOMENTUM=bool(flags & ref.NO_MOMENTUM),
            RANK1=bool(rank1), VALUE_CLIP=bool(flags & clip_ref.VALUE_CLIP),
            TENSOR_SCALE=bool(flags & clip_ref.TENSOR_SCALE),
            ADA_CLIP=bool(flags & clip_ref.ADA_CLIP), NORM_SCALE=bool(flags & clip_ref.NORM_SCALE),
            SPIKE_CLIP=bool(flags & ref.SPIKE_CLIP), RESET=bool(flags & ref.RESET),
            DECAY_AFTER=bool(flags & ref.DECAY_AFTER), HAS_CLIP_ROW=bool(per_tensor),
            COUNT=clipped is not None, UPDATE_SCALE=bool(flags & ref.UPDATE_SCALE),
            RMS=stats_pass, HESS_EMA=hess_ema, HESS_V=bool(flags & ref.HESS_V),
            QUARTER=bool(flags & ref.QUARTER), SOPHIA_ADD_EPS=bool(flags & ref.SOPHIA_ADD_EPS),
            num_warps=num_warps, **LAUNCH_OPTS)
    # the step decoded with the old maxima to the end: now the new ones replace them
    for _, nrows, cols, off, i in rank1:
        absmax2[i].copy_(scratch[off:off + nrows])
        v_colmax[i].copy_(scratch[off + nrows:off + nrows + cols])


def _rank1_prepass(rank1, tab_t, sc_t, code2, p_kind, writeback, flags) -> None:
    """The new row / column maxima of every rank-1 tensor into its zeroed scratch (one launch
    over the tiles of all of them)."""
    tr, tc = _rank1_tile([(r, c) for _, r, c, _, _ in rank1])
    work = [(t, a, b) for t, r, c, _, _ in rank1
            for a in range(triton.cdiv(r, tr)) for b in range(triton.cdiv(c, tc))]
    work_t = torch.tensor(work, dtype=torch.int64, device=tab_t.device)
    with quiet_fp_warnings():
        _rank1_maxima_kernel[(len(work),)](
            work_t, tab_t, sc_t, code2, P_KIND=p_kind, WRITEBACK=ref.WRITEBACK[writeback],
            NEED_P=bool(flags & ref.L2), MAXIMIZE=bool(flags & ref.MAXIMIZE),
            DECAY=bool(flags & ref.DECAY), L2=bool(flags & ref.L2), TR=tr, TC=tc,
            num_warps=8 if tr * tc >= 4096 else 4, **LAUNCH_OPTS)
