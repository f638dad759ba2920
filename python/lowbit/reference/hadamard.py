"""Block Hadamard rotation: the normalized Walsh–Hadamard transform over blocks of the last dim.

Each block of `block` consecutive elements (block a power of two dividing the last dimension) is
multiplied by H_b / sqrt(b), H_b the Sylvester matrix (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]).
That matrix is symmetric and orthogonal, so the transform is its own inverse and preserves norms;
rotating both operands of a matmul over their shared inner dimension leaves the product unchanged
while spreading outliers across the block, which is why low-precision training uses it.

Computed by the O(n log n) butterfly: log2(b) stages of (a, c) -> (a + c, a - c) over pairs at
distance h = 1, 2, 4, ..., then one multiplication by 1/sqrt(b) (exact when log2(b) is even).
fp32 arithmetic for bf16/fp16/fp32 inputs, fp64 for fp64; the result has the input's dtype, a
NaN the canonical one (inf - inf, say, gives x86's negative NaN).
"""
import math

import torch

from .lowprec import canonical_nan, cast_from_f32, check_float


def check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 \
            or block & (block - 1):
        raise ValueError(f"hadamard block must be a power of two (1, 2, 4, ...), got {block!r}")
    return block


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """x with every length-`block` segment of its last dimension rotated by H_block / sqrt(block)."""
    check_float("x", x)
    check_block(block)
    n = x.shape[-1] if x.dim() else 1
    if n % block:
        raise ValueError(f"the last dimension of x ({n}) must be a multiple of the hadamard "
                         f"block ({block})")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work).reshape(-1, n // block, block)
    h = 1
    while h < block:
        pairs = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, c = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + c, a - c), dim=3).reshape(y.shape)
        h *= 2
    y = canonical_nan(y * (1.0 / math.sqrt(block)))
    return cast_from_f32(y.reshape(x.shape), x.dtype)


def hadamard_matrix(block: int, dtype=torch.float64) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix H_block / sqrt(block), built by Kronecker products
    (the explicit form the butterfly is tested against)."""
    check_block(block)
    h = torch.ones(1, 1, dtype=dtype)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype)
    while h.shape[0] < block:
        h = torch.kron(h2, h)
    return h / math.sqrt(block)


def rotated_fake_quant(x: torch.Tensor, spec, block: int, seed: int = 0,
                       offset: int = 0) -> torch.Tensor:
    """H(fake_quant(H(x))) with H the normalized block-`block` Hadamard transform of the last
    dimension, computed in fp32 throughout and cast to x's dtype once at the end (what a fused
    rotate-quantize-dequantize-rotate kernel does). The quantizer sees the rotated values; its
    stochastic stream indexes them row-major like x. With block == 0: fake_quant(x) itself."""
    from .lowprec import dequantize, fake_quant, quantize
    check_float("x", x)
    if not block:
        return fake_quant(x, spec, seed, offset)
    y = block_hadamard(x.to(torch.float32), block)
    z = dequantize(quantize(y, spec, seed, offset), spec, torch.float32)
    return cast_from_f32(block_hadamard(z, block), x.dtype)
