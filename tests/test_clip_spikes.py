"""Spike robustness, end to end: a small regression MLP trained 300 steps whose gradients are
multiplied by 1e3 at five random steps. Plain AdamW ends far worse than its spike-free run; the
spike-aware optimizers end within a few percent of theirs. And SPAM's zero-v hazard: a parameter
whose second moment is zero when its gradients start (a fresh or reset row, a low-bit block
quantized to zero) stays frozen under SPAM's rule, and trains under lowbit's floored rule."""
import pytest
import torch

import lowbit.optim as lo
from lowbit import clip


def _val_loss(make, spikes, seed=8, steps=300):
    """Held-out MSE (noise floor 0.01) after training a 16-64-1 tanh MLP on 512 samples of a
    teacher network plus noise, minibatches of 64, with the gradients x1e3 at `spikes`."""
    torch.manual_seed(seed)
    x = torch.randn(512 + 2048, 16)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        y = teacher(x) + 0.1 * torch.randn(len(x), 1)
    xv, yv, x, y = x[512:], y[512:], x[:512], y[:512]
    torch.manual_seed(seed + 1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = make(model.parameters())
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if t in spikes:
            for p in model.parameters():
                p.grad.mul_(1e3)
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(xv), yv).item()


def _spike_steps():
    g = torch.Generator().manual_seed(8)
    return set(torch.randint(60, 280, (5,), generator=g).tolist())


# Bounds. Measured (seeds 7-9, 32- and 8-bit states): AdamW's spiky runs end 14x-127x above
# their spike-free validation loss; SPAM (threshold 50) within 0.97x-1.03x and Stable-SPAM
# within 0.81x-1.06x of theirs. So: AdamW at least 5x worse, the spike-aware ones at most 8%.
# SPAM's default threshold 5000 targets element-wise spikes: against whole-gradient x1e3 spikes
# each clipped spike still inflates v about 6x (1 + (1 - beta2) * 5000), and the run ends ~12x
# worse here, so this test uses threshold 50.
@pytest.mark.parametrize("bits", [32, 8])
def test_spike_aware_optimizers_absorb_gradient_spikes(bits):
    spikes = _spike_steps()
    kw = dict(lr=1e-2, state_bits=bits, min_quant_numel=0)
    makers = {
        "adamw": lambda ps: lo.AdamW(ps, weight_decay=0.0, **kw),
        "spam": lambda ps: lo.SPAM(ps, threshold=50, **kw),
        "stable_spam": lambda ps: lo.StableSPAM(ps, **kw),
    }
    ratio = {name: _val_loss(make, spikes) / _val_loss(make, set())
             for name, make in makers.items()}
    assert ratio["adamw"] > 5.0, ratio
    assert ratio["spam"] < 1.08, ratio
    assert ratio["stable_spam"] < 1.08, ratio


def _late_rows_moved(eps_floor):
    """4-bit states, SPAM's spike clip (grace 5): rows 0-31 of a 64x64 weight get gradients from
    step 1, rows 32-63 only from step 30 on — their v is exactly 0 then (whole 128-element blocks
    of zeros: absmax 0). Returns how far each half moved in steps 30-60 and the late rows' v."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(64, 64))
    policy = clip.SpikeClip(threshold=5000, grace=5, reset_interval=0, eps_floor=eps_floor)
    opt = lo.AdamW4bit([w], lr=1e-3, weight_decay=0.0, clip=policy)
    before = None
    for t in range(1, 61):
        g = torch.randn(64, 64)
        if t < 30:
            g[32:] = 0.0
        if t == 30:
            before = w.detach().clone()
        w.grad = g
        opt.step()
    moved = (w.detach() - before).abs()
    v = opt._moments_fp32(w, opt.state[w], ("exp_avg", "exp_avg_sq"), (4, 128))[1]
    return moved[:32].mean().item(), moved[32:].mean().item(), v[32:]


def test_zero_second_moment_does_not_freeze_parameters():
    early, late, v_late = _late_rows_moved(eps_floor=0.0)  # SPAM's rule as published
    assert early > 1e-3 and late == 0.0 and (v_late == 0).all()  # the hazard: frozen for good
    early, late, v_late = _late_rows_moved(eps_floor=None)  # lowbit's default: floor eps^2
    assert late > 0.5 * early and (v_late > 0).all()
