"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2) with
32-, 8- or 4-bit momentum: update = sign(beta1 * m + (1 - beta1) * g), decoupled weight decay,
then m = beta2 * m + (1 - beta2) * g. Defaults of the paper's code (lr 1e-4, betas (0.9, 0.99),
weight_decay 0); the state is "exp_avg", as in the reference implementations."""
from ._base import FusedOptimizer
from .adam import _check_common
from ..reference import optim as ref


class Lion(FusedOptimizer):
    _kind = "lion"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 **kwargs):
        _check_common(lr, 0.0, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, **kwargs)

    def _scalars(self, group, step, beta1_scale=1.0):
        beta1, beta2 = group["betas"]
        sc = ref.lion_scalars(float(group["lr"]), beta1, beta2, group["weight_decay"])
        return sc, {"maximize": bool(group["maximize"])}


class Lion8bit(Lion):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 8)
        super().__init__(params, *args, **kwargs)


class Lion4bit(Lion):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 4)
        super().__init__(params, *args, **kwargs)
