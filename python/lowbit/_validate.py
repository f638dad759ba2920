"""Argument checks shared by the public entry points: each error names the argument and the fix."""
import torch

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def float_tensor(name: str, t, allowed=FLOAT_INPUTS) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; "
                         f"pass {name}.to_dense()")
    if t.is_complex():
        raise TypeError(f"{name} must be real, got complex dtype {t.dtype}; quantize the real "
                        "and imaginary parts (torch.view_as_real) separately")
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {t.dtype} (convert with "
                        f"{name}.float())")
    return t


def seed_value(seed) -> int:
    """A user seed as an int in [0, 2**63); None draws one from torch's default generator, so
    torch.manual_seed makes it reproducible."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def offset_value(offset) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= offset < 2**63:
        raise ValueError(f"offset must be in [0, 2**63), got {offset}")
    return offset
