"""Fused multi-tensor Adam/AdamW step in Triton (spec: lowbit.reference.optim.adam_update; CPU
twin: csrc/cpu/optim.cpp, per-element math lowbit/adam.h).

One launch per call updates every tensor of a parameter group: the host builds a pointer table
(int64 addresses of param, grad, m, v, m_absmax, v_absmax and the element count of each tensor)
and a work table of (tensor, first block) items; program w loads item w, casts the addresses back
to typed pointers and updates ROWS consecutive blocks of that tensor as a [ROWS, BLOCK] tile.
Checked: the int64 -> pointer cast works under TRITON_INTERPRET=1 and compiles for sm_80/sm_90
(tests/test_triton_aot.py).

Per element, every operation is rounded once in fp32 (launched with enable_fp_fusion=False, IEEE
tl.math.div_rn / sqrt_rn), in the reference's order. Quantized states (8-bit: block 256, one code
per byte; 4-bit: block 128, element 2j in the high nibble of byte j) are dequantized per block,
updated, and requantized against the absmax of the new values with nearest rounding, exactly as
triton_kernels/quant.py does. The maximize / decoupled-decay / L2 branches of the spec are
constexprs, so "p * 1" and "g + 0 * p" are never evaluated (they are not identities for -0, inf
and NaN).
"""
import torch
import triton
import triton.language as tl

from ._common import (INTERP_MAX_PROGRAMS, INTERP_MAX_TILE, LAUNCH_OPTS, code_index, interpreting,
                      pair_layout, quiet_fp_warnings, tile_rows)
from .quant import _scale_back, _unit_scale

# Elements per "block" for 32-bit states (no quantization blocks: just the unit of a work item).
F32_BLOCK = 1024
# Pointer table columns: p, g, m, v, m_absmax, v_absmax (int64 addresses), n.


@triton.jit
def _adam_math(p, g, m, v, decay, wd, a1, b2, a2, bc2, eps, step_size,
               MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, L2: tl.constexpr):
    """adam_update_one of adam.h: returns the new (p, m, v)."""
    if MAXIMIZE:
        g = -g
    if DECAY:
        p = p * decay
    if L2:
        g = g + wd * p
    m = m + a1 * (g - m)
    v = v * b2 + a2 * (g * g)
    d = tl.math.div_rn(tl.math.sqrt_rn(v), bc2) + eps
    p = p - step_size * tl.math.div_rn(m, d)
    return p, m, v


@triton.jit
def _block_absmax(x, mask):
    # max of |x| bit patterns over the block's valid elements (NaN wins), as quant.h
    bits = tl.where(mask, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
    return tl.max(bits, axis=1)


@triton.jit
def _dequant(codes, code_ptr, amax):
    return _scale_back(tl.load(code_ptr + codes), amax)


@triton.jit
def _requant_pairs(vals_e, vals_o, m_e, m_o, rows, row_ok, bidx, abs_ptr, codes_ptr, code_ptr,
                   mids_ptr, NCODE: tl.constexpr):
    """4-bit state: new absmax over both halves of each block, nearest codes, element 2j in the
    high nibble (an odd tail's low nibble is 0)."""
    am = tl.maximum(_block_absmax(vals_e, m_e), _block_absmax(vals_o, m_o))
    amf = am.to(tl.float32, bitcast=True)
    tl.store(abs_ptr + rows, amf, mask=row_ok)
    inv = _unit_scale(amf)[:, None]
    c_e = code_index(vals_e * inv, code_ptr, mids_ptr, NCODE, False, 0)
    c_o = tl.where(m_o, code_index(vals_o * inv, code_ptr, mids_ptr, NCODE, False, 0), 0)
    tl.store(codes_ptr + bidx, ((c_e << 4) | c_o).to(tl.uint8), mask=m_e)


@triton.jit
def _adam_kernel(work_ptr, tab_ptr, sc_ptr, m_code_ptr, m_mids_ptr, v_code_ptr, v_mids_ptr,
                 STATE_BITS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                 NCODE: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr,
                 L2: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)
    t = tl.load(work_ptr + 2 * w)
    b0 = tl.load(work_ptr + 2 * w + 1)
    row = tab_ptr + t * 7
    p_ptr = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 6)
    decay = tl.load(sc_ptr + 0)
    wd = tl.load(sc_ptr + 1)
    a1 = tl.load(sc_ptr + 2)
    b2 = tl.load(sc_ptr + 3)
    a2 = tl.load(sc_ptr + 4)
    bc2 = tl.load(sc_ptr + 5)
    eps = tl.load(sc_ptr + 6)
    step_size = tl.load(sc_ptr + 7)
    rows = b0 + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows * BLOCK < n
    if STATE_BITS == 32:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        cols = tl.arange(0, BLOCK).to(tl.int64)
        idx = rows[:, None] * BLOCK + cols[None, :]
        msk = idx < n
        p = tl.load(p_ptr + idx, mask=msk, other=0.0)
        g = tl.load(g_ptr + idx, mask=msk, other=0.0)
        m = tl.load(m_ptr + idx, mask=msk, other=0.0)
        v = tl.load(v_ptr + idx, mask=msk, other=0.0)
        p, m, v = _adam_math(p, g, m, v, decay, wd, a1, b2, a2, bc2, eps, step_size,
                             MAXIMIZE, DECAY, L2)
        tl.store(p_ptr + idx, p, mask=msk)
        tl.store(m_ptr + idx, m, mask=msk)
        tl.store(v_ptr + idx, v, mask=msk)
    else:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
        mabs_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        vabs_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        am_m = tl.load(mabs_ptr + rows, mask=row_ok, other=0.0)[:, None]
        am_v = tl.load(vabs_ptr + rows, mask=row_ok, other=0.0)[:, None]
        if NCODE == 16:
            even, odd, m_e, m_o, bidx = pair_layout(rows, n, BLOCK)
            mb = tl.load(m_ptr + bidx, mask=m_e, other=0).to(tl.int32)
            vb = tl.load(v_ptr + bidx, mask=m_e, other=0).to(tl.int32)
            p_e = tl.load(p_ptr + even, mask=m_e, other=0.0)
            p_o = tl.load(p_ptr + odd, mask=m_o, other=0.0)
            g_e = tl.load(g_ptr + even, mask=m_e, other=0.0)
            g_o = tl.load(g_ptr + odd, mask=m_o, other=0.0)
            p_e, mm_e, vv_e = _adam_math(p_e, g_e, _dequant(mb >> 4, m_code_ptr, am_m),
                                         _dequant(vb >> 4, v_code_ptr, am_v), decay, wd, a1, b2,
                                         a2, bc2, eps, step_size, MAXIMIZE, DECAY, L2)
            p_o, mm_o, vv_o = _adam_math(p_o, g_o, _dequant(mb & 0xF, m_code_ptr, am_m),
                                         _dequant(vb & 0xF, v_code_ptr, am_v), decay, wd, a1, b2,
                                         a2, bc2, eps, step_size, MAXIMIZE, DECAY, L2)
            tl.store(p_ptr + even, p_e, mask=m_e)
            tl.store(p_ptr + odd, p_o, mask=m_o)
            # requantize m, then v: absmax over both halves of each block, packed nibbles
            _requant_pairs(mm_e, mm_o, m_e, m_o, rows, row_ok, bidx, mabs_ptr, m_ptr, m_code_ptr,
                           m_mids_ptr, NCODE)
            _requant_pairs(vv_e, vv_o, m_e, m_o, rows, row_ok, bidx, vabs_ptr, v_ptr, v_code_ptr,
                           v_mids_ptr, NCODE)
        else:
            cols = tl.arange(0, BLOCK).to(tl.int64)
            idx = rows[:, None] * BLOCK + cols[None, :]
            msk = idx < n
            mc = tl.load(m_ptr + idx, mask=msk, other=0).to(tl.int32)
            vc = tl.load(v_ptr + idx, mask=msk, other=0).to(tl.int32)
            p = tl.load(p_ptr + idx, mask=msk, other=0.0)
            g = tl.load(g_ptr + idx, mask=msk, other=0.0)
            p, mm, vv = _adam_math(p, g, _dequant(mc, m_code_ptr, am_m),
                                   _dequant(vc, v_code_ptr, am_v), decay, wd, a1, b2, a2, bc2,
                                   eps, step_size, MAXIMIZE, DECAY, L2)
            tl.store(p_ptr + idx, p, mask=msk)
            amf = _block_absmax(mm, msk).to(tl.float32, bitcast=True)
            tl.store(mabs_ptr + rows, amf, mask=row_ok)
            inv = _unit_scale(amf)[:, None]
            c = code_index(mm * inv, m_code_ptr, m_mids_ptr, NCODE, False, 0)
            tl.store(m_ptr + idx, c.to(tl.uint8), mask=msk)
            amf = _block_absmax(vv, msk).to(tl.float32, bitcast=True)
            tl.store(vabs_ptr + rows, amf, mask=row_ok)
            inv = _unit_scale(amf)[:, None]
            c = code_index(vv * inv, v_code_ptr, v_mids_ptr, NCODE, False, 0)
            tl.store(v_ptr + idx, c.to(tl.uint8), mask=msk)


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
    key = (state_bits, str(device))
    if key not in _tables_cache:
        from lowbit.codebooks import codebook
        from lowbit.reference.optim import STATE_FORMATS
        from lowbit.reference.quant import midpoints
        m_name, v_name, block = STATE_FORMATS[state_bits]
        m_code, v_code = codebook(m_name), codebook(v_name)
        _tables_cache[key] = (block, tuple(t.to(device=device, dtype=torch.float32).contiguous()
                                           for t in (m_code, midpoints(m_code), v_code,
                                                     midpoints(v_code))))
    return _tables_cache[key]


def adam_step(params, grads, m, m_absmax, v, v_absmax, state_bits, scalars, maximize):
    """One fused Adam/AdamW step over all tensors (lowbit.ops.adam_step's contract): fp32 params
    and grads; fp32 m/v for state_bits 32, else flat uint8 codes plus fp32 per-block absmax.
    Everything is written in place, in a single launch."""
    if state_bits not in (32, 8, 4):
        raise ValueError(f"state_bits must be 32, 8 or 4, got {state_bits}")
    device = params[0].device
    if state_bits == 32:
        block, ncode = F32_BLOCK, 0
        dummy = torch.zeros(1, dtype=torch.float32, device=device)
        code_tabs = (dummy,) * 4
    else:
        block, code_tabs = _tables(state_bits, device)
        ncode = code_tabs[0].numel()
    tab, nblocks = [], []
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        if state_bits == 32:
            absp = (0, 0)
        else:
            absp = (m_absmax[i].data_ptr(), v_absmax[i].data_ptr())
        tab.append([p.data_ptr(), grads[i].data_ptr(), m[i].data_ptr(), v[i].data_ptr(),
                    *absp, n])
        nblocks.append(triton.cdiv(n, block))
    if not tab:
        return
    rows = _rows_per_item(nblocks, block)
    work = [(t, b) for t, nb in enumerate(nblocks) for b in range(0, nb, rows)]
    tab_t = torch.tensor(tab, dtype=torch.int64, device=device)
    work_t = torch.tensor(work, dtype=torch.int64, device=device)
    sc_t = torch.tensor(list(scalars), dtype=torch.float32, device=device)
    # the spec's branches, decided on the host values as reference.optim.adam_update does
    decay, wd = float(scalars[0]), float(scalars[1])
    num_warps = 8 if rows * block >= 4096 else 4
    with quiet_fp_warnings():
        _adam_kernel[(len(work),)](
            work_t, tab_t, sc_t, *code_tabs, STATE_BITS=state_bits, BLOCK=block, ROWS=rows,
            NCODE=ncode, MAXIMIZE=bool(maximize), DECAY=decay != 1.0, L2=wd != 0.0,
            num_warps=num_warps, **LAUNCH_OPTS)
