"""The gradient-statistics pass (lowbit::grad_stats) in Triton. Spec:
lowbit.reference.clip.grad_stats; the clip transform is _common.clip_transform (clip_math.h).

Per tensor: [sum of squares of the finite elements, number of inf/NaN elements of the raw
gradient, largest finite |element|, number of NaN elements of the raw gradient], the sum and the
maximum after the optional clip transform. Squares are taken in float64 (the fp32 value is
widened first, so each square is exact) and added in float64; counts and maxima are exact.

Two launches per dtype of the call, no atomics for the statistics, so they are the same bits on
every run:
  _stats_kernel    one program per work item (TILE consecutive elements of one tensor, found
                   through a work table of (tensor, first element, partial slot)), which writes
                   its partial (float64 sum, two int64 counts, max |x| as int32 bits) to its own
                   slot; tensors of every dtype share one slot buffer, numbered in tensor order
  _combine_kernel  one program per tensor, which adds the tensor's slots in a fixed order
The flags are constexprs, so an untransformed pass carries no transform code. bf16/fp16 grads are
read as int16 bits and widened exactly (load_as_f32), as everywhere in these kernels.

The capture (tau given; lowbit.reference.clip) is the constexpr CAPTURE of _stats_kernel: each
finite element with |g| > tau[t] takes a slot from an atomic add on over_count[t] and stores |g|
in over[t, slot] if the slot is below the capacity. The contract fixes the count and, within the
capacity, the stored set, not their order in the row, so the order in which the atomics hand out
slots may vary between runs.
"""
import torch
import triton
import triton.language as tl

from ._common import (INTERP_MAX_PROGRAMS, INTERP_MAX_TILE, KINDS, LAUNCH_OPTS, clip_transform,
                      interpreting, load_as_f32, quiet_fp_warnings)
from ..reference import clip as clip_ref

# Elements per program on a GPU (16 per thread at 8 warps); the interpreter's tiles are sized by
# _tile.
GPU_TILE = 4096
# Partials the combine adds per loop iteration.
COMBINE_BLOCK = 128


@triton.jit
def _capture(ra, finite, t, tau_ptr, over_ptr, count_ptr, capacity, TILE: tl.constexpr):
    """Count the lanes with finite |g| > tau[t] into count[t] and store |g| (ra: its bits) of those
    whose slot (count[t] before their increment) is below the capacity in over[t, slot]."""
    a = ra.to(tl.float32, bitcast=True)
    # a float compare, as the reference's `a > tau` (NaN tau: nothing captured)
    above = finite & (a > tl.load(tau_ptr + t))
    # one counter address per lane (a block, not a scalar pointer, so the mask, value and pointer
    # shapes agree in every Triton version); the add returns each lane's old value, distinct
    # among the lanes that add. Relaxed: only the counter's value is used, no other memory.
    cnt = count_ptr + t + tl.zeros([TILE], dtype=tl.int64)
    slot = tl.atomic_add(cnt, tl.full([TILE], 1, tl.int64), mask=above, sem="relaxed")
    keep = above & (slot < capacity)
    tl.store(over_ptr + t * capacity + slot, a, mask=keep)


@triton.jit
def _stats_kernel(work_ptr, tab_ptr, cv_ptr, psum_ptr, pcnt_ptr, pmax_ptr, tau_ptr, over_ptr,
                  count_ptr, capacity, TILE: tl.constexpr, G_KIND: tl.constexpr,
                  VALUE_CLIP: tl.constexpr, TENSOR_SCALE: tl.constexpr, ADA_CLIP: tl.constexpr,
                  NORM_SCALE: tl.constexpr, CAPTURE: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)
    t = tl.load(work_ptr + 3 * w)
    start = tl.load(work_ptr + 3 * w + 1)
    slot = tl.load(work_ptr + 3 * w + 2)
    # tensor table row: grad address, element count, clip row address (int64 each)
    row = tab_ptr + 3 * t
    addr = tl.load(row)
    n = tl.load(row + 1)
    if G_KIND == 0:
        g_ptr = addr.to(tl.pointer_type(tl.float32))
    else:
        g_ptr = addr.to(tl.pointer_type(tl.int16))
    idx = start + tl.arange(0, TILE).to(tl.int64)
    msk = idx < n
    raw = load_as_f32(g_ptr, idx, msk, G_KIND)
    ra = raw.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    finite = msk & (ra < 0x7F800000)
    bad = msk & (ra >= 0x7F800000)
    nan = msk & (ra > 0x7F800000)
    if CAPTURE:  # (tau_ptr, over_ptr, count_ptr, capacity: placeholders otherwise)
        _capture(ra, finite, t, tau_ptr, over_ptr, count_ptr, capacity, TILE)
    x = raw
    if VALUE_CLIP or TENSOR_SCALE or ADA_CLIP or NORM_SCALE:
        ct_ptr = cv_ptr  # placeholder: read only by the per-tensor steps
        if TENSOR_SCALE or ADA_CLIP or NORM_SCALE:
            ct_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        x, _ = clip_transform(raw, ct_ptr, cv_ptr, VALUE_CLIP, TENSOR_SCALE, ADA_CLIP,
                              NORM_SCALE)
    # |x| as bits: for non-negative floats the integer order is the numeric order
    a = tl.where(finite, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
    d = tl.where(finite, x, 0.0).to(tl.float64)
    tl.store(psum_ptr + slot, tl.sum(d * d, axis=0))
    tl.store(pcnt_ptr + 2 * slot, tl.sum(bad.to(tl.int64), axis=0))
    tl.store(pcnt_ptr + 2 * slot + 1, tl.sum(nan.to(tl.int64), axis=0))
    tl.store(pmax_ptr + slot, tl.max(a, axis=0))


@triton.jit
def _combine_kernel(first_ptr, psum_ptr, pcnt_ptr, pmax_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[t] from slots first[t] .. first[t + 1] - 1: lane j of the accumulators takes slots j,
    j + BLOCK, ... in order, then one tree reduction; zeros for a tensor without slots."""
    t = tl.program_id(0).to(tl.int64)
    lo = tl.load(first_ptr + t)
    hi = tl.load(first_ptr + t + 1)
    s = tl.zeros([BLOCK], dtype=tl.float64)
    bad = tl.zeros([BLOCK], dtype=tl.int64)
    nan = tl.zeros([BLOCK], dtype=tl.int64)
    mx = tl.zeros([BLOCK], dtype=tl.int32)
    for base in range(lo, hi, BLOCK):
        j = base + tl.arange(0, BLOCK).to(tl.int64)
        m = j < hi
        s += tl.load(psum_ptr + j, mask=m, other=0.0)
        bad += tl.load(pcnt_ptr + 2 * j, mask=m, other=0)
        nan += tl.load(pcnt_ptr + 2 * j + 1, mask=m, other=0)
        mx = tl.maximum(mx, tl.load(pmax_ptr + j, mask=m, other=0))
    o = out_ptr + 4 * t
    tl.store(o, tl.sum(s, axis=0))
    tl.store(o + 1, tl.sum(bad, axis=0).to(tl.float64))
    tl.store(o + 2, tl.max(mx, axis=0).to(tl.float32, bitcast=True).to(tl.float64))
    tl.store(o + 3, tl.sum(nan, axis=0).to(tl.float64))


def _tile(sizes) -> int:
    """Elements per work item. GPU: GPU_TILE. Interpreter (cost per program and per op, nearly
    independent of the tile): doubled from 1024 until the work list has at most
    max(INTERP_MAX_PROGRAMS, ntensors) items or the tile reaches INTERP_MAX_TILE."""
    if not interpreting():
        return GPU_TILE
    tile = 1024
    limit = max(INTERP_MAX_PROGRAMS, len(sizes))
    while sum(triton.cdiv(n, tile) for n in sizes) > limit and tile < INTERP_MAX_TILE:
        tile *= 2
    return tile


def _check(grads, out, xform, flags, tau, over, over_count):
    """The contract's argument rules (as csrc/stats_lists.h checks them)."""
    if tau is not None:
        n = len(grads)
        if flags:
            raise ValueError("grad_stats: the capture (tau) works on the raw gradients: flags=0")
        if (over is None or over_count is None or tau.dtype != torch.float32
                or tuple(tau.shape) != (n,) or over.dtype != torch.float32 or over.dim() != 2
                or over.shape[0] != n or not over.is_contiguous()
                or over_count.dtype != torch.int64 or tuple(over_count.shape) != (n,)):
            raise ValueError("grad_stats: tau (fp32 [n]) needs over (contiguous fp32 "
                             "[n, capacity]) and over_count (int64 [n])")
    if flags & ~clip_ref.TRANSFORM_FLAGS:
        raise ValueError(f"grad_stats takes only the clip transform's flags, got {flags}")
    per_tensor = flags & (clip_ref.TENSOR_SCALE | clip_ref.ADA_CLIP | clip_ref.NORM_SCALE)
    if per_tensor and xform is None:
        raise ValueError("the per-tensor transform flags need the per-tensor table")
    if xform is not None and (xform.dtype != torch.float32 or not xform.is_contiguous()
                              or tuple(xform.shape) != (len(grads), clip_ref.NCLIP)):
        raise ValueError(f"xform must be a contiguous float32 [{len(grads)}, {clip_ref.NCLIP}] "
                         "tensor")
    if tuple(out.shape) != (len(grads), clip_ref.NSTATS) or out.dtype != torch.float64:
        raise ValueError(f"out must be float64 [{len(grads)}, {clip_ref.NSTATS}]")
    for g in grads:
        if g.dtype not in KINDS:
            raise TypeError(f"gradients must be float32, bfloat16 or float16, got {g.dtype}")
        if not g.is_contiguous():
            raise ValueError("grad_stats needs contiguous gradients")


def grad_stats(grads, out, xform=None, cv=0.0, flags=0, tau=None, over=None,
               over_count=None) -> None:
    """Per-tensor statistics of `grads` (any mix of fp32/bf16/fp16) into out, float64
    [len(grads), 4] (lowbit.ops.grad_stats's contract); xform: fp32 [len(grads), 4] rows
    (s, thr, r, k) on the grads' device, needed with the per-tensor flags; cv: VALUE_CLIP's
    bound. tau / over / over_count (fp32 [n], fp32 [n, capacity], int64 [n], flags 0): the
    capture; over_count is added to (the caller zeroes it), over written in place."""
    if not grads:
        return
    _check(grads, out, xform, flags, tau, over, over_count)
    device = out.device
    sizes = [g.numel() for g in grads]
    tile = _tile(sizes)
    nitems = [triton.cdiv(n, tile) for n in sizes]
    first = [0]
    for k in nitems:
        first.append(first[-1] + k)
    nslots = max(first[-1], 1)  # at least one element: every kernel argument must be a buffer
    psum = torch.empty(nslots, dtype=torch.float64, device=device)
    pcnt = torch.empty(2 * nslots, dtype=torch.int64, device=device)
    pmax = torch.empty(nslots, dtype=torch.int32, device=device)
    cv_t = torch.tensor([cv], dtype=torch.float32, device=device)
    tab = torch.tensor([[g.data_ptr(), g.numel(), 0 if xform is None else xform[i].data_ptr()]
                        for i, g in enumerate(grads)], dtype=torch.int64, device=device)
    constexprs = {name: bool(flags & bit) for name, bit in (
        ("VALUE_CLIP", clip_ref.VALUE_CLIP), ("TENSOR_SCALE", clip_ref.TENSOR_SCALE),
        ("ADA_CLIP", clip_ref.ADA_CLIP), ("NORM_SCALE", clip_ref.NORM_SCALE))}
    capture = tau is not None
    if capture:
        tau_t = tau.contiguous()
        # the kernel adds to count[t] in place: a strided over_count goes through a copy
        count_t = over_count if over_count.is_contiguous() else over_count.contiguous()
        # a zero-capacity row has no storage the kernel could address; it never stores into it
        over_t = over if over.numel() else cv_t
        cap_args = (tau_t, over_t, count_t, over.shape[1])
    else:  # placeholders, never read (CAPTURE=False compiles the capture out)
        cap_args = (cv_t, cv_t, pcnt, 0)
    with quiet_fp_warnings():
        for dtype in sorted({g.dtype for g in grads}, key=KINDS.get):
            work = [(i, k * tile, first[i] + k) for i, g in enumerate(grads) if g.dtype == dtype
                    for k in range(nitems[i])]
            if not work:  # only empty tensors of this dtype
                continue
            work_t = torch.tensor(work, dtype=torch.int64, device=device)
            _stats_kernel[(len(work),)](work_t, tab, cv_t, psum, pcnt, pmax, *cap_args,
                                        TILE=tile, G_KIND=KINDS[dtype],
                                        num_warps=8 if tile >= 4096 else 4, CAPTURE=capture,
                                        **constexprs, **LAUNCH_OPTS)
        first_t = torch.tensor(first, dtype=torch.int64, device=device)
        _combine_kernel[(len(grads),)](first_t, psum, pcnt, pmax, out, BLOCK=COMBINE_BLOCK,
                                       num_warps=4, **LAUNCH_OPTS)
    if capture and count_t is not over_count:
        over_count.copy_(count_t)
