"""lowbit: low-precision training kernels for PyTorch — block-wise quantization, stochastic
rounding, and (as they land) fused 32/8/4-bit optimizers with in-step clipping and curvature
tools. Every op has a CPU C++, a CUDA, a Triton and a pure-PyTorch reference implementation."""
from .clip import clip_grad_norm_
from . import hessian
from .codebooks import NAMES as CODEBOOKS, codebook
from .ops import available_backends
from .quant import QuantState, dequantize_blockwise, quantize_blockwise
from .rounding import stochastic_round

__version__ = "0.1.0"
__all__ = ["CODEBOOKS", "codebook", "QuantState", "quantize_blockwise", "dequantize_blockwise",
           "stochastic_round", "available_backends", "clip_grad_norm_"]
