"""pytest-benchmark tests: lowbit's CPU kernels vs the peers, one test per op family, on 2**22
fp32 elements (torch.randn, seed 0). Not part of the suite (`pytest tests`); run them with

    pytest bench --benchmark-enable                     # timings, grouped per op + format
    pytest bench                                        # benchmarks disabled: a smoke test

Threads: 2 (override with LOWBIT_BENCH_THREADS). Like bench/run.py, bench/conftest.py sets glibc
malloc to keep freed large blocks (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD huge) so each call's
fresh output tensor does not page-fault a new mmap (LOWBIT_BENCH_MALLOC_TUNE=0 to keep the
default). Peers are skipped when not installed. Every
case also checks that its result is the same work (round-trip error within the expected band),
so a broken peer or kernel fails instead of reporting a fast wrong number. For the full table
against a memory-copy baseline use `python bench/run.py`.
"""
import pytest
import torch

import lowbit
from _cases import require_lowbit_cpu as _require_lowbit_cpu

N = 2**22
SEED = 1234

# (codebook, block size, id) and the mean abs round-trip error of randn(2**22) (checked +-10%)
FORMATS = [("dynamic", 256, "dyn8-b256", 8.53e-3),
           ("nf4", 64, "nf4-b64", 7.28e-2),
           ("dynamic4", 128, "dyn4-b128", 1.168e-1)]
SR_TARGETS = [(torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float8_e4m3fn, "e4m3")]


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, generator=g)


def _impl(impl, code, bs):
    """(quantize fn(x), dequantize fn(state) -> fp32) for an implementation, or skip."""
    if impl == "lowbit":
        _require_lowbit_cpu()
        return (lambda x: lowbit.quantize_blockwise(x, code, bs, backend="cpu"),
                lambda qs: lowbit.dequantize_blockwise(qs, backend="cpu"))
    if impl == "bitsandbytes":
        F = pytest.importorskip("bitsandbytes.functional")  # noqa: N806
        if code == "dynamic":
            return (lambda x: F.quantize_blockwise(x, blocksize=bs),
                    lambda st: F.dequantize_blockwise(st[0], st[1]))
        if code == "nf4":
            return (lambda x: F.quantize_4bit(x, blocksize=bs, quant_type="nf4"),
                    lambda st: F.dequantize_4bit(st[0], st[1]))
        pytest.skip(f"bitsandbytes has no block-wise quantizer for the {code} codebook")
    raise AssertionError(impl)


def _check_error(y, x, expected):
    err = (y.float().reshape(-1) - x).abs().mean().item()
    assert abs(err - expected) < 0.1 * expected, f"mean abs round-trip error {err:.4e}"


@pytest.mark.parametrize("impl", ["lowbit", "bitsandbytes"])
@pytest.mark.parametrize("code,bs,fid,expected", FORMATS, ids=[f[2] for f in FORMATS])
def test_quantize(benchmark, x, impl, code, bs, fid, expected):
    quant, dequant = _impl(impl, code, bs)
    benchmark.group = f"quantize {fid}"
    benchmark.extra_info["bytes"] = 4 * N + (N if code == "dynamic" else N // 2) + 4 * (N // bs)
    state = benchmark(quant, x)
    _check_error(dequant(state), x, expected)


@pytest.mark.parametrize("impl", ["lowbit", "bitsandbytes"])
@pytest.mark.parametrize("code,bs,fid,expected", FORMATS, ids=[f[2] for f in FORMATS])
def test_dequantize(benchmark, x, impl, code, bs, fid, expected):
    quant, dequant = _impl(impl, code, bs)
    benchmark.group = f"dequantize {fid}"
    benchmark.extra_info["bytes"] = 4 * N + (N if code == "dynamic" else N // 2) + 4 * (N // bs)
    state = quant(x)
    y = benchmark(dequant, state)
    _check_error(y, x, expected)


def _sr_impl(impl, dtype):
    if impl == "lowbit":
        _require_lowbit_cpu()
        return lambda x: lowbit.stochastic_round(x, dtype, seed=SEED, backend="cpu")
    if impl == "lowbit-stochastic-quantize-dyn8":   # SR into the 8-bit dynamic codebook
        _require_lowbit_cpu()
        if dtype is not torch.bfloat16:
            pytest.skip("one SR-quantize case is enough (it does not depend on the dtype)")
        return lambda x: lowbit.quantize_blockwise(x, "dynamic", 256, stochastic=True,
                                                   seed=SEED, backend="cpu")
    if impl == "torchao":
        quant_utils = pytest.importorskip("torchao.optim.quant_utils")
        if dtype is not torch.bfloat16 or not hasattr(quant_utils, "_fp32_to_bf16_sr"):
            pytest.skip("torchao has a CPU stochastic-rounding cast to bf16 only")
        return quant_utils._fp32_to_bf16_sr
    if impl == "torch-rtn-cast":   # round-to-nearest baseline: the floor for a cast
        return lambda x: x.to(dtype)
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", ["lowbit", "torchao", "torch-rtn-cast",
                                  "lowbit-stochastic-quantize-dyn8"])
@pytest.mark.parametrize("dtype,short", SR_TARGETS, ids=[t[1] for t in SR_TARGETS])
def test_stochastic_round(benchmark, x, impl, dtype, short):
    # bitsandbytes has no stochastic-rounding cast on the CPU; torchao's bf16 SR is the peer.
    f = _sr_impl(impl, dtype)
    benchmark.group = f"stochastic rounding fp32->{short}"
    y = benchmark(f, x)
    if isinstance(y, lowbit.QuantState):
        _check_error(lowbit.dequantize_blockwise(y, backend="cpu"), x, 1.136e-2)
        return
    assert y.dtype == dtype and y.shape == x.shape
    # SR lands on one of the two neighbours: |error| below one target ulp, mean error ~ 0
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float8_e4m3fn: 2.0**-3}[dtype]
    d = y.float() - x
    big = x.abs() > 2.0**-6          # normal range of every target (e4m3's smallest normal)
    assert (d[big].abs() <= ulp * x[big].abs() * 1.0001).all()
    assert abs(d.mean().item()) < 1e-4
