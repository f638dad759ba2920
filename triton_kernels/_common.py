"""Shared @triton.jit helpers for the lowbit Triton kernels, plus the host-side launch policy.

Everything here must be bit-exact with csrc/include/lowbit/{philox.h,formats.h,quant.h} and the
torch reference, on the GPU *and* under the interpreter (TRITON_INTERPRET=1). That rules out the
convenient Triton casts: the interpreter truncates fp32->bf16 and mis-rounds fp32->fp8, so every
narrowing goes through `round_to_fmt`, a port of the header's integer routine on uint32 bits.
Shifts by >= 32 are undefined in LLVM (and mask the count in numpy), so every variable shift is
clamped and its out-of-range result selected away with tl.where.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from ..reference.rounding import FORMATS as _REFERENCE_FORMATS

# Format table: dtype -> (width, mbits, emin, max_finite, overflow, nan, nan_keeps_sign), the
# numbers of fmt_of() in formats.h. Taken from the torch reference so the two cannot drift apart.
FORMATS = _REFERENCE_FORMATS

# Input/output dtype kinds passed to kernels as a constexpr (formats.h DType numbering).
KIND_F32, KIND_BF16, KIND_F16 = 0, 1, 2
KINDS = {torch.float32: KIND_F32, torch.bfloat16: KIND_BF16, torch.float16: KIND_F16}

# Launch kwargs for every kernel: no FMA contraction, so a*b+c is rounded twice as on the CPU.
# (None of the current kernels has a contractible pattern, but this keeps future edits honest.)
LAUNCH_OPTS = {"enable_fp_fusion": False}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def quiet_fp_warnings():
    """Context for a launch: under the interpreter every tl op is a numpy op, and the inf/inf,
    0*inf and NaN lanes the kernels handle on purpose would print RuntimeWarnings."""
    if interpreting():
        import numpy as np
        return np.errstate(invalid="ignore", divide="ignore", over="ignore")
    return contextlib.nullcontext()


# Interpreter launch policy. Its cost is ~1-5 ms per program and per tl op, nearly independent of
# the tile size (measured: 64K-element nf4 stochastic quantize takes 1.65 s at 64 programs and
# 0.24 s at 8), so grids are kept to a handful of programs with tiles of up to 64K elements.
INTERP_MAX_PROGRAMS = 8
INTERP_MAX_TILE = 1 << 16


def tile_rows(nrows: int, row_len: int, gpu_tile: int,
              max_programs: int = INTERP_MAX_PROGRAMS, max_tile: int = INTERP_MAX_TILE) -> int:
    """How many rows (quantization blocks, or chunks of elements) one program handles.

    On a GPU: enough rows for a tile of about `gpu_tile` elements. Under the interpreter the cost
    is per program and per tl op, almost independent of the tile size, so pack rows until the grid
    has at most `max_programs` programs (tile capped at `max_tile` elements to bound memory)."""
    if interpreting():
        want = triton.cdiv(nrows, max_programs)
        cap = max(1, max_tile // row_len)
        rows = min(triton.next_power_of_2(max(want, 1)), triton.next_power_of_2(cap))
        rows = min(rows, triton.next_power_of_2(max(nrows, 1)))
    else:
        rows = max(1, gpu_tile // row_len)
    return max(1, rows)


@triton.jit
def pair_layout(rows, n, BLOCK: tl.constexpr):
    """A [ROWS, BLOCK] tile of quantization blocks seen as element pairs, the 4-bit layout: the
    even and odd element indices, their in-range masks, and the index of the byte packing both
    (element 2j in its high nibble)."""
    HALF: tl.constexpr = BLOCK // 2
    j = tl.arange(0, HALF).to(tl.int64)
    even = rows[:, None] * BLOCK + 2 * j[None, :]
    odd = even + 1
    return even, odd, even < n, odd < n, rows[:, None] * HALF + j[None, :]


@triton.jit
def uniform24(r):
    """uniform24() of philox.h: the top 24 bits of the Philox word scaled to [0, 1), exact."""
    return (r >> 8).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def philox_word0(seed, counter):
    """Word 0 of Philox4x32-10 keyed (lo32(seed), hi32(seed)), counter (lo32, hi32, 0, 0):
    exactly tl.randint when `counter` is int64 (philox.h's layout)."""
    return tl.randint(seed, counter).to(tl.uint32, bitcast=True)


@triton.jit
def philox_word_of(seed, index):
    """The optimizer write-back's stream (philox.h philox_word_of): element i takes word i % 4 of
    Philox4x32-10 at counter i // 4 (int64 index)."""
    r0, r1, r2, r3 = tl.randint4x(seed, index >> 2)
    j = index & 3
    r = tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))
    return r.to(tl.uint32, bitcast=True)


@triton.jit
def load_as_f32(ptr, idx, mask, KIND: tl.constexpr):
    """Load elements of an fp32/bf16/fp16 buffer exactly widened to fp32 (masked lanes -> 0).

    16-bit inputs arrive through an int16 view and are widened on their bits (widen_to_f32): no
    interpreter handling of bf16 values, and the NaN bits are defined instead of whatever a device
    conversion produces. Those bits matter: absmax is a max over bit patterns."""
    if KIND == 0:
        return tl.load(ptr + idx, mask=mask, other=0.0)
    else:
        return widen_to_f32(tl.load(ptr + idx, mask=mask, other=0).to(tl.int32), KIND)


@triton.jit
def widen_to_f32(h, KIND: tl.constexpr):
    """bf16 (KIND 1) / fp16 (KIND 2) bit patterns in the low 16 bits of int32 `h`, exactly widened
    to fp32 as bf16_to_f32 / f16_to_f32 in formats.h (fp16 NaN made quiet, payload kept, like the
    x86 conversion torch uses)."""
    h = h & 0xFFFF
    if KIND == 1:
        return (h << 16).to(tl.float32, bitcast=True)
    else:
        sign = (h & 0x8000) << 16
        e = (h >> 10) & 0x1F
        m = h & 0x3FF
        special = sign | 0x7F800000 | (m << 13) | tl.where(m != 0, 0x400000, 0)
        normal = sign | ((e + 112) << 23) | (m << 13)
        # subnormal or zero: m * 2^-24 is exact in fp32
        sub = (m.to(tl.float32) * 5.9604644775390625e-08).to(tl.int32, bitcast=True) | sign
        out = tl.where(e == 0x1F, special, tl.where(e != 0, normal, sub))
        return out.to(tl.float32, bitcast=True)


@triton.jit
def round_to_fmt(b, WIDTH: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                 MAX_FINITE: tl.constexpr, OVERFLOW: tl.constexpr, NAN: tl.constexpr,
                 NAN_KEEPS_SIGN: tl.constexpr, STOCHASTIC: tl.constexpr, r):
    """round_to_fmt() of formats.h on uint32 fp32 bit patterns `b`; returns the target's bits in
    the low WIDTH bits of a uint32. `r` (uint32 Philox words) is used only when STOCHASTIC."""
    sign = (b >> 31) << (WIDTH - 1)
    a = b & 0x7FFFFFFF
    E = (a >> 23).to(tl.int32)
    M = tl.where(E > 0, (a & 0x7FFFFF) | 0x800000, a)
    Eu = tl.maximum(E, 1) - 127
    extra = tl.maximum(EMIN - Eu, 0)
    s = 23 - MBITS + extra                      # >= 13; up to 135 for fp16/fp8 subnormal targets
    s_lt32 = s < 32
    s31 = tl.minimum(s, 31).to(tl.uint32)       # a safe shift count for the s < 32 lanes
    q = tl.where(s_lt32, M >> s31, 0)
    base = tl.maximum(Eu - EMIN, 0).to(tl.uint32) << MBITS
    low_mask = (tl.full(s31.shape, 1, tl.uint32) << s31) - 1   # (1 << s) - 1 where s < 32
    if STOCHASTIC:
        # threshold t = dropped / 2^s scaled to 2^24: shift the dropped bits up while s <= 24,
        # else shift M down by s - 24 (0 once that reaches 32).
        up = tl.maximum(24 - s, 0).to(tl.uint32)
        down = s - 24
        t_small = (M & low_mask) << up
        t_big = tl.where(down < 32, M >> tl.minimum(tl.maximum(down, 0), 31).to(tl.uint32), 0)
        t = tl.where(s <= 24, t_small, t_big)
        inc = ((r >> 8) < t).to(tl.uint32)
    else:
        rem = tl.where(s_lt32, M & low_mask, M)
        half_shift = (tl.minimum(s, 32) - 1).to(tl.uint32)
        half = tl.where(s <= 32, tl.full(s31.shape, 1, tl.uint32) << half_shift, 0xFFFFFFFF)
        inc = ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.uint32)
    mag = base + q + inc
    mag = tl.where(mag > MAX_FINITE, OVERFLOW, mag)
    out = mag | sign
    out = tl.where(a == 0x7F800000, sign | OVERFLOW, out)
    if NAN_KEEPS_SIGN:
        out = tl.where(a > 0x7F800000, sign | NAN, out)
    else:
        out = tl.where(a > 0x7F800000, NAN, out)
    return out.to(tl.uint32)


@triton.jit
def neg(x):
    """-x on fp32 by flipping the sign bit: Triton's -x is 0 - x, which gives +0 for x = +0."""
    return (x.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)


@triton.jit
def clip_transform(g, ct_ptr, cv_ptr, VALUE_CLIP: tl.constexpr, TENSOR_SCALE: tl.constexpr,
                   ADA_CLIP: tl.constexpr, NORM_SCALE: tl.constexpr):
    """clip_transform of clip_math.h (shared by the fused step and the statistics pass): the
    transformed fp32 g and the mask of the elements an element-wise step changed. ct_ptr: the
    tensor's (s, thr, r, k) row, read only by the per-tensor steps; cv_ptr: the value clip's
    bound, read only with VALUE_CLIP."""
    clipped = tl.zeros_like(g) != 0.0  # all False, g's shape
    if VALUE_CLIP:
        cv = tl.load(cv_ptr)
        hi = g > cv
        lo = g < neg(cv)
        g = tl.where(hi, cv, tl.where(lo, neg(cv), g))
        clipped = hi | lo
    if TENSOR_SCALE:
        g = g * tl.load(ct_ptr + 0)
    if ADA_CLIP:
        over = tl.abs(g) > tl.load(ct_ptr + 1)
        g = tl.where(over, g * tl.load(ct_ptr + 2), g)
        clipped = clipped | over
    if NORM_SCALE:
        g = g * tl.load(ct_ptr + 3)
    return g, clipped


@triton.jit
def count_below_linear(y, tab_ptr, NTAB: tl.constexpr, STRICT: tl.constexpr):
    """Number of the NTAB sorted table entries below y (STRICT: t < y, else t <= y), by comparing
    against every entry: cheap for 15/16-entry tables and free of gathers."""
    cnt = tl.zeros(y.shape, tl.int32)
    for k in tl.static_range(NTAB):
        t = tl.load(tab_ptr + k)
        if STRICT:
            cnt += (t < y).to(tl.int32)
        else:
            cnt += (t <= y).to(tl.int32)
    return cnt


@triton.jit
def count_below_bsearch(y, tab_ptr, LOG2: tl.constexpr, STRICT: tl.constexpr):
    """Number of the first 2^LOG2 - 1 sorted table entries below y (STRICT: t < y, else t <= y),
    by branch-free binary lifting: try to advance pos by 2^(LOG2-1), ..., 1 whenever
    tab[pos + step - 1] is still below y. The probed index is always in [0, 2^LOG2 - 2], so the
    gathers never leave the table. NaN y compares false everywhere and gives 0."""
    pos = tl.zeros(y.shape, tl.int32)
    for k in tl.static_range(LOG2):
        step = 1 << (LOG2 - 1 - k)      # constexpr: k comes from static_range
        t = tl.load(tab_ptr + (pos + (step - 1)))
        if STRICT:
            go = t < y
        else:
            go = t <= y
        pos = tl.where(go, pos + step, pos)
    return pos


@triton.jit
def code_index(y, code_ptr, mids_ptr, NCODE: tl.constexpr, STOCHASTIC: tl.constexpr, r):
    """The code index of scaled value y (quant.h): nearest = count of mids strictly below y;
    stochastic = lo/hi neighbours with P(hi) = (y - code[lo]) / (code[hi] - code[lo])."""
    if STOCHASTIC:
        # lo = clamp(#{code <= y} - 1, 0, NCODE - 2). Counting only over code[0 .. NCODE-2] gives
        # min(count, NCODE - 1), which the upper clamp makes equivalent.
        if NCODE == 16:
            cnt = count_below_linear(y, code_ptr, NCODE - 1, False)
        else:
            cnt = count_below_bsearch(y, code_ptr, 8, False)
        lo = tl.maximum(cnt - 1, 0)
        c_lo = tl.load(code_ptr + lo)
        c_hi = tl.load(code_ptr + (lo + 1))
        p = tl.math.div_rn(y - c_lo, c_hi - c_lo)
        return tl.where(uniform24(r) < p, lo + 1, lo)
    else:
        if NCODE == 16:
            return count_below_linear(y, mids_ptr, NCODE - 1, True)
        else:
            return count_below_bsearch(y, mids_ptr, 8, True)
