"""Stochastic rounding of fp32 tensors into bf16, fp16, float8_e4m3fn and float8_e5m2.

The Philox stream contract (DESIGN.md contract 2), shared with every other random op:
Philox4x32-10 with key = (lo32(seed), hi32(seed)) and counter = (lo32(i), hi32(i), 0, 0) where
i = offset + the element's row-major index; word 0 is used — exactly Triton's
tl.randint(seed, offset + index). Element i rounds away from zero iff (word >> 8) is below the
fraction of the gap it has covered scaled to 2**24, so P(up) is that fraction and the rounding is
unbiased.

The optimizers' write-back of bf16/fp16 parameters (lowbit.optim, lowbit.reference.optim) uses
the same generator with a per-(parameter, step) key, key = sr_key(seed, parameter index, step)
(a splitmix64 hash of the three, 63 bits), and draws four words per counter: element i uses word
i % 4 of counter (lo32(i // 4), hi32(i // 4), 0, 0) — Triton's tl.randint4x(key, i // 4). A run
resumed from a checkpoint therefore draws the same bits as an uninterrupted one.

The low-precision quantizers' stochastic rounding (lowbit.lowprec, lowbit.nn) draws from that
same four-word layout under their own (seed, offset): element i = offset + the element's
row-major index uses word i % 4 of counter i // 4 (one Philox evaluation per four elements).

Special values, as the target formats define them (and as torch's casts treat them):
  NaN -> NaN.
  +-inf -> +-inf; float8_e4m3fn has no infinity and saturates: +-inf -> +-448.
  finite |x| above the largest finite value: rounds between the largest finite value and the
  next step above it, which is inf for bf16/fp16/e5m2 (so values near the top can overflow, as
  an IEEE cast of the same value would) and 448 again for e4m3fn (saturation).
  Values below the smallest subnormal round to 0 or to it with probability truncated to 2**-24.
"""
import torch

from . import _validate, ops

TARGETS = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


def philox_words(n: int, *, seed: int, counter0: int = 0, words: int = 1, device=None,
                 backend: str | None = None) -> torch.Tensor:
    """The raw stream: an int32 tensor [words, n] whose element [w, i] holds the bits of word w
    (words in 1..4) of Philox4x32-10 keyed by `seed` (an int in [0, 2**64)) at counter
    counter0 + i — the words every random op above draws from (the Hessian probes use words 0
    and 1). Read a word as unsigned with `.to(torch.int64) & 0xFFFFFFFF`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(words, bool) or not isinstance(words, int) or not 1 <= words <= 4:
        raise ValueError(f"words must be an int in 1..4, got {words!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(counter0, bool) or not isinstance(counter0, int) or counter0 < 0:
        raise ValueError(f"counter0 must be a non-negative int, got {counter0!r}")
    if counter0 + n > 2**62:
        raise ValueError(f"counter0 + n must stay within 2**62, got {counter0 + n}")
    device = torch.device("cpu") if device is None else torch.device(device)
    be = ops.resolve_backend(backend, device)
    out = torch.empty((words, n), dtype=torch.int32, device=device)
    ops.philox_words(out, seed - 2**64 if seed >= 2**63 else seed, counter0, be)
    return out


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, *, seed: int, offset: int = 0,
                     backend: str | None = None) -> torch.Tensor:
    """Round fp32 `x` to `dtype` stochastically; same bits on every backend for the same
    (seed, offset). Returns a new tensor of x's shape."""
    _validate.float_tensor("x", x, allowed=(torch.float32,))
    if dtype not in TARGETS:
        raise ValueError(f"dtype must be one of {', '.join(map(str, TARGETS))}, got {dtype}")
    seed_v = _validate.seed_value(seed)
    offset_v = _validate.offset_value(offset)
    if x.numel() and offset_v + x.numel() > 2**63:
        raise ValueError("offset + x.numel() must stay below 2**63")
    be = ops.resolve_backend(backend, x.device)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    ops.stochastic_round(x.detach().contiguous(), out, seed_v, offset_v, be)
    return out
