"""Block-wise codebook quantization and dequantization in Triton (rules: lowbit/quant.h in csrc).

One program handles ROWS consecutive quantization blocks as a [ROWS, BLOCK] tile (ROWS is a
constexpr so interpreter grids stay small and GPU tiles stay around 2K elements). For 16-entry
codebooks the tile is split into even and odd elements ([ROWS, BLOCK/2] each): element 2j goes to
the high nibble of byte j, 2j+1 to the low nibble, so each program writes whole bytes and no two
programs share one (BLOCK is even). All indices are int64: n can exceed 2^31.
"""
import torch
import triton
import triton.language as tl

from ._common import (FORMATS, KINDS, LAUNCH_OPTS, code_index, load_as_f32, pair_layout,
                      philox_word0, quiet_fp_warnings, round_to_fmt, tile_rows)


@triton.jit
def _unit_scale(amax):
    # inv = 1 / absmax with IEEE division (div.rn.f32 on the GPU, not the default div.full.f32),
    # or 0 for blocks whose absmax is not > 0 (all zero, or NaN): unit_scale in quant.h.
    ok = amax > 0.0
    return tl.where(ok, tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32),
                                       tl.where(ok, amax, 1.0)), 0.0)


@triton.jit
def _quantize_kernel(x_ptr, code_ptr, mids_ptr, codes_ptr, absmax_ptr, n, nblocks, seed, offset,
                     IN_KIND: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                     NCODE: tl.constexpr, STOCHASTIC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < nblocks
    if NCODE == 16:
        even, odd, m_e, m_o, bidx = pair_layout(rows, n, BLOCK)
        x_e = load_as_f32(x_ptr, even, m_e, IN_KIND)
        x_o = load_as_f32(x_ptr, odd, m_o, IN_KIND)
        # absmax on the bit patterns: |x| bits fit in 31 bits, so the signed int32 max equals
        # the unsigned one, and a NaN (largest patterns) wins over everything -> NaN absmax.
        a_e = tl.max(x_e.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
        a_o = tl.max(x_o.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
        amax = tl.maximum(a_e, a_o).to(tl.float32, bitcast=True)
        tl.store(absmax_ptr + rows, amax, mask=row_ok)
        inv = _unit_scale(amax)[:, None]
        y_e = x_e * inv  # one rounded product (launched with fp fusion off)
        y_o = x_o * inv
        if STOCHASTIC:
            r_e = philox_word0(seed, offset + even)
            r_o = philox_word0(seed, offset + odd)
        else:
            r_e = 0
            r_o = 0
        c_e = code_index(y_e, code_ptr, mids_ptr, NCODE, STOCHASTIC, r_e)
        c_o = code_index(y_o, code_ptr, mids_ptr, NCODE, STOCHASTIC, r_o)
        c_o = tl.where(m_o, c_o, 0)                 # odd tail: low nibble 0
        byte = (c_e << 4) | c_o
        tl.store(codes_ptr + bidx, byte.to(tl.uint8), mask=m_e)
    else:
        cols = tl.arange(0, BLOCK).to(tl.int64)
        idx = rows[:, None] * BLOCK + cols[None, :]
        m = idx < n
        x = load_as_f32(x_ptr, idx, m, IN_KIND)
        amax = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1).to(tl.float32,
                                                                           bitcast=True)
        tl.store(absmax_ptr + rows, amax, mask=row_ok)
        inv = _unit_scale(amax)[:, None]
        y = x * inv  # one rounded product (launched with fp fusion off)
        if STOCHASTIC:
            r = philox_word0(seed, offset + idx)
        else:
            r = 0
        c = code_index(y, code_ptr, mids_ptr, NCODE, STOCHASTIC, r)
        tl.store(codes_ptr + idx, c.to(tl.uint8), mask=m)


@triton.jit
def _scale_back(c, amax):
    """c * absmax in fp32; a NaN result becomes the canonical quiet NaN 0x7FC00000, as
    dequant_value in quant.h (x86 and GPU arithmetic give different NaN bits otherwise)."""
    v = c * amax
    return tl.where(v != v, 0x7FC00000, v.to(tl.uint32, bitcast=True)).to(tl.float32,
                                                                          bitcast=True)


@triton.jit
def _store_from_f32(ptr, idx, v, mask, OUT_KIND: tl.constexpr, MBITS: tl.constexpr,
                    EMIN: tl.constexpr, MAX_FINITE: tl.constexpr, OVERFLOW: tl.constexpr,
                    NAN: tl.constexpr, NAN_KEEPS_SIGN: tl.constexpr):
    # fp32 stores as is; bf16/fp16 go through the integer nearest-even routine (the interpreter's
    # fp32->bf16 cast truncates) and are stored as bits through an int16 view of the output.
    if OUT_KIND == 0:
        tl.store(ptr + idx, v, mask=mask)
    else:
        h = round_to_fmt(v.to(tl.uint32, bitcast=True), 16, MBITS, EMIN, MAX_FINITE, OVERFLOW,
                         NAN, NAN_KEEPS_SIGN, False, 0)
        tl.store(ptr + idx, h.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def _dequantize_kernel(codes_ptr, absmax_ptr, code_ptr, out_ptr, n, nblocks,
                       OUT_KIND: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                       NCODE: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                       MAX_FINITE: tl.constexpr, OVERFLOW: tl.constexpr, NAN: tl.constexpr,
                       NAN_KEEPS_SIGN: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    amax = tl.load(absmax_ptr + rows, mask=rows < nblocks, other=0.0)[:, None]
    if NCODE == 16:
        even, odd, m_e, m_o, bidx = pair_layout(rows, n, BLOCK)
        byte = tl.load(codes_ptr + bidx, mask=m_e,
                       other=0).to(tl.int32)
        # value = code[c] * absmax in fp32 (one rounding), then the output cast.
        v_e = _scale_back(tl.load(code_ptr + (byte >> 4)), amax)
        v_o = _scale_back(tl.load(code_ptr + (byte & 0xF)), amax)
        _store_from_f32(out_ptr, even, v_e, m_e, OUT_KIND, MBITS, EMIN, MAX_FINITE, OVERFLOW, NAN,
                        NAN_KEEPS_SIGN)
        _store_from_f32(out_ptr, odd, v_o, m_o, OUT_KIND, MBITS, EMIN, MAX_FINITE, OVERFLOW, NAN,
                        NAN_KEEPS_SIGN)
    else:
        cols = tl.arange(0, BLOCK).to(tl.int64)
        idx = rows[:, None] * BLOCK + cols[None, :]
        m = idx < n
        c = tl.load(codes_ptr + idx, mask=m, other=0).to(tl.int32)
        v = _scale_back(tl.load(code_ptr + c), amax)
        _store_from_f32(out_ptr, idx, v, m, OUT_KIND, MBITS, EMIN, MAX_FINITE, OVERFLOW, NAN,
                        NAN_KEEPS_SIGN)


def _as_kernel_buffer(t: torch.Tensor) -> torch.Tensor:
    """Flat view the kernels index; 16-bit floats are passed as their int16 bit patterns."""
    t = t.reshape(-1)
    return t if t.dtype == torch.float32 else t.view(torch.int16)


def _launch_shape(nblocks: int, block_size: int):
    rows = tile_rows(nblocks, block_size, gpu_tile=2048)
    grid = (triton.cdiv(nblocks, rows),)
    num_warps = 8 if rows * block_size >= 4096 else 4
    return rows, grid, num_warps


def _check_args(code: torch.Tensor, block_size: int):
    ncode = code.numel()
    if ncode not in (16, 256):
        raise ValueError(f"Triton quantization supports 16- or 256-entry codebooks, got {ncode}")
    # tl.arange needs power-of-two extents; 4-bit tiles split each block into byte pairs.
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 2, got {block_size}")
    return ncode


def quantize_blockwise(x, code, mids, block_size, stochastic, seed, offset, codes, absmax):
    """Quantize contiguous fp32/bf16/fp16 `x` into the preallocated `codes` (uint8: x's shape for
    256 codes, flat ceil(n/2) packed bytes for 16) and `absmax` (float32[ceil(n/block_size)])."""
    n = x.numel()
    if n == 0:
        return
    if x.dtype not in KINDS:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    ncode = _check_args(code, block_size)
    nblocks = absmax.numel()
    rows, grid, num_warps = _launch_shape(nblocks, block_size)
    with quiet_fp_warnings():
        _quantize_kernel[grid](
            _as_kernel_buffer(x), code.contiguous(), mids.contiguous(), codes.reshape(-1),
            absmax, n, nblocks, int(seed), int(offset),
            IN_KIND=KINDS[x.dtype], BLOCK=block_size, ROWS=rows, NCODE=ncode,
            STOCHASTIC=bool(stochastic), num_warps=num_warps, **LAUNCH_OPTS)


def dequantize_blockwise(codes, absmax, code, block_size, n, out):
    """out (contiguous fp32/bf16/fp16, n elements) = code[c] * absmax[block], nearest-even cast."""
    if n == 0:
        return
    if out.dtype not in KINDS:
        raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    ncode = _check_args(code, block_size)
    nblocks = absmax.numel()
    rows, grid, num_warps = _launch_shape(nblocks, block_size)
    out_buf = out.reshape(-1)
    if out.dtype != torch.float32:
        out_buf = out_buf.view(torch.int16)
        _, mbits, emin, max_finite, overflow, nan, nan_sign = FORMATS[out.dtype]
    else:  # unused by the fp32 path
        mbits, emin, max_finite, overflow, nan, nan_sign = 0, 0, 0, 0, 0, False
    with quiet_fp_warnings():
        _dequantize_kernel[grid](
            codes.reshape(-1), absmax, code.contiguous(), out_buf, n, nblocks,
            OUT_KIND=KINDS[out.dtype], BLOCK=block_size, ROWS=rows, NCODE=ncode, MBITS=mbits,
            EMIN=emin, MAX_FINITE=max_finite, OVERFLOW=overflow, NAN=nan,
            NAN_KEEPS_SIGN=nan_sign, num_warps=num_warps, **LAUNCH_OPTS)
