"""The reference fused step (the spec of every backend's kernel) against torch.optim and the Lion
paper's rule; and bitsandbytes' own 8-bit optimizer acceptance bars on every backend."""
import pytest
import torch

import lowbit
from lowbit.reference import optim as ref
from conftest import kernel_backend_params
from optim_helpers import RefTensor

# (the optimizer-level tests, test_optim_torch_parity.py, add 1024x1024 through the kernels)
SHAPES = [(1,), (4097,), (64, 129)]


def _torch_run(opt_cls, p0, grads, **kw):
    p = p0.clone().requires_grad_()
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]


def _lion_rule(p0, grads, lr, betas, wd):
    # Chen et al. 2023, Algorithm 2, written directly in float64
    p, m = p0.double(), torch.zeros_like(p0, dtype=torch.float64)
    for g in grads:
        g = g.double()
        c = betas[0] * m + (1 - betas[0]) * g
        p = p * (1 - lr * wd) - lr * torch.sign(c)
        m = betas[1] * m + (1 - betas[1]) * g
    return p.float(), m.float()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["adamw", "adam_l2", "adamw_maximize"])
def test_adam_32bit_matches_torch_over_100_steps(shape, variant):
    # bitsandbytes' 32-bit tolerance (research §4.4): fp32 atol 1e-6 / rtol 1e-5. torch may fuse
    # some multiply-adds (lerp/addcmul), so the two differ by fp32 rounding, not by the rule.
    steps = 100
    p0 = torch.randn(shape) * 0.1
    grads = [torch.randn(shape) * 0.01 for _ in range(steps)]
    maximize = variant == "adamw_maximize"
    decoupled = variant != "adam_l2"
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    want_p, st = _torch_run(cls, p0, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=1e-2, maximize=maximize)
    r = RefTensor(p0)
    for t, g in enumerate(grads, 1):
        r.step(g, ref.adam_scalars(1e-3, 0.9, 0.999, 1e-8, 1e-2, t, decoupled), maximize=maximize)
    m, v = r.fp32_states()
    torch.testing.assert_close(r.p, want_p, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m, st["exp_avg"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v, st["exp_avg_sq"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "momentum_dampening", "nesterov_wd", "maximize"])
def test_sgd_32bit_matches_torch_over_100_steps(shape, variant):
    kw = {"plain": dict(momentum=0.0), "momentum_dampening": dict(momentum=0.9, dampening=0.2),
          "nesterov_wd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
          "maximize": dict(momentum=0.5, maximize=True)}[variant]
    steps = 100
    p0 = torch.randn(shape) * 0.1
    grads = [torch.randn(shape) * 0.01 for _ in range(steps)]
    want_p, st = _torch_run(torch.optim.SGD, p0, grads, lr=1e-2, **kw)
    r = RefTensor(p0, "sgd", nstates=1 if kw["momentum"] else 0)
    for t, g in enumerate(grads, 1):
        sc = ref.sgd_scalars(1e-2, kw["momentum"], kw.get("dampening", 0.0),
                             kw.get("weight_decay", 0.0))
        r.step(g, sc, maximize=kw.get("maximize", False), nesterov=kw.get("nesterov", False),
               first_step=t == 1)
    torch.testing.assert_close(r.p, want_p, atol=1e-6, rtol=1e-5)
    if kw["momentum"]:
        torch.testing.assert_close(r.fp32_states()[0], st["momentum_buffer"], atol=1e-6,
                                   rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lion_32bit_matches_the_paper_rule_over_100_steps(shape):
    steps = 100
    p0 = torch.randn(shape) * 0.1
    grads = [torch.randn(shape) * 0.01 for _ in range(steps)]
    want_p, want_m = _lion_rule(p0, grads, 1e-4, (0.9, 0.99), 0.1)
    r = RefTensor(p0, "lion")
    for g in grads:
        r.step(g, ref.lion_scalars(1e-4, 0.9, 0.99, 0.1))
    # sign() makes the update exact; fp32 vs float64 differences come from the decay and the
    # momentum EMA only (c's sign flips only where c is within rounding of 0)
    torch.testing.assert_close(r.p, want_p, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.fp32_states()[0], want_m, atol=1e-6, rtol=1e-5)


def test_sr_keys_differ_per_parameter_and_step():
    keys = {ref.sr_key(7, pid, step) for pid in range(50) for step in range(1, 50)}
    assert len(keys) == 50 * 49 and all(0 <= k < 2**63 for k in keys)
    assert ref.sr_key(7, 3, 5) != ref.sr_key(8, 3, 5)


def test_kahan_pair_carries_the_low_bits():
    x = torch.randn(10000) * 3
    hi, comp = ref.store_param(x, torch.bfloat16, "kahan")
    assert torch.equal(hi, x.bfloat16())
    # the fp32 difference is exact (Sterbenz), so only comp's own bf16 rounding is lost
    err = (hi.float() + comp.float() - x).abs()
    assert (err <= x.abs() * 2.0**-16).all()


def test_stochastic_write_back_is_unbiased():
    # 4000 draws of bf16(x) for x between two bf16 neighbours: the mean approaches x
    x = torch.full((4000,), 1.0 + 2.0**-9)   # 1/4 of the way from 1 to the next bf16 (1+2^-7)
    r = torch.stack([ref.store_param(x, torch.bfloat16, "stochastic", key)[0].float()
                     for key in (11, 12)]).reshape(-1)
    p_up = ((r - 1.0) / 2.0**-7).mean().item()
    assert abs(p_up - 0.25) < 4 * (0.25 * 0.75 / r.numel()) ** 0.5
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0**-7}


# Largest |dequant(quant(x)) - x| / absmax of nearest rounding with each state codebook, for
# normalized values in [-1, 1] (signed maps) or [0, 1] (unsigned ones): half the widest gap
# between neighbouring codes, or the distance from the end of the range to the end code (the
# signed dynamic maps have no -1; the zero-free map's smallest code is 1/16, so values below it
# round up). Derived from the tables, not measured.
def _nearest_error_bound(name):
    book = lowbit.codebook(name).double()
    low_end = -1.0 if book[0] < 0 else 0.0
    return max(((book[1:] - book[:-1]) / 2).max().item(), book[0].item() - low_end,
               1.0 - book[-1].item())


@pytest.mark.parametrize("backend", ["reference"] + kernel_backend_params())
@pytest.mark.parametrize("state_bits", [8, 4])
@pytest.mark.parametrize("dtype, wb", [(torch.float32, "f32"), (torch.bfloat16, "nearest"),
                                       (torch.bfloat16, "stochastic")], ids=str)
def test_quantized_state_protocol(backend, state_bits, dtype, wb):
    # bitsandbytes' test_optimizer8bit protocol (research §4.4), on every backend: 50 steps,
    # each compares the quantized state with the exact fp32 update of the same (dequantized) old
    # state, then resets the exact side to the dequantized state so errors measure one step, not
    # drift. States: bnb's bar (< 20 elements off by more than atol 3e-3 / rtol 1e-3) for 8-bit,
    # and the codebooks' own nearest-rounding bound for both widths. Params: bnb's bars are
    # err.mean <= 6e-5 (fp32) and <= 1.7e-4 / relerr.mean <= 1.6e-3 (bf16, round-to-nearest);
    # ours are stricter: equal to the exact update (fp32) or to its round-to-nearest (bf16), and
    # for stochastic rounding within one bf16 ulp with mean relative error <= 2^-8 (an SR error is
    # at most one ulp, on average at most half of one, and an ulp is at most 2^-7 relative).
    m_code, v_code, block = ref.STATE_FORMATS[state_bits]
    shape = (1024, 33)
    p = (torch.randn(shape) * 0.1).to(dtype)
    q = RefTensor(p, state_bits=state_bits, writeback=wb, backend=backend)
    for step in range(1, 51):
        g = (torch.randn(shape) * 0.01).to(dtype)
        sc = ref.adam_scalars(1e-3, 0.9, 0.999, 1e-8, 1e-2, step)
        m_old, v_old = q.fp32_states()
        x_exact, m_exact, v_exact, _ = ref.update("adam", q.p.float(), g, m_old, v_old, sc,
                                               ref.step_flags("adam", sc))
        q.step(g, sc, key=step)
        m_q, v_q = q.fp32_states()
        if wb == "f32":
            # the parameter update uses the unquantized new moments: identical to the exact side
            assert torch.equal(q.p, x_exact)
        elif wb == "nearest":
            assert torch.equal(q.p, x_exact.bfloat16())
        else:
            err = (q.p.float() - x_exact).abs()
            assert (err <= x_exact.abs() * 2.0**-7).all()
            assert (err / (x_exact.abs() + 1e-9)).mean() <= 2.0**-8
        for exact, deq, absmax, name in ((m_exact, m_q, q.states[1][0], m_code),
                                         (v_exact, v_q, q.states[3][0], v_code)):
            per_elem = absmax.repeat_interleave(block)[:exact.numel()].view(shape)
            # plus a few fp32 ulps of absmax for rounding code * absmax and the difference
            bound = (_nearest_error_bound(name) + 2.0**-21) * per_elem
            assert ((deq - exact).abs() <= bound).all(), (name, step)
            if state_bits == 8:   # bitsandbytes' 8-bit state bar: < 20 mismatches
                assert (~torch.isclose(exact, deq, atol=3e-3, rtol=1e-3)).sum() < 20
