"""Adam and AdamW with 32-, 8- or 4-bit states (lowbit.optim._base for the shared machinery)."""
import torch

from ._base import FusedOptimizer
from ..reference import optim as ref


def _check_common(lr, eps, betas, weight_decay):
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class _AdamBase(FusedOptimizer):
    _kind = "adam"
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False, **kwargs):
        _check_common(lr, eps, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, **kwargs)

    def _scalars(self, group, step, beta1_scale=1.0):
        beta1, beta2 = group["betas"]
        sc = ref.adam_scalars(float(group["lr"]), beta1 * beta1_scale, beta2, group["eps"],
                              group["weight_decay"], step, self._decoupled)
        return sc, {"maximize": bool(group["maximize"])}


class AdamW(_AdamBase):
    """torch.optim.AdamW with fused 32/8/4-bit states (decoupled weight decay, default 1e-2)."""
    _torch_class = torch.optim.AdamW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class Adam(_AdamBase):
    """torch.optim.Adam with fused 32/8/4-bit states (L2 weight decay added to the gradient,
    as torch.optim.Adam does; default 0)."""
    _decoupled = False
    _torch_class = torch.optim.Adam


class AdamW8bit(AdamW):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 8)
        super().__init__(params, *args, **kwargs)


class AdamW4bit(AdamW):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 4)
        super().__init__(params, *args, **kwargs)


class Adam8bit(Adam):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 8)
        super().__init__(params, *args, **kwargs)


class Adam4bit(Adam):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 4)
        super().__init__(params, *args, **kwargs)
