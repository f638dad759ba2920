"""pytest-benchmark tests of curvature work: one Hessian-vector product per lowbit route (and
PyHessian's double-backward product, when installed) on the byte-level transformer of
bench/hessian_bench.py (2 layers, d=128, 8 x 64 tokens), and one Sophia step on 2**22 fp32
parameters in 8 tensors (lowbit's SophiaG / SophiaH against sophia-opt's SophiaG and
pytorch-optimizer's SophiaH, when installed).

Before it is timed, every case checks it does the same work: each Hessian product against
torch's double backward (the GGN product against J^T H_loss J v built from torch.func's jvp and
vjp), each Sophia step's parameter change after 3 steps against the peer implementation of the
same rule.

    pytest bench/test_bench_hvp.py --benchmark-enable
"""
import pytest
import torch
import torch.nn.functional as F

import hessian_bench as hb
from _cases import require_lowbit_cpu, update_error

N = 2**22
ROUTE_TOL = {"double_backward": 1e-4, "forward_over_reverse": 1e-4, "finite_difference": 5e-2,
             "ggn": 1e-4, "pyhessian": 1e-4}


@pytest.fixture(scope="module")
def problem():
    return hb.setup()   # model, params, loss_fn, x, y, v


def _exact_hvp(problem):
    model, params, loss_fn, x, y, v = problem
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    return torch.autograd.grad(grads, params, grad_outputs=v)


def _exact_ggn(problem):
    """J^T H J v with H the mean cross-entropy's Hessian in the logits (diag(p) - p p^T) / rows."""
    model, params, loss_fn, x, y, v = problem
    names = [n for n, _ in model.named_parameters()]

    def logits(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,)).reshape(-1, 256)
    _, jv = torch.func.jvp(logits, tuple(params), tuple(v))
    out, vjp = torch.func.vjp(logits, *params)
    p = out.softmax(-1)
    hjv = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / out.shape[0]
    return vjp(hjv)


def _route(problem, route):
    model, params, loss_fn, x, y, v = problem
    if route == "pyhessian":
        utils = pytest.importorskip("pyhessian.utils")

        def f():   # PyHessian's product: the gradient with a graph, then its double backward
            grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
            return utils.hessian_vector_product(list(grads), params, v)
        return f
    require_lowbit_cpu()
    return hb.route_fn(route, model, params, loss_fn, x, y, v)


def _rel(a, b):
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("route", list(hb.ROUTES) + ["pyhessian"])
def test_hessian_vector_product(benchmark, problem, route):
    f = _route(problem, route)
    ref = _exact_ggn(problem) if route == "ggn" else _exact_hvp(problem)
    err = _rel(f(), ref)
    assert err < ROUTE_TOL[route], f"{route}: relative error {err:.3e}"
    benchmark.group = "Hessian-vector product, " + hb.describe()
    benchmark(f)


def test_gradient_baseline(benchmark, problem):
    model, params, loss_fn, *_ = problem
    benchmark.group = "Hessian-vector product, " + hb.describe()
    grads = benchmark(lambda: torch.autograd.grad(loss_fn(), params))
    assert len(grads) == len(params)


class _WithEstimate:
    """Drives a Sophia optimizer as bench/hessian_bench.py does: every step a plain one, every
    second one with a fixed Hessian estimate folded in first."""

    def __init__(self, params, opt, step, squared):
        self.params, self.opt, self.fn, self.k = params, opt, step, 0
        g = torch.Generator().manual_seed(3)
        self.est = [torch.rand(p.shape, generator=g) for p in params]
        if squared:   # sophia-opt folds grad * grad of what it is given: give it sqrt(estimate)
            self.est = [e.sqrt() for e in self.est]

    def step(self):
        self.fn(self.opt, self.est if self.k % 2 == 0 else None)
        self.k += 1


def _sophia(name):
    rows = {r[0]: r for r in hb.sophia_rows()}
    key = {"lowbit-SophiaG": "lowbit SophiaG (32-bit states)", "lowbit-SophiaG8bit":
           "lowbit SophiaG8bit", "lowbit-SophiaH": "lowbit SophiaH (32-bit states)",
           "lowbit-SophiaH8bit": "lowbit SophiaH8bit", "sophia-opt-SophiaG":
           "official SophiaG (sophia-opt)", "pytorch-optimizer-SophiaH":
           "pytorch-optimizer SophiaH"}[name]
    if key not in rows:
        pytest.skip(f"{name}'s library is not installed")
    if name.startswith("lowbit"):
        require_lowbit_cpu()
    _, make, step = rows[key]
    return lambda ps: _WithEstimate(ps, make(ps), step, squared=name == "sophia-opt-SophiaG")


# (id, reference id, tolerance): the references are the other library's code of the same rule
SOPHIA = [("lowbit-SophiaG", "sophia-opt-SophiaG", 1e-4),
          ("lowbit-SophiaG8bit", "sophia-opt-SophiaG", 0.15),
          ("sophia-opt-SophiaG", "lowbit-SophiaG", 1e-4),
          ("lowbit-SophiaH", "pytorch-optimizer-SophiaH", 1e-4),
          ("lowbit-SophiaH8bit", "pytorch-optimizer-SophiaH", 0.15),
          ("pytorch-optimizer-SophiaH", "lowbit-SophiaH", 1e-4)]


@pytest.mark.parametrize("impl,reference,tol", SOPHIA, ids=[s[0] for s in SOPHIA])
def test_sophia_step(benchmark, impl, reference, tol):
    make, ref = _sophia(impl), _sophia(reference)
    err, opt, _ = update_error(make, ref, N)
    assert err < tol, f"{impl}: relative update error {err:.3e} against {reference}"
    benchmark.group = f"Sophia step (every second one with an estimate), {N} fp32 params"
    benchmark(opt.step)
