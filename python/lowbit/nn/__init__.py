"""lowbit.nn: low-precision (INT8/INT4/FP8/FP4) linear layers for simulated low-precision training.
Reference implementation only so far: quantizers are lowbit.reference.lowprec, in plain PyTorch."""
from .config import FP4, FP8, INT4, NONE, PRESETS, LinearQuantConfig, TensorQuant
from .convert import convert
from .linear import QuantLinear

__all__ = ["QuantLinear", "convert", "LinearQuantConfig", "TensorQuant", "INT4", "FP8", "FP4",
           "NONE", "PRESETS"]
