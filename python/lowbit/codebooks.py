"""Codebooks (sorted float32 value tables) for block-wise quantization.

"dynamic"/"udynamic" are bit-identical to bitsandbytes' create_dynamic_map(signed=True/False)
(so 8-bit optimizer states interoperate), "linear" is bitsandbytes' signed 8-bit linear map
(sorted), "nf4" and "fp4" are bitsandbytes' 4-bit tables (fp4 sorted by value, so its code
indices are not bitsandbytes' bit patterns), "dynamic4" is the signed dynamic-exponent 4-bit map
for first moments (create_dynamic_map(True, 3, 4), as torchao/lpmm), and "linear4_nozero" is
{k/16, k=1..16} for second moments (no zero code, so 1/sqrt(v) never meets a quantized 0).
"""
import functools

import torch

NAMES = ("dynamic", "udynamic", "linear", "nf4", "fp4", "dynamic4", "linear4_nozero")


def _dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    # Decimal dynamic-exponent map (Dettmers 2016/2022) built the way bitsandbytes builds it, in
    # float32: per decade 10^(i - (E-1)), the midpoints of a float32 linspace(0.1, 1) grid.
    non_sign_bits = total_bits - 1
    values = []
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + (0 if signed else
                                                               2 ** (i + non_sign_bits - max_exponent_bits))
        grid = torch.linspace(0.1, 1, items + 1, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    if len(values) != 2 ** total_bits:
        raise AssertionError("dynamic map construction is inconsistent")
    return torch.tensor(sorted(values), dtype=torch.float32)


def _linear_map() -> torch.Tensor:
    # bitsandbytes' create_linear_map(signed=True, total_bits=8, add_zero=True): 255 evenly spaced
    # values in [-1, 1] plus one extra zero, sorted here.
    values = torch.linspace(-1.0, 1.0, 255, dtype=torch.float32).tolist() + [0.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


# bitsandbytes' NF4 table (normal-float quantiles, Dettmers et al. 2023), index order == sorted.
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
# bitsandbytes' FP4 (E2M1-like) magnitudes; both signed zeros are kept so the table has 16 codes.
_FP4_MAGNITUDES = [0.0, 0.005208333333, 0.16666667, 0.25, 0.33333333, 0.5, 0.66666667, 1.0]


@functools.lru_cache(maxsize=None)
def _builtin(name: str) -> torch.Tensor:
    if name == "dynamic":
        return _dynamic_map(True, 7, 8)
    if name == "udynamic":
        return _dynamic_map(False, 7, 8)
    if name == "linear":
        return _linear_map()
    if name == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if name == "fp4":
        neg = [-m for m in reversed(_FP4_MAGNITUDES)]   # -1 ... -0.0
        return torch.tensor(neg + _FP4_MAGNITUDES, dtype=torch.float32)
    if name == "dynamic4":
        return _dynamic_map(True, 3, 4)
    if name == "linear4_nozero":
        return torch.arange(1, 17, dtype=torch.float32) / 16
    raise ValueError(f"unknown codebook {name!r}; choose one of {', '.join(NAMES)} or pass a "
                     "sorted float32 tensor of 16 or 256 values")


def codebook(name: str) -> torch.Tensor:
    """The named codebook as a sorted float32 CPU tensor (a fresh copy)."""
    return _builtin(name).clone()


def resolve(code) -> tuple[str | None, torch.Tensor]:
    """(name or None, validated float32 CPU codebook) for a name or a user tensor."""
    if isinstance(code, str):
        return code, _builtin(code)
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"code must be a codebook name or a torch.Tensor, got {type(code).__name__}")
    if code.dim() != 1 or code.numel() not in (16, 256):
        raise ValueError(f"code must be a 1-D tensor of 16 (4-bit) or 256 (8-bit) values, got "
                         f"shape {tuple(code.shape)}")
    if code.dtype != torch.float32:
        raise ValueError(f"code must be float32, got {code.dtype}; pass code.float()")
    book = code.detach().cpu().contiguous()
    if not torch.isfinite(book).all():
        raise ValueError("code must hold finite values only")
    if (book[1:] < book[:-1]).any():
        raise ValueError("code must be sorted ascending; pass torch.sort(code).values")
    return None, book
