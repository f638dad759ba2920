"""Block-wise quantization: QuantState, quantize_blockwise, dequantize_blockwise.

Layout (DESIGN.md contract 3): the input is flattened row-major and cut into blocks of
`block_size` elements (the last one may be partial); each block stores absmax (float32) and one
code per element: uint8 in the input's shape for 256-entry codebooks, or two 4-bit codes per byte
in a flat buffer of ceil(n/2) bytes for 16-entry codebooks — element 2j in the HIGH nibble,
element 2j+1 in the low nibble, as bitsandbytes packs them; an odd tail leaves a 0 low nibble.
Rounding rules (identical on every backend) are in csrc/include/lowbit/quant.h.
"""
from dataclasses import dataclass

import torch

from . import _validate, ops
from .codebooks import resolve
from .reference.quant import midpoints

BLOCK_SIZES = tuple(2**k for k in range(5, 13))  # 32 .. 4096


@dataclass
class QuantState:
    """A quantized tensor: plain tensors plus metadata, so it pickles without lowbit classes."""
    codes: torch.Tensor      # uint8: x's shape (8-bit) or flat ceil(n/2) bytes (4-bit)
    absmax: torch.Tensor     # float32[ceil(n / block_size)]
    code: str | torch.Tensor # codebook name, or the user's codebook tensor
    block_size: int
    shape: torch.Size
    dtype: torch.dtype       # dtype of the quantized input; dequantize returns it by default

    @property
    def codebook(self) -> torch.Tensor:
        return resolve(self.code)[1]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def bits(self) -> int:
        return 4 if self.codebook.numel() == 16 else 8

    def validate(self) -> None:
        """Raises ValueError naming the field that does not fit the others."""
        book = self.codebook
        check_block_size(self.block_size)
        n = self.numel
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"QuantState.codes must be uint8, got {self.codes.dtype}")
        want_codes = (n + 1) // 2 if book.numel() == 16 else n
        if self.codes.numel() != want_codes:
            raise ValueError(f"QuantState.codes has {self.codes.numel()} elements but shape "
                             f"{tuple(self.shape)} with a {book.numel()}-entry codebook needs "
                             f"{want_codes}")
        nblocks = -(-n // self.block_size)
        if self.absmax.dtype != torch.float32 or self.absmax.numel() != nblocks:
            raise ValueError(f"QuantState.absmax must be float32 with {nblocks} entries (one per "
                             f"block of {self.block_size}); got {self.absmax.dtype} with "
                             f"{self.absmax.numel()} — was it saved with another block_size?")
        if self.absmax.device != self.codes.device:
            raise ValueError(f"QuantState.absmax is on {self.absmax.device} but codes are on "
                             f"{self.codes.device}; move both with .to(device)")

    def to(self, device) -> "QuantState":
        return QuantState(self.codes.to(device), self.absmax.to(device), self.code,
                          self.block_size, self.shape, self.dtype)


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or \
            block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be a power of two from 32 to 4096, got {block_size!r}")
    return block_size


def _device_book(book: torch.Tensor, device: torch.device):
    return book.to(device), midpoints(book).to(device)


def quantize_blockwise(x: torch.Tensor, code="dynamic", block_size: int = 256, *,
                       stochastic: bool = False, seed: int | None = None,
                       backend: str | None = None) -> QuantState:
    """Quantize `x` (fp32/bf16/fp16, any shape, any layout) block-wise with codebook `code` (a
    name from lowbit.codebooks.NAMES or a sorted float32 tensor of 16 or 256 values).

    stochastic=True rounds each value to one of its two neighbouring codes with probability
    proportional to closeness (unbiased), using the Philox stream keyed by `seed` (None: drawn
    from torch's default generator) and counted by element index. Non-contiguous inputs give the
    codes of their contiguous copy. A block holding NaN/Inf gets a non-finite absmax and so
    dequantizes to non-finite values (never to made-up finite numbers)."""
    _validate.float_tensor("x", x)
    check_block_size(block_size)
    name, book = resolve(code)
    seed_v = _validate.seed_value(seed) if stochastic else 0
    be = ops.resolve_backend(backend, x.device)
    code_d, mids_d = _device_book(book, x.device)
    xc = x.detach().contiguous()
    codes, absmax = ops.quantize_blockwise(xc, code_d, mids_d, block_size, bool(stochastic),
                                           seed_v, 0, be)
    return QuantState(codes, absmax, name if name is not None else book, block_size, x.shape,
                      x.dtype)


def dequantize_blockwise(qs: QuantState, *, dtype: torch.dtype | None = None,
                         out: torch.Tensor | None = None,
                         backend: str | None = None) -> torch.Tensor:
    """code[c] * absmax[block] in fp32, cast to `dtype` (default: the quantized input's dtype)
    with round-to-nearest-even; written into `out` if given (contiguous, qs.shape)."""
    if not isinstance(qs, QuantState):
        raise TypeError(f"qs must be a QuantState, got {type(qs).__name__}")
    qs.validate()
    if out is not None:
        _validate.float_tensor("out", out)
        if dtype is not None and out.dtype != dtype:
            raise ValueError(f"out has dtype {out.dtype} but dtype={dtype} was asked for")
        if tuple(out.shape) != tuple(qs.shape):
            raise ValueError(f"out must have shape {tuple(qs.shape)}, got {tuple(out.shape)}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous; pass out=None and copy the result")
        if out.device != qs.codes.device:
            raise ValueError(f"out is on {out.device} but the QuantState is on "
                             f"{qs.codes.device}")
    else:
        dtype = dtype or qs.dtype
        _validate.float_tensor("dtype", torch.empty(0, dtype=dtype))
        out = torch.empty(qs.shape, dtype=dtype, device=qs.codes.device)
    be = ops.resolve_backend(backend, qs.codes.device)
    code_d = qs.codebook.to(qs.codes.device)
    ops.dequantize_blockwise(qs.codes.contiguous(), qs.absmax.contiguous(), code_d,
                             qs.block_size, qs.numel, out, be)
    return out
