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
