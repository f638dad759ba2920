"""lowbit.optim with 32-bit states as drop-in replacements: the same trajectory as torch.optim
(and Lion as its paper's rule) within fp32 rounding, through the default (CPU kernel) backend,
with param groups, LR schedulers, tensor lr and step(closure)."""
import pytest
import torch

import lowbit.optim as lo

SHAPES = [(1,), (4097,), (1024, 1024)]


def _run(cls, p0s, grads, **kw):
    ps = [p.clone().requires_grad_() for p in p0s]
    opt = cls([{"params": ps[:1], "lr": kw.pop("lr0", kw.get("lr", 1e-3))},
               {"params": ps[1:]}], **kw)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


CASES = {
    "adamw": (lo.AdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    "adamw_maximize": (lo.AdamW, torch.optim.AdamW, dict(lr=1e-3, maximize=True)),
    "adam_l2": (lo.Adam, torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-2)),
    "sgd_nesterov": (lo.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True,
                                                   weight_decay=1e-3)),
    "sgd_dampening": (lo.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1)),
    "sgd_plain": (lo.SGD, torch.optim.SGD, dict(lr=1e-2)),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_over_100_steps(case):
    # Three tensors (1, 4097 and 1024x1024 elements) in two param groups with different lr;
    # bitsandbytes' 32-bit tolerance (fp32 atol 1e-6 / rtol 1e-5, research §4.4).
    cls, torch_cls, kw = CASES[case]
    p0s = [torch.randn(s) * 0.1 for s in SHAPES]
    grads = [[torch.randn(s) * 0.01 for s in SHAPES] for _ in range(100)]
    got, _ = _run(cls, p0s, grads, lr0=2 * kw["lr"], **kw)
    want, _ = _run(torch_cls, p0s, grads, lr0=2 * kw["lr"], **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_lion_matches_the_paper_rule_over_100_steps():
    p0s = [torch.randn(s) * 0.1 for s in SHAPES]
    grads = [[torch.randn(s) * 0.01 for s in SHAPES] for _ in range(100)]
    got, _ = _run(lo.Lion, p0s, grads, lr0=1e-4, lr=1e-4, weight_decay=0.1)
    for p0, gs, a in zip(p0s, zip(*grads), got):
        # Chen et al. 2023, Algorithm 2, as separately rounded fp32 torch ops: sign(c) flips
        # wherever c is within rounding of 0, so a float64 rule would differ by 2*lr there
        f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        p, m = p0.clone(), torch.zeros_like(p0)
        for g in gs:
            c = f(0.9) * m + f(0.1) * g
            p = p * f(1 - 1e-4 * 0.1) - f(1e-4) * torch.sign(c)
            m = f(0.99) * m + f(0.01) * g
        torch.testing.assert_close(a, p, atol=1e-6, rtol=1e-5)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3))


def _train(model, opt, steps, sched=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(32, 64, generator=g), torch.randn(32, 3, generator=g)

        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
        if sched is not None:
            sched.step()
    return losses


@pytest.mark.parametrize("cls, torch_cls", [(lo.AdamW, torch.optim.AdamW),
                                            (lo.SGD, torch.optim.SGD)])
def test_training_with_scheduler_closure_and_tensor_lr(cls, torch_cls):
    a, b = _model(), _model()
    kw = dict(momentum=0.9) if cls is lo.SGD else {}
    # (each its own lr tensor: schedulers update it in place)
    opt_a = cls(a.parameters(), lr=torch.tensor(1e-2), **kw)
    opt_b = torch_cls(b.parameters(), lr=torch.tensor(1e-2), **kw)
    la = _train(a, opt_a, 60, torch.optim.lr_scheduler.StepLR(opt_a, 20, 0.5))
    lb = _train(b, opt_b, 60, torch.optim.lr_scheduler.StepLR(opt_b, 20, 0.5))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)
    assert abs(la[-1] - lb[-1]) < 1e-4


def test_add_param_group_and_zero_grad():
    a = _model()
    opt = lo.AdamW8bit(a[0].parameters(), lr=1e-3)
    opt.add_param_group({"params": a[2].parameters(), "lr": 1e-2})
    assert opt.param_groups[1]["state_bits"] == 8 and opt.param_groups[1]["lr"] == 1e-2
    _train(a, opt, 3)
    assert all(len(opt.state[p]) > 0 for p in a.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in a.parameters())
