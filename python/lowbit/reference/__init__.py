"""Pure-PyTorch implementations of every lowbit op: the specification each backend is tested
against. Written for readability, not speed; bit-level rules mirror csrc/include/lowbit/*.h."""
from .philox import philox_word0
from .rounding import round_to_format, stochastic_round
from .quant import quantize_blockwise, dequantize_blockwise

__all__ = ["philox_word0", "round_to_format", "stochastic_round", "quantize_blockwise",
           "dequantize_blockwise"]
