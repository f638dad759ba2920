"""lowbit.rounding.philox_words, the raw Philox stream behind every random op: each kernel
backend returns the reference's words bit for bit (awkward sizes, every word count, a counter
range that carries into the counter's high 32 bits, a key above 2**63), and the Hessian probes
built on it equal the formulas of lowbit.hessian.probes' docstring evaluated on the reference."""
import math

import pytest
import torch

from conftest import kernel_backend_params
from lowbit.hessian import probes  # the function: probes j .. j+count-1, stacked
from lowbit.reference.philox import philox4, uniform24
from lowbit.rounding import philox_words

SIZES = (0, 1, 3, 31, 1023, 1025, 4097)
COUNTERS = (0, 2**32 - 700, 5 * 2**40 + 17)   # the middle one crosses a 2**32 carry
SEEDS = (0, 0x9E3779B97F4A7C15, 2**64 - 1)      # the last two have bit 63 set


def _reference_words(n, seed, counter0, words):
    """uint32 values (int64) [words, n] straight from the reference Philox."""
    return torch.stack(philox4(seed, counter0 + torch.arange(n, dtype=torch.int64))[:words])


@pytest.mark.parametrize("backend", ["reference"] + kernel_backend_params())
@pytest.mark.parametrize("words", [1, 2, 3, 4])
def test_words_equal_reference(backend, words):
    for i, n in enumerate(SIZES):
        seed, counter0 = SEEDS[i % len(SEEDS)], COUNTERS[i % len(COUNTERS)]
        got = philox_words(n, seed=seed, counter0=counter0, words=words, backend=backend)
        assert got.dtype == torch.int32 and got.shape == (words, n)
        want = _reference_words(n, seed, counter0, words)
        assert torch.equal(got.to(torch.int64) & 0xFFFFFFFF, want), (n, seed, counter0)


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_large_range_on_every_thread_matches_reference(backend):
    # more than one parallel chunk, and a length that is not a multiple of any vector width
    n, seed, counter0 = 70_001, 12345, 2**32 - 33_000
    got = philox_words(n, seed=seed, counter0=counter0, words=2, backend=backend)
    assert torch.equal(got.to(torch.int64) & 0xFFFFFFFF, _reference_words(n, seed, counter0, 2))


@pytest.mark.parametrize("kw, match", [
    ({"n": -1}, "n must be"), ({"words": 0}, "words must be"), ({"words": 5}, "words must be"),
    ({"seed": -1}, "seed must be"), ({"seed": 2**64}, "seed must be"),
    ({"counter0": -2}, "counter0 must be"), ({"counter0": 2**62}, "within 2\\*\\*62")])
def test_bad_arguments_are_named(kw, match):
    args = {"n": 4, "seed": 1, "counter0": 0, "words": 1}
    args.update(kw)
    n = args.pop("n")
    with pytest.raises(ValueError, match=match):
        philox_words(n, **args)


def _probe_from_reference(like, j, seed, offset, distribution):
    """Probe j by the module docstring of lowbit.hessian.probes, from the reference Philox."""
    n = sum(t.numel() for t in like)
    counters = offset + j * n + torch.arange(n, dtype=torch.int64)
    w0, w1, _, _ = philox4(seed, counters)
    if distribution == "rademacher":
        vals = 1.0 - 2.0 * (w0 >> 31).to(torch.float64)
    else:
        u1 = 1.0 - uniform24(w0).to(torch.float64)
        u2 = uniform24(w1).to(torch.float64)
        vals = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    out, base = [], 0
    for t in like:
        out.append(vals[base:base + t.numel()].to(t.dtype).reshape(t.shape))
        base += t.numel()
    return out


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_probes_equal_the_documented_formula(distribution):
    like = [torch.empty(7, 5), torch.empty(1), torch.empty(300, dtype=torch.float64),
            torch.empty(0), torch.empty(2, 3, 4, dtype=torch.bfloat16)]
    seed, offset = 2**63 + 11, 2**32 - 100
    stacked = probes(like, 3, seed=seed, distribution=distribution, offset=offset, first=2)
    for j in range(3):
        want = _probe_from_reference(like, 2 + j, seed, offset, distribution)
        for got, w in zip(stacked, want):
            assert got.dtype == w.dtype and got.shape[1:] == w.shape
            assert torch.equal(got[j], w)
