import pytest
import torch

import lowbit
from lowbit import codebooks


@pytest.mark.parametrize("name", lowbit.CODEBOOKS)
def test_codebooks_are_sorted_float32_of_16_or_256(name):
    book = lowbit.codebook(name)
    assert book.dtype == torch.float32 and book.dim() == 1
    assert book.numel() in (16, 256)
    assert (book[1:] >= book[:-1]).all()
    assert book.abs().max() == 1.0


def test_dynamic_maps_match_published_values():
    # Table facts from bitsandbytes' create_dynamic_map (research/bitsandbytes.md §1.1).
    d, u = lowbit.codebook("dynamic"), lowbit.codebook("udynamic")
    assert d[0].item() == pytest.approx(-0.99296874, abs=1e-7) and d[255] == 1.0
    assert d[127] == 0.0 and d[128].item() == pytest.approx(5.5e-7, rel=1e-6)
    assert (d < 0).sum() == 127 and (d > 0).sum() == 128
    assert u[0] == 0.0 and u[1].item() == pytest.approx(3.25e-7, rel=1e-6) and u[255] == 1.0
    assert u[127].item() == pytest.approx(0.10351562, abs=1e-7)


def test_four_bit_optimizer_maps():
    expected = [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0.0, 0.0055,
                0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0]
    torch.testing.assert_close(lowbit.codebook("dynamic4"), torch.tensor(expected),
                               rtol=0, atol=1e-7)
    assert torch.equal(lowbit.codebook("linear4_nozero"), torch.arange(1, 17) / 16.0)


def test_bitsandbytes_maps_bit_identical():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(lowbit.codebook("dynamic"), F.create_dynamic_map(signed=True).sort().values)
    assert torch.equal(lowbit.codebook("udynamic"), F.create_dynamic_map(signed=False).sort().values)
    assert torch.equal(lowbit.codebook("linear"), F.create_linear_map(signed=True).sort().values)
    assert torch.equal(lowbit.codebook("nf4"), F.get_4bit_type("nf4", device="cpu").float())
    fp4 = F.get_4bit_type("fp4", device="cpu").float().sort().values
    assert torch.equal(lowbit.codebook("fp4"), fp4)
    # the 4-bit dynamic map is bitsandbytes' create_dynamic_map(True, 3, 4) without padding
    padded = F.create_dynamic_map(True, 3, 4)
    assert torch.equal(lowbit.codebook("dynamic4"), torch.unique(padded))


def test_codebook_returns_a_copy():
    book = lowbit.codebook("nf4")
    book.zero_()
    assert lowbit.codebook("nf4").abs().max() == 1.0


def test_unknown_codebook_name_is_named_in_error():
    with pytest.raises(ValueError, match="unknown codebook 'nf8'"):
        lowbit.codebook("nf8")


@pytest.mark.parametrize("bad, match", [
    (torch.linspace(-1, 1, 17), "16 .4-bit. or 256"),
    (torch.linspace(1, -1, 16), "sorted ascending"),
    (torch.linspace(-1, 1, 16).double(), "float32"),
    (torch.linspace(-1, 1, 256).view(16, 16), "1-D"),
    (torch.tensor([float("nan")] * 16), "finite"),
])
def test_user_codebook_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        codebooks.resolve(bad)
    with pytest.raises(ValueError, match=match):
        lowbit.quantize_blockwise(torch.randn(100), code=bad, block_size=64)
