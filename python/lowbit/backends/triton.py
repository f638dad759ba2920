"""Adapter for the Triton kernels (lowbit.triton_kernels); imported only when used."""
from ..triton_kernels import lowprec as _lowprec
from ..triton_kernels import optim as _optim
from ..triton_kernels import quant as _quant
from ..triton_kernels import rounding as _rounding
from ..triton_kernels import stats as _stats

quantize_blockwise = _quant.quantize_blockwise
dequantize_blockwise = _quant.dequantize_blockwise
stochastic_round = _rounding.stochastic_round
philox_words = _rounding.philox_words
optim_step = _optim.optim_step
grad_stats = _stats.grad_stats
lowprec = _lowprec.lowprec
