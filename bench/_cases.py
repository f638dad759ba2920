"""Helpers of the pytest-benchmark files in bench/: parameters and gradients of the optimizer
cases, and the check that a case does the same work as its reference before it is timed."""
import pytest
import torch

import lowbit


def require_lowbit_cpu():
    if "cpu" not in lowbit.available_backends():
        pytest.skip("lowbit's CPU module (lowbit._C) is not built")


def make_params(n, ntensors=8, dtype=torch.float32, seed=0):
    """ntensors parameters of n elements in all (randn * 0.02), without gradients."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(n // ntensors, generator=g) * 0.02).to(dtype))
            for _ in range(ntensors)]


def set_grads(params, k):
    """Gradient set k (k = 0, 1, ...: seeded, of growing scale, so a clip acts differently on
    each step)."""
    g = torch.Generator().manual_seed(10 + k)
    for p in params:
        p.grad = (torch.randn(p.numel(), generator=g) * 1e-3 * (1 + 4 * k)).to(p.dtype)


def update_error(make, reference, n, dtype=torch.float32, steps=3):
    """Relative error ||d - d_ref|| / ||d_ref|| of the parameter change after `steps` steps of
    make(params) (params in dtype) against reference(params) on fp32 copies, on the same
    gradients: how a case checks it does the same work as its reference before it is timed.
    Returns (error, the optimizer made by `make`, its params) for the timing."""
    deltas = []
    for factory, dt in ((make, dtype), (reference, torch.float32)):
        ps = make_params(n, dtype=dt)
        start = [p.detach().float().clone() for p in ps]
        opt = factory(ps)
        for k in range(steps):
            set_grads(ps, k)
            opt.step()
        deltas.append(torch.cat([(p.detach().float() - s) for p, s in zip(ps, start)]))
        if factory is make:
            ours = (opt, ps)
    d, ref = deltas
    return ((d - ref).norm() / ref.norm()).item(), *ours


class ClipThenStep:
    """The unfused sequence: torch.nn.utils.clip_grad_norm_(params, max_norm), then opt.step()."""

    def __init__(self, params, opt, max_norm):
        self.params, self.opt, self.max_norm = params, opt, max_norm

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()
