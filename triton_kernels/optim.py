"""Fused multi-tensor optimizer step (Adam/AdamW, Lion, SGD with momentum) in Triton. Spec:
lowbit.reference.optim.fused_step; per-element math: csrc/include/lowbit/optim_math.h.

One launch per call updates every tensor of a parameter group: the host builds a pointer table
(int64 addresses of param, grad, state1, absmax1, state2, absmax2, kahan compensation, the
stochastic-rounding key and the element count of each tensor) and a work table of (tensor, first
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
def _update(x, g, s1, s2, sc_ptr, ct_ptr, KIND: tl.constexpr, MAXIMIZE: tl.constexpr,
            DECAY: tl.constexpr, L2: tl.constexpr, NESTEROV: tl.constexpr,
            FIRST_STEP: tl.constexpr, NO_MOMENTUM: tl.constexpr, VALUE_CLIP: tl.constexpr,
            TENSOR_SCALE: tl.constexpr, ADA_CLIP: tl.constexpr, NORM_SCALE: tl.constexpr,
            SPIKE_CLIP: tl.constexpr, RESET: tl.constexpr, DECAY_AFTER: tl.constexpr):
    """update_rule of optim_math.h: the new (x, s1, s2) and the clipped mask. Scalars
    sc_ptr[0..9] as there; ct_ptr: the tensor's clip row."""
    if MAXIMIZE:
        g = neg(g)
    g, clipped = clip_transform(g, ct_ptr, sc_ptr + 8, VALUE_CLIP, TENSOR_SCALE, ADA_CLIP,
                                NORM_SCALE)
    s2_loaded = s2
    if RESET:  # (an unused state's placeholder becomes a zero tile: harmless)
        s1 = tl.zeros_like(g)
        s2 = tl.zeros_like(g)
    if KIND == 0:  # Adam: decay, wd, a1, b2, a2, eps_t, step_size
        if DECAY and not DECAY_AFTER:
            x = x * tl.load(sc_ptr + 0)
        if L2:
            g = g + tl.load(sc_ptr + 1) * x
        if SPIKE_CLIP:
            floor = tl.load(sc_ptr + 10)
            lim = tl.load(sc_ptr + 9) * tl.where(s2_loaded > floor, s2_loaded, floor)
            over = g * g > lim
            root = tl.math.sqrt_rn(lim)
            g = tl.where(over, tl.where(g < 0.0, neg(root), root), g)
            clipped = clipped | over
        s1 = s1 + tl.load(sc_ptr + 2) * (g - s1)
        s2 = s2 * tl.load(sc_ptr + 3) + tl.load(sc_ptr + 4) * (g * g)
        d = tl.math.sqrt_rn(s2) + tl.load(sc_ptr + 5)
        x = x - tl.load(sc_ptr + 6) * tl.math.div_rn(s1, d)
    elif KIND == 1:  # Lion: decay, b1, a1, b2, a2, lr
        if DECAY and not DECAY_AFTER:
            x = x * tl.load(sc_ptr + 0)
        c = tl.load(sc_ptr + 1) * s1 + tl.load(sc_ptr + 2) * g
        x = x - tl.load(sc_ptr + 5) * _sign(c)
        s1 = tl.load(sc_ptr + 3) * s1 + tl.load(sc_ptr + 4) * g
    else:  # SGD: wd, momentum, damp, lr
        if L2:
            g = g + tl.load(sc_ptr + 0) * x
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
    if KIND != 2 and DECAY and DECAY_AFTER:
        x = x * tl.load(sc_ptr + 0)
    return x, s1, s2, clipped


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
def _load_state(addr, abs_addr, code_ptr, rows, row_ok, idx, msk, bidx, m_e,
                STATE_BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The fp32 values of one state over the tile (dequantized for 8/4 bits)."""
    if STATE_BITS == 32:
        return tl.load(addr.to(tl.pointer_type(tl.float32)) + idx, mask=msk, other=0.0)
    else:
        codes_ptr = addr.to(tl.pointer_type(tl.uint8))
        am = tl.load(abs_addr.to(tl.pointer_type(tl.float32)) + rows, mask=row_ok,
                     other=0.0)[:, None]
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
                 STATE_BITS: tl.constexpr, NCODE: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Store one state's new fp32 values: as is, or requantized per block (absmax of the new
    values over the valid elements, NaN winning, as quant.h; nearest codes)."""
    if STATE_BITS == 32:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + idx, s, mask=msk)
    else:
        codes_ptr = addr.to(tl.pointer_type(tl.uint8))
        bits = tl.where(msk, s.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
        am = tl.max(bits, axis=1).to(tl.float32, bitcast=True)
        tl.store(abs_addr.to(tl.pointer_type(tl.float32)) + rows, am, mask=row_ok)
        c = code_index(s * _unit_scale(am)[:, None], code_ptr, mids_ptr, NCODE, False, 0)
        if STATE_BITS == 8:
            tl.store(codes_ptr + idx, c.to(tl.uint8), mask=msk)
        else:
            # back to (even, odd) pairs; an odd tail leaves its low nibble 0
            c_e, c_o = tl.split(tl.reshape(tl.where(msk, c, 0), (ROWS, BLOCK // 2, 2)))
            tl.store(codes_ptr + bidx, ((c_e << 4) | c_o).to(tl.uint8), mask=m_e)


@triton.jit
def _optim_kernel(work_ptr, tab_ptr, sc_ptr, code1_ptr, mids1_ptr, code2_ptr, mids2_ptr,
                  KIND: tl.constexpr, NSTATES: tl.constexpr, STATE_BITS: tl.constexpr,
                  BLOCK: tl.constexpr, ROWS: tl.constexpr, NCODE: tl.constexpr,
                  P_KIND: tl.constexpr, WRITEBACK: tl.constexpr, MBITS: tl.constexpr,
                  EMIN: tl.constexpr, MAX_FINITE: tl.constexpr, OVERFLOW: tl.constexpr,
                  NAN: tl.constexpr, NAN_KEEPS_SIGN: tl.constexpr, MAXIMIZE: tl.constexpr,
                  DECAY: tl.constexpr, L2: tl.constexpr, NESTEROV: tl.constexpr,
                  FIRST_STEP: tl.constexpr, NO_MOMENTUM: tl.constexpr, VALUE_CLIP: tl.constexpr,
                  TENSOR_SCALE: tl.constexpr, ADA_CLIP: tl.constexpr, NORM_SCALE: tl.constexpr,
                  SPIKE_CLIP: tl.constexpr, RESET: tl.constexpr, DECAY_AFTER: tl.constexpr,
                  HAS_CLIP_ROW: tl.constexpr, COUNT: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)
    t = tl.load(work_ptr + 2 * w)
    b0 = tl.load(work_ptr + 2 * w + 1)
    # pointer table row: p, g, s1, s1_absmax, s2, s2_absmax, comp, key, n, clip row, clipped
    # counter (int64 each)
    row = tab_ptr + t * 11
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

    x = load_as_f32(p_ptr, idx, msk, P_KIND)
    comp_ptr = p_ptr  # unused unless kahan
    if WRITEBACK == 3:
        comp_ptr = _as_param_ptr(tl.load(row + 6), P_KIND)
        x = x + load_as_f32(comp_ptr, idx, msk, P_KIND)
    g = load_as_f32(g_ptr, idx, msk, P_KIND)
    s1 = 0.0  # placeholders for the states a rule does not have
    s2 = 0.0
    if NSTATES >= 1:
        s1_addr = tl.load(row + 2)
        s1_abs = tl.load(row + 3)
        s1 = _load_state(s1_addr, s1_abs, code1_ptr, rows, row_ok, idx, msk, bidx, m_e,
                         STATE_BITS, ROWS, BLOCK)
    if NSTATES >= 2:
        s2_addr = tl.load(row + 4)
        s2_abs = tl.load(row + 5)
        s2 = _load_state(s2_addr, s2_abs, code2_ptr, rows, row_ok, idx, msk, bidx, m_e,
                         STATE_BITS, ROWS, BLOCK)

    ct_ptr = sc_ptr  # placeholder: read only with the per-tensor clip flags
    if HAS_CLIP_ROW:
        ct_ptr = tl.load(row + 9).to(tl.pointer_type(tl.float32))
    x, s1, s2, clipped = _update(x, g, s1, s2, sc_ptr, ct_ptr, KIND, MAXIMIZE, DECAY, L2,
                                 NESTEROV, FIRST_STEP, NO_MOMENTUM, VALUE_CLIP, TENSOR_SCALE,
                                 ADA_CLIP, NORM_SCALE, SPIKE_CLIP, RESET, DECAY_AFTER)
    if COUNT:
        count = tl.sum(tl.sum((clipped & msk).to(tl.int64), axis=1), axis=0)
        tl.atomic_add(tl.load(row + 10).to(tl.pointer_type(tl.int64)), count)

    _store_param(x, p_ptr, comp_ptr, idx, msk, tl.load(row + 7), P_KIND, WRITEBACK, MBITS, EMIN,
                 MAX_FINITE, OVERFLOW, NAN, NAN_KEEPS_SIGN)
    if NSTATES >= 1:
        _store_state(s1, s1_addr, s1_abs, code1_ptr, mids1_ptr, rows, row_ok, idx, msk, bidx,
                     m_e, STATE_BITS, NCODE, ROWS, BLOCK)
    if NSTATES >= 2:
        _store_state(s2, s2_addr, s2_abs, code2_ptr, mids2_ptr, rows, row_ok, idx, msk, bidx,
                     m_e, STATE_BITS, NCODE, ROWS, BLOCK)


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


_tables_cache = {}


def _tables(state_bits: int, device):
    """(code1, mids1, code2, mids2) of a quantized state format, on `device`."""
    key = (state_bits, str(device))
    if key not in _tables_cache:
        from ..codebooks import codebook
        from ..reference.quant import midpoints
        first, second, _ = ref.STATE_FORMATS[state_bits]
        c1, c2 = codebook(first), codebook(second)
        _tables_cache[key] = tuple(t.to(device=device, dtype=torch.float32).contiguous()
                                   for t in (c1, midpoints(c1), c2, midpoints(c2)))
    return _tables_cache[key]


def _check(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind, state_bits,
           block, scalars, flags, writeback) -> int:
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
    want = {"adam": 2, "lion": 1, "sgd": 0 if flags & ref.NO_MOMENTUM else 1}[kind]
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
        for st, am in ((state1, absmax1), (state2, absmax2))[:nstates]:
            sizes.append((st[i], (n + 1) // 2 if state_bits == 4 else n))
            if quantized:
                sizes.append((am[i], triton.cdiv(n, block)))
        if any(t.numel() != want for t, want in sizes):
            raise ValueError(f"tensor {i}: a grad, state, absmax or comp has the wrong size "
                             f"for {n} elements")
    return nstates


def optim_step(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind, state_bits,
               block_size, scalars, flags, writeback, clip=None, clipped=None) -> None:
    """One fused optimizer step over all tensors (lowbit.ops.optim_step's contract,
    lowbit.reference.optim.fused_step): everything is written in place, in a single launch."""
    if not params:
        return
    per_tensor = flags & (clip_ref.TENSOR_SCALE | clip_ref.ADA_CLIP | clip_ref.NORM_SCALE)
    if per_tensor and clip is None:
        raise ValueError("the per-tensor clip flags need the clip table")
    block = (block_size or ref.STATE_FORMATS[state_bits][2]) if state_bits != 32 else 1
    nstates = _check(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind,
                     state_bits, block, scalars, flags, writeback)
    device = params[0].device
    quantized = state_bits != 32 and nstates > 0
    if quantized:
        code_tabs = _tables(state_bits, device)
        ncode = code_tabs[0].numel()
    else:  # no quantization blocks: the code tables are never read
        block, ncode = F32_BLOCK, 0
        code_tabs = (torch.zeros(1, dtype=torch.float32, device=device),) * 4
    kahan, stochastic = writeback == "kahan", writeback == "stochastic"

    def addr(lst, i, used):
        return lst[i].data_ptr() if used else 0

    tab, nblocks = [], []
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        tab.append([p.data_ptr(), grads[i].data_ptr(),
                    addr(state1, i, nstates >= 1), addr(absmax1, i, quantized),
                    addr(state2, i, nstates >= 2), addr(absmax2, i, quantized and nstates >= 2),
                    addr(comps, i, kahan), int(keys[i]) if stochastic else 0, n,
                    clip[i].data_ptr() if clip is not None else 0,
                    clipped[i].data_ptr() if clipped is not None else 0])
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
    with quiet_fp_warnings():
        _optim_kernel[(len(work),)](
            work_t, tab_t, sc_t, *code_tabs, KIND=ref.KINDS[kind], NSTATES=nstates,
            STATE_BITS=state_bits if quantized else 32, BLOCK=block, ROWS=rows, NCODE=ncode,
            P_KIND=p_kind, WRITEBACK=ref.WRITEBACK[writeback], MBITS=mbits, EMIN=emin,
            MAX_FINITE=max_finite, OVERFLOW=overflow, NAN=nan, NAN_KEEPS_SIGN=nan_sign,
            MAXIMIZE=bool(flags & ref.MAXIMIZE), DECAY=bool(flags & ref.DECAY),
            L2=bool(flags & ref.L2), NESTEROV=bool(flags & ref.NESTEROV),
            FIRST_STEP=bool(flags & ref.FIRST_STEP), NO_MOMENTUM=bool(flags & ref.NO_MOMENTUM),
            VALUE_CLIP=bool(flags & clip_ref.VALUE_CLIP),
            TENSOR_SCALE=bool(flags & clip_ref.TENSOR_SCALE),
            ADA_CLIP=bool(flags & clip_ref.ADA_CLIP), NORM_SCALE=bool(flags & clip_ref.NORM_SCALE),
            SPIKE_CLIP=bool(flags & ref.SPIKE_CLIP), RESET=bool(flags & ref.RESET),
            DECAY_AFTER=bool(flags & ref.DECAY_AFTER), HAS_CLIP_ROW=bool(per_tensor),
            COUNT=clipped is not None, num_warps=num_warps, **LAUNCH_OPTS)
