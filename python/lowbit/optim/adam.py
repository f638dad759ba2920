"""Adam and AdamW with 32-, 8- or 4-bit states (lowbit.optim._base for the shared machinery).

second_moment_norm="rank1" (4-bit states only) stores the second moment of every quantized
parameter with at least two dimensions the way the 4-bit optimizer paper's Rank-1/Linear does
(Li, Chen, Zhu 2023): the parameter is viewed as the matrix (R, C) = (size(0), numel // size(0))
and each element of v is quantized against min(max of its row, max of its column) of the new v
instead of its block's absmax, so a row or column of outliers no longer flattens the small
values sharing its blocks. The paper generalises this to p-D tensors with one maximum per
dimension; we keep the single (size(0), rest) matrix view. 1-D parameters, parameters with
size(0) == 1 or a single column, and parameters below min_quant_numel keep the default block-wise
v; the first moment is always block-wise. Scales cost 4 * (R + C) bytes per matrix instead of 4
per 128 elements, and a step reads the gradient and v's codes one more time (the row and column
maxima of the new v are needed before any of its codes can be written).
"""
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


SECOND_MOMENT_NORMS = ("block", "rank1")


def _check_norm(group):
    norm = group.get("second_moment_norm", "block")
    if norm not in SECOND_MOMENT_NORMS:
        raise ValueError(f"second_moment_norm must be 'block' or 'rank1', got {norm!r}")
    if norm == "rank1" and group["state_bits"] != 4:
        raise ValueError("second_moment_norm='rank1' needs state_bits=4 (the rank-1 format "
                         f"stores 4-bit codes of v), got state_bits={group['state_bits']}; use "
                         "second_moment_norm='block' or a 4-bit optimizer")


class _AdamBase(FusedOptimizer):
    _kind = "adam"
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False, second_moment_norm="block", **kwargs):
        _check_common(lr, eps, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        maximize=maximize, second_moment_norm=second_moment_norm)
        super().__init__(params, defaults, **kwargs)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        _check_norm(self.param_groups[-1])

    def _v_cols(self, p, group, bits):
        # the (size(0), numel // size(0)) matrix view; vectors and single rows or columns have
        # nothing to gain from it and keep block-wise v
        if group.get("second_moment_norm", "block") != "rank1" or bits != 4 or p.dim() < 2:
            return 0
        rows = p.shape[0]
        cols = p.numel() // rows if rows else 0
        return cols if rows > 1 and cols > 1 else 0

    def _scalars(self, group, step, beta1_scale=1.0):
        beta1, beta2 = group["betas"]
        sc = ref.adam_scalars(float(group["lr"]), beta1 * beta1_scale, beta2, group["eps"],
                              group["weight_decay"], step, self._decoupled)
        return sc, {"maximize": bool(group["maximize"])}


class AdamW(_AdamBase):
    """torch.optim.AdamW with fused 32/8/4-bit states (decoupled weight decay, default 1e-2).
    second_moment_norm="block" | "rank1" (4-bit states): module docstring."""
    _torch_class = torch.optim.AdamW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class Adam(_AdamBase):
    """torch.optim.Adam with fused 32/8/4-bit states (L2 weight decay added to the gradient,
    as torch.optim.Adam does; default 0). second_moment_norm="block" | "rank1" (4-bit states):
    module docstring."""
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
