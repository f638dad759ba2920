"""Scaled low-precision quantizers (INT8/INT4/FP8/FP4) and the block Hadamard rotation, on every
backend: quantize (codes + scales), fake_quant (quantize and dequantize in one pass, optionally
between two Hadamard rotations) and block_hadamard. The rules are lowbit.reference.lowprec's and
lowbit.reference.hadamard's; every kernel backend reproduces them bit for bit.

float64 inputs run on the reference (the kernels read fp32, bf16 and fp16), whose arithmetic is
fp32 for quantization anyway.
"""
import torch

from . import ops
from .reference import hadamard as _ref_hadamard, lowprec as _ref
from .reference.lowprec import Quantized, QuantSpec, check_float

# Rotation blocks the kernels hold in fast memory at once (one row segment per program).
MAX_HADAMARD_BLOCK = 4096
_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _check_spec(spec) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a lowbit.reference.lowprec.QuantSpec (or a "
                        f"lowbit.nn.TensorQuant), got {type(spec).__name__}")
    return spec


def _check_hadamard(block, x: torch.Tensor) -> int:
    if not block:
        return 0
    _ref_hadamard.check_block(block)
    if block > MAX_HADAMARD_BLOCK:
        raise ValueError(f"hadamard block {block} is larger than the kernels' "
                         f"{MAX_HADAMARD_BLOCK}; use a smaller block or backend='reference'")
    n = x.shape[-1] if x.dim() else 1
    if n % block:
        raise ValueError(f"the last dimension of x ({n}) must be a multiple of the hadamard "
                         f"block ({block})")
    return block


def _matrix(x: torch.Tensor) -> torch.Tensor:
    rows, cols = _ref._matrix_shape(x.shape)
    return x.contiguous().view(rows, cols)


def _backend(x: torch.Tensor, backend) -> str:
    if x.dtype == torch.float64:
        return "reference"
    return ops.resolve_backend(backend, x.device)


def _args(spec: QuantSpec, seed: int, offset: int, had_block: int):
    return (_ref.FORMAT_IDS[spec.format], _ref.SCALING_IDS[spec.scaling], spec.block_size,
            spec.scale_format == "e8m0", spec.rounding == "stochastic", int(seed), int(offset),
            had_block)


def _check_stream(seed, offset):
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            raise ValueError(f"{name} must be an int in [0, 2**63), got {v!r}")


def quantize(x: torch.Tensor, spec: QuantSpec, seed: int = 0, offset: int = 0, *,
             hadamard_block: int = 0, backend: str | None = None) -> Quantized:
    """Codes and scales of x (of H(x), rotated by the block-`hadamard_block` Hadamard transform
    of the last dimension, when hadamard_block) under `spec`: lowbit.reference.lowprec.quantize's
    layout — int8 codes for int8/int4, float8 for e4m3/e5m2, uint8 E2M1 patterns for e2m1."""
    check_float("x", x)
    _check_spec(spec)
    _check_stream(seed, offset)
    hb = _check_hadamard(hadamard_block, x)
    name = _backend(x, backend)
    x2 = _matrix(x.float() if x.dtype == torch.float64 else x)   # exact: the rules are fp32
    codes, stored = ops.lowprec_quantize(x2, *_args(spec, seed, offset, hb), name)
    view = _FP8.get(spec.format, torch.int8 if spec.format in ("int8", "int4") else torch.uint8)
    return Quantized(codes.view(view).reshape(x.shape),
                     _ref._scales_shape(stored, x, spec))


def dequantize(q: Quantized, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q's grid values times their group's scales, cast to `dtype` (the reference: a product per
    element; fake_quant is the fused kernel path)."""
    return _ref.dequantize(q, _check_spec(spec), dtype)


def fake_quant(x: torch.Tensor, spec: QuantSpec, seed: int = 0, offset: int = 0, *,
               hadamard_block: int = 0, backend: str | None = None) -> torch.Tensor:
    """x quantized and dequantized in one pass, in x's dtype: the values a low-precision kernel
    would see. With hadamard_block: H(fake_quant(H(x))), fp32 in between, one cast at the end
    (lowbit.reference.hadamard.rotated_fake_quant)."""
    check_float("x", x)
    _check_spec(spec)
    _check_stream(seed, offset)
    hb = _check_hadamard(hadamard_block, x)
    name = _backend(x, backend)
    if x.dtype == torch.float64:
        return _ref_hadamard.rotated_fake_quant(x, spec, hb, seed, offset)
    out = ops.lowprec_fake_quant(_matrix(x), *_args(spec, seed, offset, hb), name)
    return out.view(x.shape)


def block_hadamard(x: torch.Tensor, block: int, *, backend: str | None = None) -> torch.Tensor:
    """x with every length-`block` segment of its last dimension multiplied by H_block /
    sqrt(block) (fp32 arithmetic, result in x's dtype; its own inverse)."""
    check_float("x", x)
    _ref_hadamard.check_block(block)
    _check_hadamard(block, x)
    name = _backend(x, backend)
    if x.dtype == torch.float64:
        return _ref_hadamard.block_hadamard(x, block)
    out = ops.lowprec_fake_quant(_matrix(x), -1, 0, 1, False, False, 0, 0, block, name)
    return out.view(x.shape)
