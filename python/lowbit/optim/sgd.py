"""SGD with (Nesterov) momentum and 32-, 8- or 4-bit momentum buffers: torch.optim.SGD's
arguments, defaults and rule (the buffer starts as the first gradient; dampening; L2 weight
decay; maximize). Without momentum there is no state beyond the step count."""
import torch

from ._base import FusedOptimizer
from ..reference import optim as ref


class SGD(FusedOptimizer):
    _kind = "sgd"
    _torch_class = torch.optim.SGD

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, **kwargs):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, **kwargs)

    def _nstates(self, group):
        return 1 if group["momentum"] != 0 else 0

    def _scalars(self, group, step, beta1_scale=1.0):
        sc = ref.sgd_scalars(float(group["lr"]), group["momentum"], group["dampening"],
                             group["weight_decay"])
        return sc, {"maximize": bool(group["maximize"]), "nesterov": bool(group["nesterov"]),
                    "first_step": step == 1}


class SGD8bit(SGD):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 8)
        super().__init__(params, *args, **kwargs)


class SGD4bit(SGD):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 4)
        super().__init__(params, *args, **kwargs)
