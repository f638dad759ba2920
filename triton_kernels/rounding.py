"""Stochastic rounding fp32 -> bf16 / fp16 / float8_e4m3fn / float8_e5m2 in Triton.

Element i draws word 0 of Philox4x32-10 at counter offset + i (tl.randint with an int64 counter,
identical to philox.h) and rounds with the integer routine of formats.h, so the bits match the CPU
backend and the torch reference exactly. The result is stored as raw bits through an int16
(16-bit formats) or uint8 (float8) view of the output: no Triton float cast is involved, which
matters because the interpreter's fp32->bf16/fp8 casts round wrongly.
"""
import torch
import triton
import triton.language as tl

from ._common import (FORMATS, INTERP_MAX_PROGRAMS, INTERP_MAX_TILE, LAUNCH_OPTS,
                      interpreting, philox_word0, round_to_fmt)


@triton.jit
def _stochastic_round_kernel(x_ptr, out_ptr, n, seed, offset,
                             WIDTH: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                             MAX_FINITE: tl.constexpr, OVERFLOW: tl.constexpr, NAN: tl.constexpr,
                             NAN_KEEPS_SIGN: tl.constexpr, ELEMS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * ELEMS + tl.arange(0, ELEMS).to(tl.int64)
    m = idx < n
    bits = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.uint32, bitcast=True)
    r = philox_word0(seed, offset + idx)
    h = round_to_fmt(bits, WIDTH, MBITS, EMIN, MAX_FINITE, OVERFLOW, NAN, NAN_KEEPS_SIGN, True, r)
    if WIDTH == 16:
        tl.store(out_ptr + idx, h.to(tl.uint16).to(tl.int16, bitcast=True), mask=m)
    else:
        tl.store(out_ptr + idx, h.to(tl.uint8), mask=m)


def _elems_per_program(n: int) -> int:
    if interpreting():
        # Interpreter cost is per program (Philox is ~5 ms a program almost regardless of size):
        # a handful of programs, tiles between 1K and 64K elements.
        per_program = triton.next_power_of_2(triton.cdiv(n, INTERP_MAX_PROGRAMS))
        return min(INTERP_MAX_TILE, max(1024, per_program))
    return 1024


def stochastic_round(x, out, seed, offset):
    """Round contiguous fp32 `x` into the preallocated `out` (bf16/fp16/float8_e4m3fn/
    float8_e5m2, same number of elements) with Philox stream (seed, offset)."""
    n = x.numel()
    if n == 0:
        return
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if out.dtype not in FORMATS:
        raise TypeError(f"out must be one of {', '.join(map(str, FORMATS))}, got {out.dtype}")
    width, mbits, emin, max_finite, overflow, nan, nan_sign = FORMATS[out.dtype]
    out_bits = out.reshape(-1).view(torch.int16 if width == 16 else torch.uint8)
    elems = _elems_per_program(n)
    grid = (triton.cdiv(n, elems),)
    _stochastic_round_kernel[grid](
        x.reshape(-1), out_bits, n, int(seed), int(offset),
        WIDTH=width, MBITS=mbits, EMIN=emin, MAX_FINITE=max_finite, OVERFLOW=overflow, NAN=nan,
        NAN_KEEPS_SIGN=nan_sign, ELEMS=elems, num_warps=4, **LAUNCH_OPTS)


@triton.jit
def _philox_words_kernel(out_ptr, n, seed, counter0, WORDS: tl.constexpr, ELEMS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * ELEMS + tl.arange(0, ELEMS).to(tl.int64)
    m = idx < n
    r0, r1, r2, r3 = tl.randint4x(seed, counter0 + idx)  # philox.h's layout for an int64 counter
    tl.store(out_ptr + idx, r0.to(tl.int32, bitcast=True), mask=m)
    if WORDS > 1:
        tl.store(out_ptr + n + idx, r1.to(tl.int32, bitcast=True), mask=m)
    if WORDS > 2:
        tl.store(out_ptr + 2 * n + idx, r2.to(tl.int32, bitcast=True), mask=m)
    if WORDS > 3:
        tl.store(out_ptr + 3 * n + idx, r3.to(tl.int32, bitcast=True), mask=m)


def philox_words(out, seed, counter0):
    """lowbit.ops.philox_words: out int32 [words, n] (contiguous), seed an unsigned 64-bit int."""
    words, n = out.shape
    elems = _elems_per_program(n)
    _philox_words_kernel[(triton.cdiv(n, elems),)](
        out, n, int(seed), int(counter0), WORDS=words, ELEMS=elems, num_warps=4, **LAUNCH_OPTS)
