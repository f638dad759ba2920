"""convert(): swap a model's nn.Linear layers for QuantLinear in place."""
import fnmatch

from torch import nn

from .config import LinearQuantConfig
from .linear import QuantLinear


def _excluded(qualname: str, patterns) -> bool:
    last = qualname.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(qualname, p) or fnmatch.fnmatchcase(last, p)
               for p in patterns)


def convert(model: nn.Module, config: LinearQuantConfig, exclude=None,
            backend: str | None = None) -> nn.Module:
    """Replace every plain nn.Linear of `model` (type exactly nn.Linear; subclasses such as
    attention's out_proj are left alone) whose qualified name matches none of the fnmatch
    patterns `exclude` (default config.exclude: "lm_head", "head", "output", "*embed*", matched
    against the full name and its last component) with a QuantLinear sharing its Parameters.
    Layers are numbered in named_modules() order for their random streams; `backend` picks the
    lowbit backend of their quantize kernels (None: the device's default). Returns `model`."""
    if not isinstance(config, LinearQuantConfig):
        raise TypeError(f"config must be a LinearQuantConfig, got {type(config).__name__}")
    patterns = tuple(config.exclude if exclude is None else exclude)
    todo = [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and name and not _excluded(name, patterns)]
    for index, (name, linear) in enumerate(todo):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(linear, config, layer_index=index,
                                                          backend=backend))
    return model
