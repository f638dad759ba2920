"""lowbit's clip policies against the unfused paper references of lowbit.reference.clip_papers:
every policy x every kernel backend x 32/8/4-bit states, over 40 steps with gradient spikes, on
awkward shapes; plus checks of the references themselves (torch's clip functions,
pytorch-optimizer's SPAM / StableSPAM / AdaGC / StableAdamW at 32 bits)."""
import functools
import math

import pytest
import torch

import lowbit.optim as lo
from lowbit import clip, codebooks
from lowbit.reference import clip_papers as paper
from lowbit.reference.optim import STATE_FORMATS
from lowbit.reference.quant import unpack_nibbles
from conftest import kernel_backend_params

import pytorch_optimizer as pto  # requirements-ci.txt installs it

# (9, 31): 279 elements = 2 blocks of 256 (8-bit) / 3 of 128 (4-bit), both with a partial last
# block, odd (a 4-bit tail nibble); (50,): one partial block; (3,): tiny. The Triton interpreter
# pays ~50-150 ms per step for these, too slow for 24 runs of 40 steps, so it gets two tensors:
# (3, 37) = 111 elements (odd, one partial block) and (5,). (Its multi-block paths equal the
# other backends bit for bit: tests/test_clip_policies.py.)
SHAPES = [(9, 31), (50,), (3,)]
TRITON_SHAPES = [(3, 37), (5,)]
STEPS = 40
# Spikes at steps that SPAM's clip sees (interval 20, grace 5: t % 20 >= 5), crossing both resets.
SPIKES = (7, 19, 27, 33, 38)
LR = 1e-2  # large enough that 40 updates dwarf the fp32 rounding of the parameters


def _params(shapes=SHAPES):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) * 0.1 for s in shapes]


def _grads(step, shapes=SHAPES, scale=1.0):
    """N(0, scale^2) gradients; at the spike steps one tensor x1000 and one element of the next
    x5000 (as tests/test_clip_policies.py). They do not depend on the parameters, so the moments
    of both sides see the same inputs and only rounding can make them drift apart."""
    g = torch.Generator().manual_seed(1000 + step)
    out = [torch.randn(s, generator=g) * scale for s in shapes]
    if step in SPIKES:
        out[step % len(shapes)] *= 1000.0
        out[(step + 1) % len(shapes)].view(-1)[1] *= 5000.0
    return out


# name -> (lowbit optimizer factory, paper reference factory(params, bits, on)); on=False is the
# same reference with the policy switched off, to show the data make it fire.
SPAM_KW = dict(lr=LR, weight_decay=0.1, warmup_epoch=8, grad_accu_steps=5, update_proj_gap=20)
SSPAM_KW = dict(lr=LR, weight_decay=0.05, t_max=30, update_proj_gap=20)


def _adamw(lowbit_policies, paper_policies, wd=1e-2):
    def ours(ps, **kw):
        return lo.AdamW(ps, lr=LR, weight_decay=wd, clip=lowbit_policies(), **kw)

    def ref(ps, bits, on=True):
        return paper.AdamW(ps, lr=LR, weight_decay=wd, state_bits=bits,
                           policies=paper_policies() if on else [])
    return ours, ref


POLICIES = {
    "value": _adamw(lambda: clip.ValueClip(2.0), lambda: [paper.ValueClip(2.0)]),
    "global_l2": _adamw(lambda: clip.NormClip(5.0), lambda: [paper.GlobalNormClip(5.0)]),
    "global_inf": _adamw(lambda: clip.NormClip(3.0, norm_type=math.inf),
                         lambda: [paper.GlobalNormClip(3.0, math.inf)]),
    "per_tensor": _adamw(lambda: clip.NormClip(5.0, scope="tensor"),
                         lambda: [paper.TensorNormClip(5.0)]),
    # listed out of order on purpose: lowbit sorts them, the user applies value clip first
    "value_then_norm": _adamw(lambda: [clip.NormClip(5.0), clip.ValueClip(2.0)],
                              lambda: [paper.ValueClip(2.0), paper.GlobalNormClip(5.0)]),
    "adagc": (lambda ps, **kw: lo.AdaGC(ps, lr=LR, weight_decay=0.1, warmup_steps=10, **kw),
              lambda ps, bits, on=True: paper.AdamW(
                  ps, lr=LR, weight_decay=0.1, state_bits=bits,
                  policies=[paper.AdaGCClip(warmup_steps=10)] if on else [])),
    "spam": (lambda ps, **kw: lo.SPAM(ps, **SPAM_KW, **kw),
             lambda ps, bits, on=True: paper.SPAM(ps, **SPAM_KW, state_bits=bits,
                                                  threshold=5000.0 if on else 0.0)),
    "stable_spam": (lambda ps, **kw: lo.StableSPAM(ps, **SSPAM_KW, **kw),
                    lambda ps, bits, on=True: paper.StableSPAM(ps, **SSPAM_KW, state_bits=bits,
                                                               adaclip=on)),
    "stable_adamw": (lambda ps, **kw: lo.StableAdamW(ps, lr=LR, weight_decay=0.1,
                                                     kahan_sum=False, **kw),
                     lambda ps, bits, on=True: paper.StableAdamW(
                         ps, lr=LR, weight_decay=0.1, state_bits=bits,
                         threshold=1.0 if on else math.inf)),
}

# --- tolerances ---------------------------------------------------------------------------------
# Deviations are measured per tensor as max|p_lowbit - p_paper| / max|p_paper - p_0|: relative to
# the size of the total update, so the bound means the same thing for every shape and lr.
#
# Rounding: both sides evaluate the same formulas in fp32 in another order (lowbit folds the bias
# corrections into eps and the step size, computes the clip factors in float64 from float64 sums;
# the reference divides by bc2 and takes fp32 norms), so each step's update differs by ~1e-7
# to 1e-6 of itself (measured scale factors agree to <= 5e-7); the gradients do not depend on the
# parameters, so these errors add over 40 steps without feedback, to ~1e-6 of the total update
# (measured: <= 1.1e-6 over all policies, widths and backends). 1e-5 leaves ~10x headroom.
# (pytorch-optimizer parity, tests/test_clip_policies.py, allows rtol 1e-4 of the *parameters*,
# about 1e-4 of the total update here: this is ~10x sharper.)
ROUNDING_TOL = 1e-5
# Low-bit states: lowbit and the reference round the same fp32 state to its nearest code; when the
# two fp32 values straddle a code midpoint (they differ by ~1 ulp), one state element lands on the
# neighbouring code. One such flip moves m by at most the largest gap of the first state's
# codebook times the block absmax (dynamic: 0.014, dynamic4: 0.225); the error fades with beta1
# over ~1 / (1 - beta1) = 10 steps, so it moves the parameter by about gap * 10 steps' updates,
# i.e. gap * 10 / STEPS of the total update. (A v flip costs less: the step sees sqrt(v).) The
# budget is charged per flip actually observed in the tensor's codes, so without flips the bound
# is the fp32 one.
HORIZON = 10


def _flip_cost(bits):
    code = codebooks.codebook(STATE_FORMATS[bits][0]).double().sort().values
    return float((code[1:] - code[:-1]).max()) * HORIZON / STEPS


# Flips are rare (a pair of fp32 values 1 ulp apart straddles one of the code midpoints): at most
# 1e-3 of the (step, element, state) codes may differ (measured: 0, and 6 of 26560 = 2.3e-4 for
# one configuration).
MAX_FLIP_FRACTION = 1e-3
# Clip-factor telemetry: norms of <= 279 fp32 values (reference) vs float64 (lowbit); relative
# error of an fp32 sum of n terms <= n * 2^-24 = 1.7e-5 worst case, ~sqrt(n) * 2^-24 typically.
SCALE_RTOL = 2e-5
# A policy "fires" on this data if the reference without it ends >= this far (relative to the
# total update) from lowbit in some tensor, and that is >= 10x the tolerance of the test.
MIN_POLICY_EFFECT = 0.05


def _codes(t, n, bits):
    return unpack_nibbles(t.reshape(-1), n) if bits == 4 else t.reshape(-1).long()


@functools.lru_cache(maxsize=None)
def _paper_run(policy, bits, shapes, on=True):
    """(final params, per-step info, per-step codes) of the paper reference (shared by the
    backends; callers must not modify them)."""
    params = _params(shapes)
    ref = POLICIES[policy][1](params, bits, on)
    infos, codes = [], []
    for t in range(1, STEPS + 1):
        ref.step(_grads(t, shapes))
        infos.append(ref.info)
        codes.append([tuple(c) for c in ref.moments.codes] if bits < 32 else None)
    return params, infos, codes


@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_matches_paper_reference(policy, backend, bits):
    shapes = tuple(TRITON_SHAPES if backend == "triton" else SHAPES)
    p0 = _params(shapes)
    params = [torch.nn.Parameter(x.clone()) for x in p0]
    opt = POLICIES[policy][0](params, state_bits=bits, min_quant_numel=0, backend=backend)
    want, infos, ref_codes = _paper_run(policy, bits, shapes)
    n = len(shapes)
    flips = torch.zeros(n, 2, dtype=torch.int64)  # per tensor: (m, v) codes that differ
    clipped_diff, clipped_total, scale_err, fired_scale = 0, 0, 0.0, False
    for t in range(1, STEPS + 1):
        for p, g in zip(params, _grads(t, shapes)):
            p.grad = g
        opt.step()
        ours, ref = opt.last_clip_info, infos[t - 1]
        # the clip factors: a sharp check independent of the states
        scale = ours["scale"].cpu()
        scale_err = max(scale_err, float(((scale - ref["scale"]).abs() / ref["scale"]).max()))
        fired_scale |= bool((ref["scale"] < 1).any())
        clipped_diff += int((ours["clipped"].cpu() - ref["clipped"]).abs().sum())
        clipped_total += int(ref["clipped"].sum())
        if "spike_clip" in ref:
            assert ours["spike_clip"] == ref["spike_clip"], t
        if "eta_ratio" in ref:  # update clipping: lr / max(1, RMS) per tensor, over lr
            factor = 1.0 / ours["update_rms"].cpu().clamp_min(1.0)
            torch.testing.assert_close(factor, ref["eta_ratio"], rtol=SCALE_RTOL, atol=0)
            fired_scale |= bool((ref["eta_ratio"] < 1).any())
        if "adagn_norm" in ref:
            torch.testing.assert_close(ours["adagn_norm"].cpu(), ref["adagn_norm"],
                                       rtol=SCALE_RTOL, atol=0)
        if bits < 32:
            for i, p in enumerate(params):
                for j, name in enumerate(("exp_avg", "exp_avg_sq")):
                    a = _codes(opt.state[p][name + "_codes"], p.numel(), bits)
                    b = _codes(ref_codes[t - 1][i][2 * j], p.numel(), bits)
                    flips[i, j] += int((a != b).sum())
    numel = sum(p.numel() for p in params)
    assert int(flips.sum()) <= MAX_FLIP_FRACTION * 2 * numel * STEPS, flips.tolist()
    assert scale_err <= SCALE_RTOL, scale_err
    # element-wise clip decisions (value clip, AdaClip: from the gradients alone) must agree
    # exactly; SPAM's compares g^2 with v, so a flipped v code may change one decision
    assert clipped_diff <= int(flips[:, 1].sum()), (clipped_diff, clipped_total)
    cost = _flip_cost(bits) if bits < 32 else 0.0
    knocked_out = _paper_run(policy, bits, shapes, on=False)[0]
    effects = []  # how far the reference without the policy ends, over the tolerance
    for i, (p, q, q_off, x0) in enumerate(zip(params, want, knocked_out, p0)):
        total_update = float((q - x0).abs().max())
        dev = float((p.detach() - q).abs().max()) / total_update
        tol = ROUNDING_TOL + cost * int(flips[i].sum())
        assert dev <= tol, (shapes[i], dev, tol, flips[i].tolist())
        effect = float((p.detach() - q_off).abs().max()) / total_update
        effects.append((effect, effect / tol))
    # the policy fired: its element-wise clips changed elements or its factors went below 1, and
    # without it the trajectory of some tensor ends far outside the tolerance
    assert clipped_total > 0 or fired_scale
    assert any(e >= MIN_POLICY_EFFECT and r >= 10.0 for e, r in effects), effects


# --- the references themselves ------------------------------------------------------------------

def _torch_grads(t):
    return [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES], _grads(t)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_global_norm_clip_is_torch_clip_grad_norm_(norm_type):
    for t in (1, 7):  # a plain step and a spike
        ps, gs = _torch_grads(t)
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, 3.0, norm_type=norm_type)
        info = {"scale": torch.ones(len(gs), dtype=torch.float64),
                "clipped": torch.zeros(len(gs), dtype=torch.int64)}
        out = paper.GlobalNormClip(3.0, norm_type)(gs, info)
        torch.testing.assert_close(info["clip_norm"], total)
        for p, g in zip(ps, out):
            torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=0)
        assert t != 7 or (info["scale"] < 1).all()  # the spike step is clipped


def test_value_and_tensor_clips_are_torch_clip_grad_():
    ps, gs = _torch_grads(7)
    info = {"scale": torch.ones(len(gs), dtype=torch.float64),
            "clipped": torch.zeros(len(gs), dtype=torch.int64)}
    out = paper.TensorNormClip(5.0)(paper.ValueClip(2.0)(gs, info), info)
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_value_(ps, 2.0)
    for p in ps:
        torch.nn.utils.clip_grad_norm_([p], 5.0)
    for p, g in zip(ps, out):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=0)
    assert info["clipped"].tolist() == [int((g.abs() > 2.0).sum()) for g in gs]


def _against_pto(ref, theirs_cls, kw, steps=STEPS, scale=1.0):
    ours = ref.params
    theirs = [torch.nn.Parameter(x) for x in _params()]
    opt = theirs_cls(theirs, **kw)
    infos = []
    for t in range(1, steps + 1):
        gs = _grads(t, scale=scale)
        ref.step(gs)
        infos.append(ref.info)
        for p, g in zip(theirs, gs):
            p.grad = g.clone()
        opt.step()
    # pytorch-optimizer's parity tolerance (tests/test_clip_policies.py PTO_TOL)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-6)
    return infos


def test_spam_reference_is_pytorch_optimizers_spam():
    kw = dict(SPAM_KW, threshold=5000, eps=1e-6)
    infos = _against_pto(paper.SPAM(_params(), **kw), pto.SPAM, kw)
    assert sum(int(i["clipped"].sum()) for i in infos) > 0


def test_stable_spam_reference_is_pytorch_optimizers_stable_spam():
    infos = _against_pto(paper.StableSPAM(_params(), **SSPAM_KW), pto.StableSPAM, SSPAM_KW)
    assert sum(int(i["clipped"].sum()) for i in infos) > 0


def test_adagc_reference_is_pytorch_optimizers_adagc():
    kw = dict(lr=LR, weight_decay=0.1, warmup_steps=10)
    ref = paper.AdamW(_params(), lr=LR, weight_decay=0.1,
                      policies=[paper.AdaGCClip(warmup_steps=10)])
    infos = _against_pto(ref, pto.AdaGC, kw)
    assert all((i["scale"] < 1).any() for i in infos[9:])  # clipping after the warmup too


def test_stable_adamw_reference_is_pytorch_optimizers_stable_adamw():
    kw = dict(lr=LR, weight_decay=0.1)
    infos = _against_pto(paper.StableAdamW(_params(), **kw), pto.StableAdamW, kw)
    ratios = torch.stack([i["eta_ratio"] for i in infos])
    assert (ratios[SPIKES[0] - 1] < 0.5).any() and ratios[0].eq(1.0).all()  # fires at spikes


def test_stable_adamw_reference_decay_variants():
    # decay="lr" (Wortsman's gist) decays by lr * wd whatever the clip, "clipped" by eta * wd: from
    # the same state, one clipped step of each differs by exactly p * wd * (lr - eta)
    wd, t = 0.1, SPIKES[0]
    before = paper.StableAdamW(_params(), lr=LR, weight_decay=wd)
    for s in range(1, t):
        before.step(_grads(s))
    after = {}
    for decay in ("clipped", "lr"):
        ref = paper.StableAdamW([p.clone() for p in before.params], lr=LR, weight_decay=wd,
                                decay=decay)
        ref.t = before.t
        ref.moments.m = [m.clone() for m in before.moments.m]
        ref.moments.v = [v.clone() for v in before.moments.v]
        ref.step(_grads(t))
        after[decay] = ref
    eta = after["clipped"].info["eta_ratio"] * LR
    torch.testing.assert_close(eta, after["lr"].info["eta_ratio"] * LR, rtol=0, atol=0)
    assert (eta < 0.5 * LR).any()  # the spike step is clipped
    for a, b, p, e in zip(after["clipped"].params, after["lr"].params, before.params, eta):
        # a and b are ~0.1 and rounded to fp32 (ulp ~1e-8): atol of a few ulps
        torch.testing.assert_close(a - b, p * wd * (LR - float(e)), rtol=1e-3, atol=1e-7)
