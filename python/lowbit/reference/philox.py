"""Philox4x32-10 (word 0, or all four words) for a batch of counters, in int64 torch arithmetic.

Key = (lo32(seed), hi32(seed)), counter = (lo32(i), hi32(i), 0, 0) — the layout of Triton's
tl.randint and of csrc/include/lowbit/philox.h. Every uint32 lives in an int64 tensor; products
of two uint32 would overflow int64, so they are split into 16-bit halves.
"""
import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(a: torch.Tensor, b: int):
    """(a*b) >> 32 and (a*b) & 0xFFFFFFFF for uint32 values a (int64 tensor) and constant b."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi, p_lo = a_hi * b, a_lo * b          # each < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox_word0(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """Word 0 of Philox4x32-10 for each int64 counter; returns uint32 values in an int64 tensor."""
    return philox4(seed, counters)[0]


def philox_word_of(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The optimizer write-back's and the lowprec quantizers' stream: element i takes word
    i % 4 of counter i // 4."""
    index = index.to(torch.int64)
    words = torch.stack(philox4(seed, index >> 2))
    return words.gather(0, (index & 3).unsqueeze(0)).squeeze(0)


def philox4(seed: int, counters: torch.Tensor):
    """The four words of Philox4x32-10 for each int64 counter (uint32 values in int64 tensors)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    counters = counters.to(torch.int64)
    c0 = counters & _M32
    c1 = (counters >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uniform24(r: torch.Tensor) -> torch.Tensor:
    """24-bit uniform in [0, 1) from a Philox word, exact in fp32."""
    return (r >> 8).to(torch.float32) * 2.0**-24
