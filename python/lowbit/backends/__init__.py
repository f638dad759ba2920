"""Per-backend adapters behind lowbit.ops. Every backend exposes the same three functions:

  quantize_blockwise(x, code, mids, block_size, stochastic, seed, offset, codes, absmax)
  dequantize_blockwise(codes, absmax, code, block_size, n, out)
  stochastic_round(x, out, seed, offset)

writing into the preallocated outputs. Inputs arrive validated and contiguous (lowbit.ops)."""
