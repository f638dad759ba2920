"""Every kernel backend equals the reference bit for bit: codes, absmax, dequantized values and
stochastically rounded bits, on fresh random inputs of awkward sizes (DESIGN.md contract 1)."""
import pytest
import torch

import lowbit
from conftest import kernel_backend_params

SIZES = (0, 1, 255, 257, 4097)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_FOR_SIZE = {0: 64, 1: 32, 255: 64, 257: 256, 4097: 128}


def _input(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed values so blocks have outliers and the small-magnitude codes are exercised.
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 2)
    return x.to(dtype)


def _assert_same_quant(a, b):
    assert torch.equal(a.codes, b.codes), f"{(a.codes != b.codes).sum()} codes differ"
    assert torch.equal(a.absmax.view(torch.int32), b.absmax.view(torch.int32))


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("code", lowbit.CODEBOOKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_matches_reference(backend, stochastic, code, dtype):
    for i, n in enumerate(SIZES):
        x = _input(n, dtype, seed=n + 17 * i)
        bs = BLOCK_FOR_SIZE[n]
        ref = lowbit.quantize_blockwise(x, code, bs, stochastic=stochastic, seed=1234 + n,
                                        backend="reference")
        got = lowbit.quantize_blockwise(x, code, bs, stochastic=stochastic, seed=1234 + n,
                                        backend=backend)
        _assert_same_quant(got, ref)
        for out_dtype in DTYPES:
            d_ref = lowbit.dequantize_blockwise(ref, dtype=out_dtype, backend="reference")
            d_got = lowbit.dequantize_blockwise(ref, dtype=out_dtype, backend=backend)
            assert d_got.dtype == out_dtype and d_got.shape == x.shape
            assert torch.equal(d_got.view(torch.uint8) if n else d_got,
                               d_ref.view(torch.uint8) if n else d_ref)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("block_size", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_every_block_size_matches_reference(backend, block_size):
    x = _input(3 * block_size + 5, torch.float32, seed=block_size)
    for code in ("dynamic", "nf4"):
        _assert_same_quant(lowbit.quantize_blockwise(x, code, block_size, backend=backend),
                           lowbit.quantize_blockwise(x, code, block_size, backend="reference"))


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_non_contiguous_input_gives_codes_of_contiguous_copy(backend):
    base = torch.randn(3, 4, 6, 256)
    view = base[:, ::2].transpose(-1, -2)   # strided and permuted
    assert not view.is_contiguous()
    for code in ("dynamic", "dynamic4"):
        a = lowbit.quantize_blockwise(view, code, 64, backend=backend)
        b = lowbit.quantize_blockwise(view.contiguous(), code, 64, backend="reference")
        _assert_same_quant(a, b)
        assert a.shape == view.shape


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_special_values_match_reference(backend):
    x = torch.randn(4 * 64)
    x[3] = float("nan")            # block 0: NaN absmax
    x[70] = float("inf")           # block 1: inf absmax, inf/inf -> NaN y
    x[128:192] = 0.0               # block 2: all zeros
    x[200] = -0.0
    x[201] = 1e-40                 # subnormal
    for code in ("dynamic", "udynamic", "fp4"):
        for stochastic in (False, True):
            a = lowbit.quantize_blockwise(x, code, 64, stochastic=stochastic, seed=9,
                                          backend=backend)
            b = lowbit.quantize_blockwise(x, code, 64, stochastic=stochastic, seed=9,
                                          backend="reference")
            _assert_same_quant(a, b)
    qs = lowbit.quantize_blockwise(x, "dynamic", 64, backend=backend)
    for out_dtype in DTYPES:  # NaN bits too: every backend emits the canonical NaN
        got = lowbit.dequantize_blockwise(qs, dtype=out_dtype, backend=backend)
        ref = lowbit.dequantize_blockwise(qs, dtype=out_dtype, backend="reference")
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    d = lowbit.dequantize_blockwise(qs, backend=backend)
    assert torch.isnan(d[:64]).all()                  # a NaN block never becomes finite
    assert not torch.isfinite(d[64:128]).all()
    assert (d[128:192] == 0).all()


SR_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("dtype", SR_DTYPES, ids=str)
def test_stochastic_round_matches_reference(backend, dtype):
    from test_rounding_reference import all_fp32_classes
    x = all_fp32_classes(20_000)
    for offset in (0, 2**32 - 7, 2**40):
        a = lowbit.stochastic_round(x, dtype, seed=2**40 + 3, offset=offset, backend=backend)
        b = lowbit.stochastic_round(x, dtype, seed=2**40 + 3, offset=offset, backend="reference")
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    empty = lowbit.stochastic_round(torch.empty(0, 3), dtype, seed=1, backend=backend)
    assert empty.shape == (0, 3) and empty.dtype == dtype


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("ncode", [16, 256])
def test_clustered_user_codebook_matches_reference(backend, ncode):
    # Codes closer together than fp32's top-16-bit buckets can separate: the CPU kernel's
    # table-driven search must fall back to its exact general path.
    dense = 0.5 + torch.arange(ncode // 2, dtype=torch.float32) * 1e-5
    book = torch.sort(torch.cat([torch.linspace(-1, 0.4, ncode - ncode // 2), dense])).values
    x = torch.cat([torch.randn(3000), 0.5 + torch.rand(3000) * ncode * 1e-5])
    for stochastic in (False, True):
        _assert_same_quant(
            lowbit.quantize_blockwise(x, book, 128, stochastic=stochastic, seed=4, backend=backend),
            lowbit.quantize_blockwise(x, book, 128, stochastic=stochastic, seed=4,
                                      backend="reference"))


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_repeated_and_adjacent_codes_match_reference(backend):
    # 8-bit books whose midpoints do not all lie strictly between their codes (a repeated code,
    # a code one float above another): the CPU kernel's stochastic rounding cannot take its
    # bracket from the nearest-code table and must use its general search.
    base = torch.linspace(-1, 1, 250)
    repeated = torch.sort(torch.cat([base, torch.full((6,), 0.25)])).values
    pair = torch.tensor([0.5, 0.5]).nextafter(torch.tensor([0.5, 1.0]))  # 0.5 and one float up
    adjacent = torch.sort(torch.cat([base, pair, torch.linspace(0.61, 0.69, 4)])).values
    x = torch.cat([torch.randn(3000), 0.25 + torch.randn(1000) * 1e-3, 0.5 + torch.randn(1000) * 1e-7])
    for book in (repeated, adjacent):
        mids = (book[1:] + book[:-1]) / 2
        assert book.numel() == 256 and ((mids <= book[:-1]) | (mids >= book[1:])).any()
        for stochastic in (False, True):
            _assert_same_quant(
                lowbit.quantize_blockwise(x, book, 256, stochastic=stochastic, seed=6,
                                          backend=backend),
                lowbit.quantize_blockwise(x, book, 256, stochastic=stochastic, seed=6,
                                          backend="reference"))


def test_large_inputs_take_the_streaming_path_exactly():
    # From 2**20 elements on, the CPU kernels write with non-temporal stores (and fence); the
    # results must not change. The other backends are covered at small sizes above.
    if "cpu" not in lowbit.available_backends():
        pytest.skip("lowbit._C is not built")
    x = torch.randn(2**20 + 77)
    for code, bs in (("dynamic", 256), ("nf4", 64), ("dynamic4", 128)):
        a = lowbit.quantize_blockwise(x, code, bs, backend="cpu")
        b = lowbit.quantize_blockwise(x, code, bs, backend="reference")
        _assert_same_quant(a, b)
        assert torch.equal(lowbit.dequantize_blockwise(a, backend="cpu"),
                           lowbit.dequantize_blockwise(a, backend="reference"))
