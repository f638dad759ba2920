"""The pure-PyTorch reference as a backend (any device; computes on the CPU)."""
import torch

from .. import reference as ref


def quantize_blockwise(x, code, mids, block_size, stochastic, seed, offset, codes, absmax):
    c, a = ref.quantize_blockwise(x.cpu(), code.cpu(), block_size, stochastic, seed, offset)
    codes.copy_(c.reshape(codes.shape))
    absmax.copy_(a)


def dequantize_blockwise(codes, absmax, code, block_size, n, out):
    out.copy_(ref.dequantize_blockwise(codes.cpu(), absmax.cpu(), code.cpu(), block_size,
                                       out.shape, out.dtype))


def stochastic_round(x, out, seed, offset):
    out.copy_(ref.stochastic_round(x.cpu(), out.dtype, seed, offset))


def philox_words(out, seed, counter0):
    from ..reference.philox import philox4
    words = philox4(seed, counter0 + torch.arange(out.shape[1], dtype=torch.int64))
    for w in range(out.shape[0]):
        v = words[w]  # uint32 values in int64: their bits as int32
        out[w].copy_(torch.where(v >= 2**31, v - 2**32, v).to(torch.int32))


def optim_step(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind, state_bits,
               block_size, scalars, flags, writeback, v_cols=(), v_colmax=(), clip=None,
               clipped=None, rms=None, hess=()):
    from ..reference import optim
    optim.fused_step(kind, params, grads, state1, absmax1, state2, absmax2, comps, keys,
                     state_bits, block_size, scalars, flags, writeback, v_cols, v_colmax, clip,
                     clipped, rms, hess)


def grad_stats(grads, out, xform=None, cv=0.0, flags=0, tau=None, over=None, over_count=None):
    from ..reference import clip
    out.copy_(clip.grad_stats(grads, None if xform is None else xform.cpu(), cv, flags, tau,
                              over, over_count))


def lowprec(x, fmt, scaling, block_size, e8m0, stochastic, seed, offset, had_block, codes,
            scales, out):
    """The kernel contract of lowbit.ops.lowprec_* (see there), computed by the reference."""
    from ..reference import hadamard, lowprec as lp
    xc = x.cpu()
    if fmt < 0:
        out.copy_(hadamard.block_hadamard(xc, had_block))
        return
    spec = lp.QuantSpec(lp.FORMATS[fmt], lp.SCALINGS[scaling], block_size,
                        "e8m0" if e8m0 else "fp32", "stochastic" if stochastic else "nearest")
    y = hadamard.block_hadamard(xc.to(torch.float32), had_block) if had_block else xc
    q = lp.quantize(y, spec, seed, offset)
    if codes is not None:
        codes.copy_(q.codes.view(torch.uint8).reshape(codes.shape))
    scales.copy_(q.scales.reshape(scales.shape))
    if out is not None:
        z = lp.dequantize(q, spec, torch.float32)
        out.copy_(hadamard.block_hadamard(z, had_block) if had_block else z)
