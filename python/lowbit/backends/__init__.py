"""Per-backend adapters behind lowbit.ops. Every backend exposes the same functions:

  quantize_blockwise(x, code, mids, block_size, stochastic, seed, offset, codes, absmax)
  dequantize_blockwise(codes, absmax, code, block_size, n, out)
  stochastic_round(x, out, seed, offset)
  philox_words(out, seed, counter0)          (seed as an unsigned 64-bit int)
  optim_step(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind, state_bits,
             block_size, scalars, flags, writeback, v_cols=(), v_colmax=(), clip=None,
             clipped=None, rms=None, hess=())
  grad_stats(grads, out, xform=None, cv=0.0, flags=0, tau=None, over=None, over_count=None)

writing into the preallocated outputs. Inputs arrive validated and contiguous (lowbit.ops)."""
