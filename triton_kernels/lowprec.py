"""Scaled low-precision quantizers (INT8/INT4/FP8/FP4) and the block Hadamard rotation in Triton.

Spec: lowbit.backends.reference.lowprec (lowbit.reference.lowprec / .hadamard); the per-element
math mirrors csrc/include/lowbit/lowprec.h. Contract: lowbit.ops, "scaled low-precision
quantizers".

Tiling. A program handles TR rows x NSEG segments of a row, a [TR, NSEG, SEGP] tile: segment s
covers the SEG columns [s*SEG, (s+1)*SEG), padded to SEGP (a power of two) lanes. Segments are
whole Hadamard blocks (SEG a multiple of the block), so the rotation is a reshape of the tile
into [-1, HB] rows; padding lanes are whole blocks of zeros (C is a multiple of the block).

Three passes (constexpr PASS):
  0 fused     the segment holds whole scale groups: a group of B columns (SEG = B, padded
              when B is not a power of two; row scaling is the block of B = C), or HB / B groups
              of a power-of-two B inside one Hadamard block (SEG = HB). absmax, scale and
              quantization in one program.
  1 absmax    column / tensor scaling, and groups that straddle Hadamard blocks or exceed
              MAX_FUSED_GROUP: the |values| (rotated when HB) max-reduced into an int32 buffer of
              absmax bit patterns with atomic max (max is exact and order-free: same bits on
              every run),
  2 quantize  then the same tile again, reading each element's group absmax from that buffer.
The scale of a group is stored by the program owning the group (pass 0) or by the lane holding
the group's first element (pass 2).

Hadamard butterfly (bit-exact with the reference's stage order h = 1, 2, 4, ...): the tile row
of HB values is split into adjacent pairs (a, c) -> (a + c, a - c), joined, and transposed so
the pair axis becomes the top index bit. The index bits rotate right by one per stage, so stage k
combines the pairs of original bit k, and after log2(HB) stages the order is the original again:
only 2-D reshape / split / join / permute, which every Triton version lowers.

NaN bits: a rotated or dequantized NaN is the canonical 0x7FC00000 (the reference's rule; which
NaN operand an fp32 add passes on differs between x86, numpy and GPUs).
"""
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..reference.lowprec import FMT_MAX, FORMATS as _FORMAT_NAMES
from ._common import (FORMATS, INTERP_MAX_TILE, KINDS, LAUNCH_OPTS,
                      interpreting, load_as_f32, neg, philox_word_of, quiet_fp_warnings,
                      round_to_fmt, uniform24, widen_to_f32)
from .quant import _store_from_f32

FMT_E4M3, FMT_E5M2 = 2, 3
BLOCK, ROW, COLUMN, TENSOR = 0, 1, 2, 3
PASS_FUSED, PASS_ABSMAX, PASS_QUANT = 0, 1, 2
# Largest scale group one program holds (row scaling: the row); larger ones take two passes.
MAX_FUSED_GROUP = 8192
# Elements per program on a GPU.
GPU_TILE = 2048
# Interpreter tiles (elements; tests lower it to force multi-program grids). The interpreter
# costs per program and per tl op, nearly independent of the tile size.
interp_max_tile = INTERP_MAX_TILE
_FP8_DTYPES = {FMT_E4M3: torch.float8_e4m3fn, FMT_E5M2: torch.float8_e5m2}


@triton.jit
def _butterfly(w, M: tl.constexpr, HB: tl.constexpr, LOG2_HB: tl.constexpr, norm):
    for _ in tl.static_range(LOG2_HB):
        a, c = tl.split(tl.reshape(w, [M, HB // 2, 2]))
        w = tl.reshape(tl.permute(tl.join(a + c, a - c), (0, 2, 1)), [M, HB])
    y = w * norm
    # which NaN an add returns differs between x86, numpy and GPUs: the spec's is 0x7FC00000
    canon = tl.full(y.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    return tl.where(y != y, canon, y)


@triton.jit
def _rotate(v, TR: tl.constexpr, NSEG: tl.constexpr, SEGP: tl.constexpr, HB: tl.constexpr,
            LOG2_HB: tl.constexpr, norm):
    """H_HB / sqrt(HB) applied to every HB consecutive lanes of the [TR, NSEG, SEGP] tile."""
    M: tl.constexpr = TR * NSEG * SEGP // HB
    y = _butterfly(tl.reshape(v, [M, HB]), M, HB, LOG2_HB, norm)
    return tl.reshape(y, [TR, NSEG, SEGP])


@triton.jit
def _scale(am, FMAX: tl.constexpr, E8M0: tl.constexpr):
    """lp_scale of lowprec.h on absmax bit patterns `am` (int32): (scale as fp32, stored form:
    the fp32 scale or the e8m0 code as int32)."""
    amax = am.to(tl.float32, bitcast=True)
    finite = am < 0x7F800000
    nan = tl.full(am.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    if E8M0:
        # e = ceil(log2(absmax / FMAX)) from the float64 quotient's exponent and mantissa: the
        # quotient of two fp32 values is correctly rounded in float64 and a power of two only
        # when exactly one, so "mantissa != 0" decides the ceiling exactly.
        # (tl.math.div_rn is fp32-only on triton 3.7; float64 `/` is IEEE: div.rn.f64)
        q = amax.to(tl.float64) / tl.full(am.shape, FMAX, tl.float64)
        b = q.to(tl.int64, bitcast=True)
        e = ((b >> 52) & 0x7FF).to(tl.int32) - 1023 + ((b & 0xFFFFFFFFFFFFF) != 0).to(tl.int32)
        e = tl.where(am > 0, e, -127)
        e = tl.minimum(tl.maximum(e, -127), 127)
        code = tl.where(finite, e + 127, 255)
        # 2**(code - 127); code 0 is the subnormal 2**-127
        bits = tl.where(code == 0, 0x00400000, code << 23)
        scale = tl.where(code == 255, nan, bits.to(tl.float32, bitcast=True))
        return scale, code
    else:
        scale = tl.where(finite, tl.math.div_rn(amax, tl.full(am.shape, FMAX, tl.float32)), nan)
        return scale, scale


@triton.jit
def _quantize(v, sc, rw, FMT: tl.constexpr, FMAX: tl.constexpr, STOCHASTIC: tl.constexpr,
              Q_MBITS: tl.constexpr, Q_EMIN: tl.constexpr, Q_MAX_FINITE: tl.constexpr,
              Q_OVERFLOW: tl.constexpr, Q_NAN: tl.constexpr, Q_NAN_KEEPS_SIGN: tl.constexpr):
    """lp_scaled + lp_encode + lp_decode of lowprec.h: (code byte as int32, grid value fp32)."""
    pos = sc > 0.0
    y = tl.where(pos, tl.math.div_rn(v, tl.where(pos, sc, 1.0)), 0.0)
    # compare-and-select clamps keep NaN (tl.minimum / maximum could drop it on a GPU)
    y = tl.where(y > FMAX, FMAX, y)
    y = tl.where(y < -FMAX, -FMAX, y)
    y = tl.where(sc != sc, sc, y)  # a group holding inf / NaN stays NaN
    if FMT == 4:  # e2m1 (NaN codes as 0, the reference's nan_to_num)
        y = tl.where(y != y, 0.0, y)
        yb = y.to(tl.uint32, bitcast=True)
        a = (yb & 0x7FFFFFFF).to(tl.float32, bitcast=True)
        lo = ((a >= 0.5).to(tl.int32) + (a >= 1.0).to(tl.int32) + (a >= 1.5).to(tl.int32)
              + (a >= 2.0).to(tl.int32) + (a >= 3.0).to(tl.int32) + (a >= 4.0).to(tl.int32))
        # grid 0, .5, 1, 1.5, 2, 3, 4, 6: lower neighbour and (power-of-two) gap by index
        glo = tl.where(lo < 4, lo.to(tl.float32) * 0.5, (lo - 2).to(tl.float32))
        gap = tl.where(lo < 4, 0.5, tl.where(lo < 6, 1.0, 2.0))
        d = a - glo  # exact: glo <= a < 2 * glo, or glo == 0
        if STOCHASTIC:
            up = uniform24(rw) < tl.math.div_rn(d, gap)  # exact quotient
        else:
            up = (2.0 * d > gap) | ((2.0 * d == gap) & ((lo & 1) == 1))
        mag = lo + up.to(tl.int32)
        negative = ((yb >> 31) == 1) & (mag > 0)  # no negative-zero code
        m = tl.where(mag < 4, mag.to(tl.float32) * 0.5,
                     tl.where(mag < 7, (mag - 2).to(tl.float32), 6.0))
        return tl.where(negative, 8, 0) | mag, tl.where(negative, neg(m), m)
    elif FMT >= 2:  # e4m3 / e5m2: formats.h round_to_fmt on the bits
        c = round_to_fmt(y.to(tl.uint32, bitcast=True), 8, Q_MBITS, Q_EMIN, Q_MAX_FINITE,
                         Q_OVERFLOW, Q_NAN, Q_NAN_KEEPS_SIGN, STOCHASTIC, rw) & 0xFF
        if FMT == 2:  # e4m3fn -> fp32 (lowprec.h e4m3_to_f32)
            sign = (c & 0x80) << 24
            e = (c >> 3) & 0xF
            mt = c & 7
            sub = (mt.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True) | sign
            nrm = sign | ((e + 120) << 23) | (mt << 20)
            bits = tl.where((e == 15) & (mt == 7), sign | 0x7FC00000, tl.where(e == 0, sub, nrm))
            dec = bits.to(tl.float32, bitcast=True)
        else:  # e5m2 is fp16's top byte
            dec = widen_to_f32((c << 8).to(tl.int32), 2)
        return c.to(tl.int32), dec
    else:  # int8 / int4
        y = tl.where(y != y, 0.0, y)
        t = y.to(tl.int32)  # toward zero; floor below
        lo = tl.where(t.to(tl.float32) > y, t - 1, t)
        d = y - lo.to(tl.float32)  # exact: |y| <= 127
        if STOCHASTIC:
            up = uniform24(rw) < d
        else:  # nearest, ties to even
            up = (d > 0.5) | ((d == 0.5) & ((lo & 1) == 1))
        q = lo + up.to(tl.int32)
        return q & 0xFF, q.to(tl.float32)


@triton.jit
def _lowprec_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, amax_ptr, R, C, B, nb, nps, seed,
                    offset, norm, IN_KIND: tl.constexpr, FMT: tl.constexpr, FMAX: tl.constexpr,
                    SCALING: tl.constexpr, E8M0: tl.constexpr, STOCHASTIC: tl.constexpr,
                    PASS: tl.constexpr, HB: tl.constexpr, LOG2_HB: tl.constexpr,
                    TR: tl.constexpr, NSEG: tl.constexpr, SEG: tl.constexpr, SEGP: tl.constexpr,
                    GB: tl.constexpr, WRITE_CODES: tl.constexpr, WRITE_OUT: tl.constexpr,
                    Q_MBITS: tl.constexpr, Q_EMIN: tl.constexpr, Q_MAX_FINITE: tl.constexpr,
                    Q_OVERFLOW: tl.constexpr, Q_NAN: tl.constexpr, Q_NAN_KEEPS_SIGN: tl.constexpr,
                    O_MBITS: tl.constexpr, O_EMIN: tl.constexpr, O_MAX_FINITE: tl.constexpr,
                    O_OVERFLOW: tl.constexpr, O_NAN: tl.constexpr, O_NAN_KEEPS_SIGN: tl.constexpr):
    # one grid axis (the second is limited to 65535 programs): nps programs per row tile
    pid = tl.program_id(0).to(tl.int64)
    pr = pid // nps
    ps = pid % nps
    r = (pr * TR + tl.arange(0, TR).to(tl.int64))[:, None, None]
    s = (ps * NSEG + tl.arange(0, NSEG).to(tl.int64))[None, :, None]
    t = tl.arange(0, SEGP).to(tl.int64)[None, None, :]
    col = s * SEG + t
    in_row = (t < SEG) & (col < C)
    ok = (r < R) & in_row
    idx = r * C + col
    v = load_as_f32(x_ptr, idx, ok, IN_KIND)
    if HB > 0:
        v = _rotate(v, TR, NSEG, SEGP, HB, LOG2_HB, norm)
    if FMT < 0:  # rotation only
        _store_from_f32(out_ptr, idx, v, ok, IN_KIND, O_MBITS, O_EMIN, O_MAX_FINITE, O_OVERFLOW,
                        O_NAN, O_NAN_KEEPS_SIGN)
    else:
        # |v| as bits: a NaN (largest patterns) wins the max, which gives the NaN scale
        a = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        if PASS == 1:
            if SCALING == 0:  # groups straddling tiles: one atomic per element
                tl.atomic_max(amax_ptr + (r * nb + col // B), a, mask=ok, sem="relaxed")
            elif SCALING == 1:
                r1 = pr * TR + tl.arange(0, TR).to(tl.int64)
                tl.atomic_max(amax_ptr + r1, tl.max(tl.max(a, axis=2), axis=1), mask=r1 < R,
                              sem="relaxed")
            elif SCALING == 2:
                c2 = ((ps * NSEG + tl.arange(0, NSEG).to(tl.int64))[:, None] * SEG
                      + tl.arange(0, SEGP).to(tl.int64)[None, :])
                ok2 = (tl.arange(0, SEGP)[None, :] < SEG) & (c2 < C)
                tl.atomic_max(amax_ptr + c2, tl.max(a, axis=0), mask=ok2, sem="relaxed")
            else:
                m = tl.max(tl.max(tl.max(a, axis=2), axis=1), axis=0, keep_dims=True)
                tl.atomic_max(amax_ptr + tl.zeros([1], tl.int64), m, sem="relaxed")
        else:
            if PASS == 0:
                BB: tl.constexpr = SEGP // GB
                am = tl.max(tl.reshape(a, [TR, NSEG, GB, BB]), axis=3)  # [TR, NSEG, GB]
                scale, stored = _scale(am, FMAX, E8M0)
                gi = s * GB + tl.arange(0, GB).to(tl.int64)[None, None, :]
                if E8M0:
                    stored = stored.to(tl.uint8)
                tl.store(scales_ptr + (r * nb + gi), stored, mask=(r < R) & (gi < nb))
                sc = tl.reshape(tl.broadcast_to(scale[:, :, :, None], [TR, NSEG, GB, BB]),
                                [TR, NSEG, SEGP])
            else:
                # each element's group, at the group's broadcast shape, and the lanes holding
                # a group's first element (they store its scale)
                if SCALING == 0:
                    g = r * nb + col // B
                    g_ok = ok
                    first = col % B == 0
                elif SCALING == 1:
                    g = r
                    g_ok = r < R
                    first = col == 0
                elif SCALING == 2:
                    g = col
                    g_ok = in_row
                    first = r == 0
                else:
                    g = tl.zeros([1, 1, 1], tl.int64)
                    g_ok = g == 0
                    first = (r == 0) & (col == 0)
                am = tl.load(amax_ptr + g, mask=g_ok, other=0)
                scale, stored = _scale(am, FMAX, E8M0)
                if E8M0:
                    stored = stored.to(tl.uint8)
                tl.store(scales_ptr + tl.broadcast_to(g, [TR, NSEG, SEGP]), stored,
                         mask=ok & first)
                sc = tl.broadcast_to(scale, [TR, NSEG, SEGP])
            if STOCHASTIC:
                # element i = offset + idx takes word i % 4 of counter i // 4 (the optimizer
                # write-back's stream; the reference's and the C++ kernels' words)
                rw = philox_word_of(seed, offset + idx)
            else:
                rw = 0
            code, dec = _quantize(v, sc, rw, FMT, FMAX, STOCHASTIC, Q_MBITS, Q_EMIN,
                                  Q_MAX_FINITE, Q_OVERFLOW, Q_NAN, Q_NAN_KEEPS_SIGN)
            if WRITE_CODES:
                tl.store(codes_ptr + idx, code.to(tl.uint8), mask=ok)
            if WRITE_OUT:
                z = dec * sc
                # a NaN product comes from a NaN scale: give its canonical bits whatever the
                # hardware's NaN rule (the reference's vectorized x86 product does)
                z = tl.where(z != z, sc, z)
                if HB > 0:
                    z = _rotate(z, TR, NSEG, SEGP, HB, LOG2_HB, norm)
                _store_from_f32(out_ptr, idx, z, ok, IN_KIND, O_MBITS, O_EMIN, O_MAX_FINITE,
                                O_OVERFLOW, O_NAN, O_NAN_KEEPS_SIGN)


def _tile(rows: int, nseg: int, segp: int):
    """(TR, NSEG, num_warps): tiles of TR rows x NSEG segments of segp lanes, as large as the
    cap allows. Under the interpreter the cap is large: its cost is per program and per tl op,
    nearly independent of the tile size, so the test shapes run as a single program (the
    multi-program grids are tested with a lowered interp_max_tile)."""
    cap = interp_max_tile if interpreting() else GPU_TILE
    nseg_t = min(triton.next_power_of_2(nseg), max(1, cap // segp))
    tr = min(triton.next_power_of_2(rows), max(1, cap // (segp * nseg_t)))
    num_warps = 8 if tr * nseg_t * segp >= 4096 else 4
    return tr, nseg_t, num_warps


def _plan(R: int, C: int, fmt: int, scaling: int, block_size: int, hb: int):
    """(pass list, SEG, SEGP, GB, B, nb): how the call is split into passes and segments."""
    if fmt < 0:
        seg = max(hb, 1)
        return [PASS_FUSED], seg, seg, 1, 1, 1
    if scaling in (BLOCK, ROW):
        b = min(block_size, C) if scaling == BLOCK else C  # a block of >= C columns is the row
        nb = -(-C // b)
        if b <= MAX_FUSED_GROUP and (hb == 0 or b % hb == 0):
            return [PASS_FUSED], b, triton.next_power_of_2(b), 1, b, nb
        if b <= MAX_FUSED_GROUP and hb % b == 0:  # a power-of-two b below hb
            return [PASS_FUSED], hb, hb, hb // b, b, nb
    else:
        b, nb = 1, 1
    seg = max(hb, min(triton.next_power_of_2(C), 64))
    return [PASS_ABSMAX, PASS_QUANT], seg, seg, 1, b, nb


class Launch(NamedTuple):
    """Everything a call launches: the passes (one launch each), the grid, the runtime ints B
    (block size), nb (groups per row) and nps (programs per row tile), the number of absmax
    groups (pass 1's buffer), the fp32 rotation norm and the constexprs (without PASS)."""
    passes: list
    grid: tuple
    b: int
    nb: int
    nps: int
    ngroups: int
    norm: float
    num_warps: int
    const: dict


def launch(dtype, R: int, C: int, fmt: int, scaling: int, block_size: int, e8m0: bool,
           stochastic: bool, had_block: int, write_codes: bool, write_out: bool) -> Launch:
    """The launch plan of a call (also what tests/test_triton_aot.py compiles)."""
    hb = int(had_block)
    if fmt < 0 and not hb:
        raise ValueError("lowprec: fmt -1 (rotation only) needs a hadamard block")
    if hb and (hb & (hb - 1) or C % hb):
        raise ValueError(f"hadamard block {hb} must be a power of two dividing {C}")
    scaling = scaling if fmt >= 0 else BLOCK
    passes, seg, segp, gb, b, nb = _plan(R, C, fmt, scaling, block_size, hb)
    nseg = -(-C // seg)
    tr, nseg_t, num_warps = _tile(R, nseg, segp)
    kind = KINDS[dtype]
    q_fmt = FORMATS[_FP8_DTYPES[fmt]][1:] if fmt in _FP8_DTYPES else (0, 0, 0, 0, 0, False)
    o_fmt = FORMATS[dtype][1:] if kind else (0, 0, 0, 0, 0, False)
    const = dict(
        IN_KIND=kind, FMT=fmt, FMAX=FMT_MAX[_FORMAT_NAMES[fmt]] if fmt >= 0 else 1.0,
        SCALING=scaling, E8M0=bool(e8m0), STOCHASTIC=bool(stochastic), HB=hb,
        LOG2_HB=hb.bit_length() - 1 if hb else 0, TR=tr, NSEG=nseg_t, SEG=seg, SEGP=segp, GB=gb,
        WRITE_CODES=bool(write_codes), WRITE_OUT=bool(write_out),
        **dict(zip(("Q_MBITS", "Q_EMIN", "Q_MAX_FINITE", "Q_OVERFLOW", "Q_NAN",
                    "Q_NAN_KEEPS_SIGN"), q_fmt)),
        **dict(zip(("O_MBITS", "O_EMIN", "O_MAX_FINITE", "O_OVERFLOW", "O_NAN",
                    "O_NAN_KEEPS_SIGN"), o_fmt)))
    norm = float(torch.tensor(1.0 / math.sqrt(hb), dtype=torch.float32)) if hb else 1.0
    nps = triton.cdiv(nseg, nseg_t)
    return Launch(passes, (triton.cdiv(R, tr) * nps,), b, nb, nps, (R * nb, R, C, 1)[scaling],
                  norm, num_warps, const)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Flat view the kernel indexes; 16-bit floats as their int16 bit patterns."""
    t = t.reshape(-1)
    return t if t.dtype == torch.float32 else t.view(torch.int16)


def lowprec(x, fmt, scaling, block_size, e8m0, stochastic, seed, offset, had_block, codes,
            scales, out):
    """The lowbit.ops lowprec contract (see there) on contiguous (R, C) fp32/bf16/fp16 x."""
    if x.dtype not in KINDS:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    R, C = x.shape
    if R * C == 0:
        return
    plan = launch(x.dtype, R, C, fmt, scaling, block_size, e8m0, stochastic, had_block,
                  codes is not None, out is not None)
    x_buf = _bits(x)
    # absent outputs: any pointer (the constexprs drop their stores)
    out_buf = _bits(out) if out is not None else x_buf
    codes_buf = codes.reshape(-1) if codes is not None else x_buf
    scales_buf = scales.reshape(-1) if scales is not None else x_buf
    amax = x_buf
    if PASS_ABSMAX in plan.passes:
        amax = torch.zeros(plan.ngroups, dtype=torch.int32, device=x.device)
    with quiet_fp_warnings():
        for p in plan.passes:
            _lowprec_kernel[plan.grid](x_buf, codes_buf, scales_buf, out_buf, amax, R, C, plan.b,
                                       plan.nb, plan.nps, int(seed), int(offset), plan.norm,
                                       PASS=p, num_warps=plan.num_warps, **plan.const,
                                       **LAUNCH_OPTS)
