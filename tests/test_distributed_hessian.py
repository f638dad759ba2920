"""Curvature tools under DDP (gloo, 2 processes on loopback): lowbit.hessian.across_ranks
averages each product over the ranks, so Hessian-vector products, Hutchinson, Lanczos and the
sharpness monitor on per-rank halves of a batch equal a single process's on the whole batch
(float64: up to the all-reduce's summation order), with the same bits on every rank."""
import torch
from torch import nn

from lowbit import hessian

from dist_helpers import run_ranks

D = torch.float64


def _setup(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g)
    x, y = x[rank::world], y[rank::world]  # each rank its half of the batch (equal halves)
    return model, (lambda: nn.functional.cross_entropy(model(x), y))


def _curvature(rank, world):
    model, loss = _setup(rank, world)
    if world > 1:  # as a DDP user has it: the products through the plain module, averaged
        ddp = nn.parallel.DistributedDataParallel(model)
        op = hessian.across_ranks(hessian.HessianOperator(loss, ddp.module))
    else:
        op = hessian.HessianOperator(loss, model)
    v = hessian.rademacher(list(model.parameters()), seed=3)
    hv = op(v)
    local = hessian.HessianOperator(loss, model)(v)  # this rank's own half: not averaged
    trace = hessian.hutchinson_trace(op, num_probes=8, seed=5)
    top = hessian.lanczos(op, 1, seed=7, max_steps=40, tol=1e-10)
    monitor = hessian.SharpnessMonitor(loss, model, every=1, lr=0.1, across_ranks=world > 1)
    reading = monitor.measure(step=0)
    return {"hv": [t.detach() for t in hv], "local": [t.detach() for t in local],
            "trace": trace.mean, "top": top.eigenvalues,
            "sharpness": reading["sharpness"]}


def test_curvature_under_ddp_equals_one_process(tmp_path):
    ranks = run_ranks(_curvature, 2, tmp_path)
    single = _curvature(0, 1)
    # every rank holds the same bits: the all-reduce's result and the same estimator arithmetic
    for a, b in zip(ranks[0]["hv"], ranks[1]["hv"]):
        assert torch.equal(a, b)
    assert ranks[0]["trace"] == ranks[1]["trace"] and ranks[0]["sharpness"] == \
        ranks[1]["sharpness"]
    # the global loss's curvature: the mean of the halves' Hessians is the whole batch's
    for a, b in zip(ranks[0]["hv"], single["hv"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # (a rank's own product is not: what a product through DDP alone would give)
    assert not all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(ranks[0]["local"],
                                                                   single["hv"]))
    assert abs(ranks[0]["trace"] - single["trace"]) <= 1e-10 * abs(single["trace"])
    torch.testing.assert_close(ranks[0]["top"], single["top"], rtol=1e-9, atol=0)
    assert abs(ranks[0]["sharpness"] - single["sharpness"]) <= 1e-8 * abs(single["sharpness"])


def test_across_ranks_without_a_process_group_is_the_operator():
    model, loss = _setup(0, 1)
    op = hessian.HessianOperator(loss, model)
    assert hessian.across_ranks(op) is op
