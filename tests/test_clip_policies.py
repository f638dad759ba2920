"""Clip policies inside the fused step: against pytorch-optimizer's SPAM / StableSPAM / AdaGC
(32-bit states, its CPU code path), against torch's clip_grad_value_ / clip_grad_norm_ followed by
the unclipped step, bit for bit across backends for 32/8/4-bit states, and resumed from a
checkpoint mid-training."""
import copy
import io
import math

import pytest
import torch

import lowbit.optim as lo
from lowbit import clip, ops
from conftest import kernel_backend_params

SHAPES = [(17, 33), (50,), (64, 64), (3,)]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in SHAPES]


def _grads(step, dtype=torch.float32, spikes=(7, 19, 33, 46), scale=1.0):
    """Gradients of one step: N(0, scale^2), with every element of one tensor x1000 at the spike
    steps and single-element spikes elsewhere."""
    g = torch.Generator().manual_seed(1000 + step)
    out = [torch.randn(s, generator=g) * scale for s in SHAPES]
    if step in spikes:
        out[step % len(SHAPES)] *= 1000.0
        out[(step + 1) % len(SHAPES)].view(-1)[1] *= 5000.0
    return [x.to(dtype) for x in out]


def _run(opt, params, steps, **gkw):
    for t in range(1, steps + 1):
        for p, g in zip(params, _grads(t, params[0].dtype, **gkw)):
            p.grad = g
        opt.step()


def _close(ours, theirs, rtol, atol):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)


import pytorch_optimizer as pto  # requirements-ci.txt and the newest-triton venv install it

# Our fused step folds the bias corrections into eps and the step size and computes the clip
# coefficients in float64 (pytorch-optimizer: sqrt(v) / bc2 + eps and fp32 0-dim tensors), so the
# trajectories agree to fp32 rounding amplified by 60 steps of Adam: relative 1e-4 of the params
# (the updates themselves are ~lr = 1e-3 of them).
PTO_TOL = dict(rtol=1e-4, atol=1e-6)


def _against_pto(name, kw, steps, **gkw):
    """lowbit.optim.<name> and pytorch_optimizer.<name> with the same arguments, gradients and
    steps: the trajectories agree to PTO_TOL. Returns lowbit's optimizer."""
    ours, theirs = _params(), _params()
    a = getattr(lo, name)(ours, **kw)
    _run(a, ours, steps, **gkw)
    _run(getattr(pto, name)(theirs, **kw), theirs, steps, **gkw)
    _close(ours, theirs, **PTO_TOL)
    return a


def test_spam_matches_pytorch_optimizer():
    a = _against_pto("SPAM", dict(lr=1e-3, weight_decay=0.1, warmup_epoch=10, threshold=5000,
                                  grad_accu_steps=5, update_proj_gap=25, eps=1e-6), 60)
    assert a.last_clip_info["step"] == 60


def test_stable_spam_matches_pytorch_optimizer():
    _against_pto("StableSPAM", dict(lr=1e-3, weight_decay=0.05, gamma1=0.7, gamma2=0.9,
                                    theta=0.999, t_max=30, eta_min=0.5, update_proj_gap=20,
                                    eps=1e-8), 60)


def test_adagc_matches_pytorch_optimizer():
    a = _against_pto("AdaGC", dict(lr=1e-3, beta=0.98, lambda_abs=1.0, lambda_rel=1.05,
                                   warmup_steps=10, weight_decay=0.1, eps=1e-8), 40, scale=0.3)
    # both phases clipped: warmup against lambda_abs (norms ~9 > 1), then against gamma
    assert (a.last_clip_info["scale"] < 1).any()


@pytest.mark.parametrize("weight_decouple", [True, False])
def test_stable_adamw_matches_pytorch_optimizer(weight_decouple):
    # the spikes push RMS(g / sqrt(v_hat)) far above 1 on the spiking tensors: those steps are
    # clipped, and the decay with them
    a = _against_pto("StableAdamW", dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
                                         weight_decouple=weight_decouple, eps=1e-8), 60)
    rms = a.last_clip_info["update_rms"]
    assert rms.shape == (len(SHAPES),) and (rms > 0).all()


def test_update_clip_factor_fires_only_on_spikes():
    params = _params()
    opt = lo.StableAdamW(params)
    seen = []
    for t in range(1, 12):
        for p, g in zip(params, _grads(t, spikes=(9,))):
            p.grad = g
        opt.step()
        seen.append(opt.last_clip_info["update_rms"].clone())
    # step 1: v_hat = g^2, RMS = 1 exactly (up to eps); then about 1; the x1000 spike of step 9
    # on tensor 9 % 4 lifts its RMS to nearly sqrt((1 - beta2^9) / (1 - beta2)) = 2.94 (g^2 /
    # v_hat with v_hat = (1 - beta2) g^2 / (1 - beta2^t) for a dominant g), clipping the step
    torch.testing.assert_close(seen[0], torch.ones(len(SHAPES), dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert (seen[5] < 1.5).all()
    assert seen[8][9 % len(SHAPES)] > 2.9


def test_spam_warmup_factor_matches_pytorch_optimizer():
    from pytorch_optimizer.optimizer.spam import CosineDecay
    reset = clip.MomentumReset(interval=8, warmup_steps=5)
    cd = None
    for t in range(1, 40):
        if t % 8 == 0:
            cd = CosineDecay(0.99, 5)  # pytorch-optimizer restarts its warmup at each reset
        want = 1.0 if cd is None else 1.0 - cd.get_death_rate(t % 8)
        assert reset.warmup_factor(t) == pytest.approx(want, abs=1e-12), t


def test_beta1_schedule_matches_pytorch_optimizer():
    from pytorch_optimizer.optimizer.spam import CosineDecay
    sched, cd = clip.Beta1Cosine(12, 0.5), CosineDecay(1.0, 12, eta_min=0.5)
    for t in range(1, 20):
        assert sched.factor(t) == pytest.approx(cd.get_death_rate(t), abs=1e-12), t


# --- equivalences with the unfused sequence users write today -----------------------------------

def test_value_clip_equals_clip_grad_value_then_step():
    # clamping inside the kernel is the same fp32 operation: bit for bit
    ours, theirs = _params(), _params()
    a = lo.AdamW8bit(ours, clip=clip.ValueClip(0.5), min_quant_numel=0)
    b = lo.AdamW8bit(theirs, min_quant_numel=0)
    for t in range(1, 9):
        for p, q, g in zip(ours, theirs, _grads(t)):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        torch.nn.utils.clip_grad_value_(theirs, 0.5)
        b.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q)
    assert (a.last_clip_info["clipped"] > 0).all()


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_norm_clip_equals_clip_grad_norm_then_step(scope):
    ours, theirs = _params(), _params()
    a = lo.AdamW(ours, clip=clip.NormClip(1.0, scope=scope))
    b = lo.AdamW(theirs)
    for t in range(1, 11):
        for p, q, g in zip(ours, theirs, _grads(t)):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        if scope == "global":
            norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
            torch.testing.assert_close(a.last_clip_info["clip_norm"].float(), norm, rtol=1e-5,
                                       atol=0)
        else:
            for q in theirs:
                torch.nn.utils.clip_grad_norm_([q], 1.0)
        b.step()
    # torch's norm is an fp32 sum, ours float64: coefficients differ in the last bits
    _close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_value_clip_before_norm_clip():
    # the norm is the value-clipped gradients' (canonical order), as clip_grad_value_ then
    # clip_grad_norm_
    ours, theirs = _params(), _params()
    a = lo.AdamW(ours, clip=[clip.NormClip(2.0), clip.ValueClip(0.3)])
    b = lo.AdamW(theirs)
    for t in range(1, 6):
        for p, q, g in zip(ours, theirs, _grads(t)):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        torch.nn.utils.clip_grad_value_(theirs, 0.3)
        torch.nn.utils.clip_grad_norm_(theirs, 2.0)
        b.step()
    _close(ours, theirs, rtol=1e-5, atol=1e-7)


# --- every backend, every state width, bit for bit -------------------------------------------

PRESETS = {
    "spam": lambda ps, **kw: lo.SPAM(ps, warmup_epoch=4, grad_accu_steps=2, update_proj_gap=6,
                                     **kw),
    "stable_spam": lambda ps, **kw: lo.StableSPAM(ps, update_proj_gap=6, t_max=8, **kw),
    "adagc": lambda ps, **kw: lo.AdaGC(ps, warmup_steps=4, **kw),
    "value_norm": lambda ps, **kw: lo.AdamW(ps, clip=[clip.ValueClip(2.0),
                                                      clip.NormClip(5.0, scope="tensor")], **kw),
    "stable_adamw": lambda ps, **kw: lo.StableAdamW(ps, weight_decay=0.1, kahan_sum=False,
                                                    clip=clip.SpikeClip(50.0, 2, 0), **kw),
}


def _trajectory(preset, backend, bits, dtype, steps=13):
    params = _params(dtype)
    opt = PRESETS[preset](params, state_bits=bits, min_quant_numel=0, backend=backend)
    _run(opt, params, steps, spikes=(3, 8, 11))
    return params, opt


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_bit_exact_across_backends(backend, bits, preset):
    dtype = torch.bfloat16 if bits == 8 else torch.float32
    got, a = _trajectory(preset, backend, bits, dtype)
    want, b = _trajectory(preset, "reference", bits, dtype)
    for p, q in zip(got, want):
        assert torch.equal(p, q)
    for p, q in zip(got, want):
        for k, v in b.state[q].items():
            assert torch.equal(a.state[p][k], v), k
    assert torch.equal(a.last_clip_info["clipped"], b.last_clip_info["clipped"])


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("bits", [32, 4])
def test_resume_mid_training_is_bit_identical(preset, bits):
    dtype = torch.bfloat16
    full = _params(dtype)
    opt = PRESETS[preset](full, state_bits=bits, min_quant_numel=0)
    _run(opt, full, 7, spikes=(3,))
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in full]}, buf)
    for t in range(8, 16):  # crosses resets (interval 6) and the warmup ends
        for p, g in zip(full, _grads(t, dtype, spikes=(9,))):
            p.grad = g
        opt.step()
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(x) for x in ck["params"]]
    opt2 = PRESETS[preset](resumed, state_bits=bits, min_quant_numel=0)
    opt2.load_state_dict(ck["opt"])
    for t in range(8, 16):
        for p, g in zip(resumed, _grads(t, dtype, spikes=(9,))):
            p.grad = g
        opt2.step()
    for p, q in zip(full, resumed):
        assert torch.equal(p, q)


def test_policy_errors():
    with pytest.raises(ValueError, match="Adam-family"):
        lo.Lion(_params(), clip=clip.SpikeClip())
    with pytest.raises(TypeError, match="lowbit.clip policies"):
        lo.AdamW(_params(), clip=[0.5])
    with pytest.raises(ValueError, match="twice"):
        lo.AdamW(_params(), clip=[clip.ValueClip(1.0), clip.ValueClip(2.0)])
    with pytest.raises(ValueError, match="density"):
        lo.SPAM(_params(), density=0.5)
    with pytest.raises(ValueError, match="max_norm"):
        clip.NormClip(0.0)


def test_clip_state_in_state_dict():
    params = _params()
    opt = lo.StableSPAM(params)
    _run(opt, params, 3)
    sd = opt.state_dict()
    assert sd["clip"] == {"step": 3}
    st = sd["state"][0]
    for name in ("adaclip_max", "adagn_mu", "adagn_nu"):
        assert st[name].shape == () and st[name].dtype == torch.float32 and st[name] > 0
    # a torch AdamW checkpoint loads (fresh policy states, clock from 0)
    p2 = _params()
    t_opt = torch.optim.AdamW(p2)
    for p in p2:
        p.grad = torch.ones_like(p)
    t_opt.step()
    fresh = lo.StableSPAM(p2)
    fresh.load_state_dict(copy.deepcopy(t_opt.state_dict()))
    assert fresh._clip_step == 0 and fresh.state[p2[0]]["adagn_mu"].item() == 0.0
    fresh.step()
    assert math.isfinite(fresh.state[p2[0]]["adagn_mu"].item())


def test_telemetry():
    params = _params()
    opt = lo.SPAM(params, grad_accu_steps=2, update_proj_gap=5)
    grads = None
    for t in range(1, 8):
        grads = _grads(t, spikes=(7,))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    info = opt.last_clip_info
    assert info["step"] == 7 and info["spike_clip"] and not info["reset"]
    want = torch.stack([g.double().square().sum() for g in grads])
    torch.testing.assert_close(info["tensor_norms"], want.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(info["grad_norm"], want.sum().sqrt(), rtol=1e-12, atol=0)
    # step 7 spikes tensor 7 % 4 = 3 (x1000, every element) and one element of tensor 0
    assert info["clipped"][3] == params[3].numel() and info["clipped"][0] >= 1
    assert all(isinstance(v, torch.Tensor) for k, v in info.items()
               if k in ("grad_norm", "tensor_norms", "scale", "clipped"))


def test_rank1_second_moments_refuse_clipping():
    with pytest.raises(ValueError, match="rank1"):
        lo.AdamW4bit(_params(), clip=clip.NormClip(1.0), second_moment_norm="rank1")


# --- Stable-SPAM's AdaGN norm from the captured elements (one statistics pass) --------------------

@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_adagn_norm_from_capture_equals_second_pass(scale):
    # the norm after AdaClip from the elements above the lower threshold equals the second pass's
    # exactly in float64 terms for s = 1 and to ~1e-8 (fp32 products) for s < 1
    from lowbit.clip.policies import ClipContext
    from lowbit.reference import clip as clip_ref
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(s, generator=g) for s in ((300,), (64, 65), (7,))]
    grads[1].view(-1)[:40] *= 30.0  # elements far above the others: AdaClip's targets
    tau = torch.tensor([1.5, 3.0, 0.1])
    over = torch.zeros(3, 1024)
    count = torch.zeros(3, dtype=torch.int64)
    raw = ops.grad_stats(grads, "cpu", tau=tau, over=over, over_count=count)
    ctx = ClipContext(grads, raw, 5, "cpu", torch.device("cpu"))
    ctx.capture = (over, count)
    ctx.multiply_scale(torch.full((3,), scale, dtype=torch.float64))
    ctx._sync_table()
    ctx.table[:, 1] = torch.tensor([2.0, 20.0, 0.5]) * scale  # thresholds T >= tau * s
    ctx.table[:, 2] = torch.tensor([0.5, 0.1, 0.9])
    ctx.flags |= clip_ref.ADA_CLIP
    fast = ctx.norms_after_adaclip()
    slow = ctx.transformed_stats()[:, 0].sqrt()
    rtol = 1e-13 if scale == 1.0 else 1e-7
    torch.testing.assert_close(fast, slow, rtol=rtol, atol=0)
    assert (fast < raw[:, 0].sqrt() * scale).all()  # the clip did cut each norm


def test_stable_spam_takes_one_statistics_pass(monkeypatch):
    calls = []
    real = ops.grad_stats_eager
    monkeypatch.setattr(ops, "grad_stats_eager", lambda *a, **k: calls.append(1) or real(*a, **k))
    params = _params()
    opt = lo.StableSPAM8bit(params, min_quant_numel=0)
    per_step = []
    for t in range(1, 8):
        for p, g in zip(params, _grads(t, spikes=(5,))):
            p.grad = g
        before = len(calls)
        opt.step()
        per_step.append(len(calls) - before)
    # step 1: the lower threshold is 0 (no max EMA yet), the 64x64 tensor overflows the capture
    # and the second pass runs; afterwards one pass per step, spikes included
    assert per_step[0] == 2 and per_step[1:] == [1] * 6, per_step
