"""Adapter for the pybind11 modules that take raw pointers: lowbit._C (CPU), lowbit._C_cuda
(CUDA) and lowbit._C_sim (the CUDA kernels run on the CPU, test-only)."""
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

    def adam_step(self, params, grads, m, m_absmax, v, v_absmax, state_bits, scalars, maximize):
        from ..reference.optim import STATE_FORMATS
        from ..codebooks import codebook
        from ..reference.quant import midpoints
        ptrs = lambda ts: [t.data_ptr() for t in ts]  # noqa: E731
        if state_bits == 32:
            block, tables = 0, (torch.zeros(1),) * 4
            ncode = 0
        else:
            m_name, v_name, block = STATE_FORMATS[state_bits]
            m_code, v_code = codebook(m_name), codebook(v_name)
            tables = (m_code, midpoints(m_code), v_code, midpoints(v_code))
            ncode = m_code.numel()
        # The kernels read the code / mids tables from the params' memory (device, for CUDA).
        tables = [t.to(params[0].device) for t in tables]
        self.module.adam_step(ptrs(params), ptrs(grads), [p.numel() for p in params], ptrs(m),
                              ptrs(m_absmax), ptrs(v), ptrs(v_absmax), state_bits, block,
                              *[t.data_ptr() for t in tables], ncode, list(scalars), maximize,
                              *self._stream(params[0]))
