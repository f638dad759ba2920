"""Random probe vectors from lowbit's counter-based Philox stream (DESIGN.md contract 2).

Probe j of a stream keyed by `seed` assigns the element at flat position i (parameters
concatenated in order, each row-major; n elements in all) the counter

    c = offset + j·n + i,   Philox4x32-10 key = (lo32(seed), hi32(seed)),
    counter = (lo32(c), hi32(c), 0, 0)       (lowbit.reference.philox.philox4)

and draws from its words w0, w1:
    Rademacher   1 − 2·(w0 >> 31)                       (each sign with probability 1/2)
    Gaussian     Box–Muller: sqrt(−2 ln(1 − U(w0))) · cos(2π U(w1)), U = uniform24
                 (24-bit uniforms in [0, 1); 1 − U is in (0, 1], so the log is finite)
computed in float64 and cast to each parameter's dtype. The same (seed, offset, j, i) gives
the same value on every device and run, independent of torch's global RNG, so an estimate is
reproducible from its seed and a run can resume its probe stream.
"""
import math

import torch

from ..reference.philox import uniform24
from ..rounding import philox_words

DISTRIBUTIONS = ("rademacher", "gaussian")


def _check(distribution, seed, offset):
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got "
                         f"{distribution!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")


def _values(n: int, counter0: int, seed: int, distribution: str, device) -> torch.Tensor:
    """Float64 values of counters counter0 .. counter0 + n - 1 (the module docstring's map), from
    the words of lowbit.rounding.philox_words (a native kernel where one is built)."""
    w = philox_words(n, seed=seed, counter0=counter0,
                     words=1 if distribution == "rademacher" else 2, device=device)
    if distribution == "rademacher":
        return 1.0 - 2.0 * (w[0] < 0).to(torch.float64)   # bit 31 of w0 is the int32 sign
    u = uniform24(w.to(torch.int64) & 0xFFFFFFFF).to(torch.float64)  # the unsigned words
    u1, u2 = 1.0 - u[0], u[1]
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def probes(like, count: int, *, seed: int = 0, distribution: str = "rademacher",
           offset: int = 0, first: int = 0) -> list:
    """Probes first .. first+count-1 of the stream, stacked: tensor i has shape
    (count, *like[i].shape), in like[i]'s dtype and on its device (CPU for meta tensors)."""
    _check(distribution, seed, offset)
    like = [like] if isinstance(like, torch.Tensor) else list(like)
    if not isinstance(count, int) or count < 0 or not isinstance(first, int) or first < 0:
        raise ValueError(f"count and first must be non-negative ints, got {count!r}, {first!r}")
    n = sum(t.numel() for t in like)
    out, base = [], 0
    for t in like:
        device = torch.device("cpu") if t.device.type == "meta" else t.device
        rows = [_values(t.numel(), offset + j * n + base, seed, distribution, device)
                for j in range(first, first + count)]
        vals = torch.stack(rows) if rows else torch.empty(0, t.numel(), dtype=torch.float64,
                                                          device=device)
        out.append(vals.to(t.dtype).reshape((count,) + tuple(t.shape)))
        base += t.numel()
    return out


def probe(like, index: int = 0, *, seed: int = 0, distribution: str = "rademacher",
          offset: int = 0) -> list:
    """Probe number `index` of the stream, as tensors shaped (and typed, and placed) like the
    tensors of `like` (parameters, or an operator's `like`); module docstring for the layout."""
    return [t[0] for t in probes(like, 1, seed=seed, distribution=distribution, offset=offset,
                                 first=index)]


def rademacher(like, index: int = 0, *, seed: int = 0, offset: int = 0) -> list:
    return probe(like, index, seed=seed, distribution="rademacher", offset=offset)


def gaussian(like, index: int = 0, *, seed: int = 0, offset: int = 0) -> list:
    return probe(like, index, seed=seed, distribution="gaussian", offset=offset)
