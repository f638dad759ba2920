"""lowbit.optim Adam/AdamW as drop-in torch.optim replacements (issue 3, fp32-param slice)."""
import io

import pytest
import torch

import lowbit.optim as lo
from lowbit.reference import optim as ref


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3))


def _train(model, opt, steps, sched=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g)
        y = torch.randn(32, 3, generator=g)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls, torch_cls, wd", [(lo.AdamW, torch.optim.AdamW, 1e-2),
                                               (lo.Adam, torch.optim.Adam, 1e-2)])
def test_32bit_matches_torch_with_groups_and_scheduler(cls, torch_cls, wd):
    a, b = _model(), _model()
    groups = lambda m: [{"params": m[0].parameters(), "lr": 2e-3},  # noqa: E731
                        {"params": m[2].parameters()}]
    opt_a = cls(groups(a), lr=1e-3, weight_decay=wd)
    opt_b = torch_cls(groups(b), lr=1e-3, weight_decay=wd)
    la = _train(a, opt_a, 100, torch.optim.lr_scheduler.StepLR(opt_a, 30, 0.5))
    lb = _train(b, opt_b, 100, torch.optim.lr_scheduler.StepLR(opt_b, 30, 0.5))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)
    assert abs(la[-1] - lb[-1]) < 1e-4


@pytest.mark.parametrize("cls, bits", [(lo.AdamW8bit, 8), (lo.AdamW4bit, 4)])
def test_quantized_optimizer_equals_reference_and_keeps_small_tensors_32bit(cls, bits):
    model = _model()
    opt = cls(model.parameters(), lr=1e-3)
    w = model[0].weight   # 5120 elements: quantized; biases (< 4096) keep 32-bit states
    w0 = w.detach().clone()
    state_ref = ref.init_state(w0, bits)
    g = torch.Generator().manual_seed(3)
    for step in range(1, 6):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 0.01
        w0 = ref.adam_step(w0, w.grad, state_ref, step=step, state_bits=bits, lr=1e-3,
                           beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
        opt.step()
        assert torch.equal(w.detach(), w0)
    st = opt.state[w]
    assert st["exp_avg_codes"].dtype == torch.uint8 and torch.equal(
        st["exp_avg_codes"], state_ref["exp_avg_codes"])
    assert "exp_avg" in opt.state[model[0].bias]        # 80 elements -> 32-bit
    assert opt.state[w]["step"].item() == 5


@pytest.mark.parametrize("cls", [lo.AdamW, lo.AdamW8bit, lo.AdamW4bit])
def test_checkpoint_resume_is_bit_identical(cls):
    a = _model()
    opt = cls(a.parameters(), lr=1e-3)
    _train(a, opt, 10)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt.state_dict()}, buf)
    uninterrupted = _train(a, opt, 10, seed=7)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)      # plain tensors only
    b = _model()
    b.load_state_dict(ckpt["model"])
    opt_b = cls(b.parameters(), lr=1e-3)
    opt_b.load_state_dict(ckpt["opt"])
    resumed = _train(b, opt_b, 10, seed=7)
    assert resumed == uninterrupted
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bad_inputs_raise_and_leave_state_unchanged():
    model = _model()
    opt = lo.AdamW8bit(model.parameters())
    _train(model, opt, 2)
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    p0 = [p.detach().clone() for p in model.parameters()]
    model[0].weight.grad = torch.zeros_like(model[0].weight).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    # (torch itself refuses .grad of another shape or dtype, so those never reach step())
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, before[k])
    for p, q in zip(model.parameters(), p0):
        assert torch.equal(p, q)
    bf16 = torch.nn.Linear(4, 4).bfloat16()
    bf16.weight.grad = torch.zeros_like(bf16.weight)
    with pytest.raises(NotImplementedError, match="fp32 only"):
        lo.AdamW(bf16.parameters()).step()
    c = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    c.grad = torch.zeros_like(c)
    with pytest.raises(RuntimeError, match="complex"):
        lo.AdamW([c]).step()
    with pytest.raises(ValueError, match="state_bits must be 32, 8 or 4"):
        lo.AdamW(model.parameters(), state_bits=16)


def test_state_dict_from_another_model_is_rejected():
    a = _model()
    opt = lo.AdamW8bit(a.parameters())
    _train(a, opt, 1)
    other = torch.nn.Sequential(torch.nn.Linear(64, 90), torch.nn.Tanh(), torch.nn.Linear(90, 3))
    opt_o = lo.AdamW8bit(other.parameters())
    opt_o.load_state_dict(opt.state_dict())
    for p in other.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="saved for another model"):
        opt_o.step()
