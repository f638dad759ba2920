"""Adapter for the pybind11 modules that take raw pointers: lowbit._C (CPU), lowbit._C_cuda
(CUDA) and lowbit._C_sim (the CUDA kernels run on the CPU, test-only)."""
import functools

import torch

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2,
              torch.float8_e4m3fn: 3, torch.float8_e5m2: 4}


class NativeBackend:
    def __init__(self, module, needs_stream: bool):
        self.module = module
        self.needs_stream = needs_stream

    def _stream(self, t: torch.Tensor):
        # CUDA launches go to torch's current stream of the tensor's device.
        if not self.needs_stream:
            return ()
        return (t.device.index or 0, torch.cuda.current_stream(t.device).cuda_stream)

    def quantize_blockwise(self, x, code, mids, block_size, stochastic, seed, offset, codes,
                           absmax):
        self.module.quantize_blockwise(
            x.data_ptr(), DTYPE_CODE[x.dtype], x.numel(), block_size, code.data_ptr(),
            mids.data_ptr(), code.numel(), codes.data_ptr(), absmax.data_ptr(), stochastic,
            seed, offset, *self._stream(x))

    def dequantize_blockwise(self, codes, absmax, code, block_size, n, out):
        self.module.dequantize_blockwise(
            codes.data_ptr(), absmax.data_ptr(), code.data_ptr(), code.numel(), n, block_size,
            out.data_ptr(), DTYPE_CODE[out.dtype], *self._stream(out))

    def stochastic_round(self, x, out, seed, offset):
        self.module.stochastic_round(x.data_ptr(), x.numel(), out.data_ptr(),
                                     DTYPE_CODE[out.dtype], seed, offset, *self._stream(x))

    def philox_words(self, out, seed, counter0):
        self.module.philox_words(out.data_ptr(), out.shape[1], out.shape[0], seed, counter0,
                                 *self._stream(out))

    def lowprec(self, x, fmt, scaling, block_size, e8m0, stochastic, seed, offset, had_block,
                codes, scales, out):
        """lowbit.ops' lowprec contract. The module also gets `absmax`: zeroed fp32 scratch
        holding one float per scale group (laid out like `scales`), for kernels that reduce a
        group's absmax in a pass of their own (column and tensor scaling) — with atomic maxima on
        the bit patterns of |x| (non-negative floats order like their bits; NaN above inf)."""
        rows, cols = x.shape
        groups = 0 if scales is None else scales.numel()
        absmax = torch.zeros(max(groups, 1), dtype=torch.float32, device=x.device)
        self.module.lowprec(
            x.data_ptr(), DTYPE_CODE[x.dtype], rows, cols, fmt, scaling, block_size, e8m0,
            stochastic, seed, offset, had_block, 0 if codes is None else codes.data_ptr(),
            0 if scales is None else scales.data_ptr(), 0 if out is None else out.data_ptr(),
            absmax.data_ptr(), *self._stream(x))

    def optim_step(self, params, grads, state1, absmax1, state2, absmax2, comps, keys, kind,
                   state_bits, block_size, scalars, flags, writeback, v_cols=(), v_colmax=(),
                   clip=None, clipped=None, rms=None, hess=()):
        from ..reference import optim as ref
        ptrs = lambda ts: [t.data_ptr() for t in ts]  # noqa: E731
        block, ncode = 0, 0
        # The kernels read the code / mids tables from the params' memory (device, for CUDA).
        tables = _state_tables(state_bits, params[0].device, kind in ref.SIGNED_SECOND)
        if state_bits != 32:
            block = block_size or ref.STATE_FORMATS[state_bits][2]
            ncode = tables[0].numel()
        # (scratch stays referenced until the module returns)
        v_cols, colmax_ptrs, scratch_ptrs, scratch = _rank1_lists(params, v_cols, v_colmax)
        self.module.optim_step(
            ref.KINDS[kind], ptrs(params), ptrs(grads), [p.numel() for p in params],
            ptrs(state1), ptrs(absmax1), ptrs(state2), ptrs(absmax2), ptrs(comps), list(keys),
            state_bits, block, *[t.data_ptr() for t in tables], ncode, DTYPE_CODE[params[0].dtype],
            ref.WRITEBACK[writeback], list(scalars), flags,
            0 if clip is None else clip.data_ptr(), 0 if clipped is None else clipped.data_ptr(),
            0 if rms is None else rms.data_ptr(),
            v_cols, colmax_ptrs, scratch_ptrs, ptrs(hess),
            *self._stream(params[0]))

    def grad_stats(self, grads, out, xform=None, cv=0.0, flags=0, tau=None, over=None,
                   over_count=None):
        if not hasattr(self.module, "grad_stats"):  # a module built without the kernel
            from . import reference
            return reference.grad_stats(grads, out, xform, cv, flags, tau, over, over_count)
        # the kernels take one dtype per call
        for dtype in {g.dtype for g in grads}:
            idx = [i for i, g in enumerate(grads) if g.dtype == dtype]
            whole = len(idx) == len(grads)
            pick = lambda t: t if whole or t is None else t[idx].contiguous()  # noqa: E731
            part = out if whole else out.new_empty((len(idx), out.shape[1]))
            xf, tau_p, over_p, count_p = pick(xform), pick(tau), pick(over), pick(over_count)
            numel = [grads[i].numel() for i in idx]
            capture = (0, 0, 0, 0) if tau is None else (
                tau_p.data_ptr(), over_p.data_ptr(), count_p.data_ptr(), over.shape[1])
            # Held until the call returns (the sim reads it synchronously); on a GPU torch's
            # allocator hands its memory out again only to work queued after the launches on
            # this stream, so dropping it then is safe.
            workspace = self._stats_workspace(numel, out.device)
            extra = () if workspace is None else (workspace.data_ptr(), 8 * workspace.numel())
            self.module.grad_stats([grads[i].data_ptr() for i in idx], numel, DTYPE_CODE[dtype],
                                   0 if xf is None else xf.data_ptr(), cv, flags,
                                   part.data_ptr(), *capture, *extra, *self._stream(out))
            if part is not out:
                out[idx] = part
            if tau is not None and not whole:
                over[idx] = over_p
                over_count[idx] = count_p

    def _stats_workspace(self, numel, device):
        """Scratch memory on `device` for the per-block partials of the CUDA statistics kernels
        (csrc/cuda/stats.cu; float64 elements: the partials hold doubles and 64-bit counts), or
        None for the CPU module, which needs none."""
        if not hasattr(self.module, "grad_stats_workspace"):
            return None
        nbytes = self.module.grad_stats_workspace(numel)
        return torch.empty(max(1, -(-nbytes // 8)), dtype=torch.float64, device=device)


def _rank1_lists(params, v_cols, v_colmax):
    """(v_cols, column-maxima pointers, scratch pointers, scratch) for the module: empty lists
    when no tensor has a rank-1 second state; else one entry each, with R + C floats of scratch
    per rank-1 tensor carved from one buffer on the params' device. (Freeing the buffer while CUDA
    kernels that use it are still queued is safe: torch's caching allocator reuses the memory
    only for later work on the same stream, the one the kernels run on.)"""
    v_cols = [int(c) for c in v_cols]
    if not any(v_cols):
        return [], [], [], None
    sizes = [p.numel() // c + c if c else 0 for p, c in zip(params, v_cols)]
    device = params[0].device
    scratch = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    base, offsets, off = scratch.data_ptr(), [], 0
    for size in sizes:
        offsets.append(base + 4 * off if size else 0)
        off += size
    colmax = [t.data_ptr() if c else 0 for t, c in zip(v_colmax, v_cols)]
    return v_cols, colmax, offsets, scratch


@functools.lru_cache(maxsize=None)
def _state_tables(state_bits: int, device: torch.device, signed_second: bool = False):
    """(code1, mids1, code2, mids2) fp32 tables of a quantized state format on `device` (one
    placeholder for 32-bit states, whose kernels never read them); made once per format.
    signed_second: the second state takes the first's (signed) codebook (Sophia)."""
    from ..codebooks import codebook
    from ..reference.optim import STATE_FORMATS
    from ..reference.quant import midpoints
    if state_bits == 32:
        return (torch.zeros(1, device=device),) * 4
    first, second, _ = STATE_FORMATS[state_bits]
    c1, c2 = codebook(first), codebook(first if signed_second else second)
    return tuple(t.to(device).contiguous() for t in (c1, midpoints(c1), c2, midpoints(c2)))
