"""The reference Adam/AdamW step (the spec of issue 3's fused kernels) against torch.optim and
against the state-quantization bars of bitsandbytes' own optimizer tests."""
import pytest
import torch

import lowbit
from lowbit.reference import optim as ref


def _torch_run(opt_cls, p0, grads, **kw):
    p = p0.clone().requires_grad_()
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    st = opt.state[p]
    return p.detach(), st["exp_avg"], st["exp_avg_sq"]


def _ref_run(p0, grads, state_bits=32, **kw):
    p = p0.clone()
    state = ref.init_state(p, state_bits)
    for step, g in enumerate(grads, start=1):
        p = ref.adam_step(p, g, state, step=step, state_bits=state_bits, **kw)
    m, v = ref.load_moments(state, p, state_bits)
    return p, m, v


HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.mark.parametrize("shape", [(1,), (4097,), (64, 129)], ids=str)
@pytest.mark.parametrize("variant", ["adamw", "adam_l2", "adamw_maximize"])
def test_32bit_reference_matches_torch_over_100_steps(shape, variant):
    # bitsandbytes' 32-bit tolerance (research §4.4): fp32 atol 1e-6 / rtol 1e-5. torch may fuse
    # some multiply-adds (lerp/addcmul), so the two differ by fp32 rounding, not by the rule.
    p0 = torch.randn(shape) * 0.1
    grads = [torch.randn(shape) * 0.01 for _ in range(100)]
    maximize = variant == "adamw_maximize"
    if variant == "adam_l2":
        want = _torch_run(torch.optim.Adam, p0, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=1e-2)
        got = _ref_run(p0, grads, weight_decay=1e-2, decoupled=False, **HYPER)
    else:
        want = _torch_run(torch.optim.AdamW, p0, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=1e-2, maximize=maximize)
        got = _ref_run(p0, grads, weight_decay=1e-2, maximize=maximize, **HYPER)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


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


@pytest.mark.parametrize("state_bits", [8, 4])
def test_quantized_state_protocol(state_bits):
    # bitsandbytes' test_optimizer8bit protocol (research §4.4): every step, compare the
    # quantized state with the exact fp32 update of the same (dequantized) old state, then reset
    # the exact side to the dequantized state so errors measure one step, not drift.
    m_code, v_code, block = ref.STATE_FORMATS[state_bits]
    shape = (256, 33)
    p = torch.randn(shape) * 0.1
    p_exact = p.clone()
    state = ref.init_state(p, state_bits)
    m_exact, v_exact = ref.load_moments(state, p, state_bits)
    for step in range(1, 51):
        g = torch.randn(shape) * 0.01
        sc = ref.adam_scalars(1e-3, 0.9, 0.999, 1e-8, 1e-2, step)
        p_exact, m_exact, v_exact = ref.adam_update(p_exact, g, m_exact, v_exact, sc)
        p = ref.adam_step(p, g, state, step=step, state_bits=state_bits, weight_decay=1e-2,
                          **HYPER)
        m_q, v_q = ref.load_moments(state, p, state_bits)
        # the parameter update uses the unquantized new moments: identical to the exact side
        assert torch.equal(p, p_exact)
        for exact, deq, absmax, name in ((m_exact, m_q, state["exp_avg_absmax"], m_code),
                                         (v_exact, v_q, state["exp_avg_sq_absmax"], v_code)):
            per_elem = absmax.repeat_interleave(block)[:exact.numel()].view(shape)
            # plus a few fp32 ulps of absmax for rounding code * absmax and the difference
            bound = (_nearest_error_bound(name) + 2.0**-21) * per_elem
            assert ((deq - exact).abs() <= bound).all(), (name, step)
            if state_bits == 8:   # bitsandbytes' 8-bit state bar: < 20 mismatches
                assert (~torch.isclose(exact, deq, atol=3e-3, rtol=1e-3)).sum() < 20
        m_exact, v_exact = m_q, v_q


def test_quantized_states_train_close_to_fp32():
    # A small noisy regression, 300 steps at a learning rate that reaches the noise floor: the
    # 8-bit and 4-bit reference optimizers end within 1% / 2% of the fp32 loss (issue 3's
    # training-parity bars, here on the reference; the kernels must match it exactly).
    torch.manual_seed(0)
    X = torch.randn(512, 64)
    w_true = torch.randn(64, 1)
    y = X @ w_true + 0.1 * torch.randn(512, 1)

    def train(state_bits):
        w = torch.zeros(64, 65)   # 64*65 = 4160 elements: above the 4096 quantization floor
        state = ref.init_state(w, state_bits)
        for step in range(1, 301):
            wg = w.clone().requires_grad_()
            loss = ((X @ wg[:, :1] - y) ** 2).mean() + 1e-3 * (wg[:, 1:] ** 2).mean()
            loss.backward()
            w = ref.adam_step(w, wg.grad, state, step=step, state_bits=state_bits, lr=5e-2,
                              beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        return ((X @ w[:, :1] - y) ** 2).mean().item()

    base = train(32)
    assert train(8) <= base * 1.01 + 1e-6
    assert train(4) <= base * 1.02 + 1e-6
