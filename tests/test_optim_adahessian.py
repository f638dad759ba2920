"""AdaHessian (lowbit.optim.adahessian): step for step against the official update
(lowbit.reference.curvature) for hessian_power 1 and 1/2, both bias-correction counts and the
update_period cadence, and against pytorch-optimizer 4.1.0; Hutchinson through step(closure);
|·| and spatial averaging; convergence; 8/4-bit tracking with the derived state bound; cpu ==
reference bit for bit; resume; errors."""
import io

import pytest
import torch

from lowbit.hessian import probe
from lowbit.optim import AdaHessian, AdaHessian4bit, AdaHessian8bit
from lowbit.optim._curvature import probe_seed
from lowbit.optim.adahessian import spatial_average
from lowbit.reference import curvature as cref
from conftest import kernel_backend_params
from curvature_helpers import (EmaBound, block_absmax, fp32_states, quant_delta, same_state,
                               softmax_regression_optimum)

SHAPES = [(7,), (5, 6), (2, 3, 2, 2)]
NONE = (1, 1, 1, 1)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


@pytest.mark.parametrize("power,bc,wd,maximize", [(1, "refreshes", 0.0, False),
                                                  (0.5, "refreshes", 0.05, True),
                                                  (1, "steps", 0.01, False)])
def test_matches_official_update_step_for_step(power, bc, wd, maximize):
    ps = _params()
    plain = [p.detach().clone() for p in ps]
    st = [(torch.zeros_like(x), torch.zeros_like(x)) for x in plain]
    opt = AdaHessian(ps, lr=0.1, eps=1e-4, weight_decay=wd, hessian_power=power,
                     update_period=3, hessian_bias_correction=bc, maximize=maximize,
                     spatial_average_block_size=NONE, abs_estimate=False, backend="cpu")
    g = torch.Generator().manual_seed(1)
    n = 0
    for t in range(1, 9):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        est = [torch.randn(p.shape, generator=g) for p in ps] if (t - 1) % 3 == 0 else None
        n += est is not None
        for p, gr in zip(ps, grads):
            p.grad = gr
        opt.step(hessian=est)
        for i, (x, (m, v)) in enumerate(zip(plain, st)):
            cref.adahessian_step(x, grads[i], m, v, None if est is None else est[i], lr=0.1,
                                 betas=(0.9, 0.999), eps=1e-4, weight_decay=wd,
                                 hessian_power=power, step=t,
                                 refreshes=n if bc == "refreshes" else t, maximize=maximize)
            got_m, got_v = fp32_states(opt, ps[i])
            torch.testing.assert_close(ps[i].detach(), x, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_m, m, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got_v, v, rtol=1e-5, atol=1e-9)
        assert float(opt.state[ps[0]]["hessian_step"]) == n


def test_matches_pytorch_optimizer_every_step():
    from pytorch_optimizer import AdaHessian as PtoAdaHessian
    ps, qs = _params(2), _params(2)
    opt = AdaHessian(ps, lr=0.1, eps=1e-6, spatial_average_block_size=NONE, abs_estimate=False,
                     backend="cpu")
    pto = PtoAdaHessian(qs, lr=0.1, eps=1e-6)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        est = [torch.randn(p.shape, generator=g) for p in ps]
        for p, q, gr in zip(ps, qs, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step(hessian=est)
        pto.step(hessian=[e.clone() for e in est])
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_closure_cadence_and_estimate_on_a_dense_quadratic():
    # f = ½ θᵀAθ: on refresh steps 1, 4, 7 (update_period 3) v takes |z ⊙ Az| with the
    # optimizer's Philox Rademacher probes; on the others v is frozen
    torch.manual_seed(4)
    Q = torch.randn(8, 8)
    A = (Q + Q.T) / 2
    x = torch.nn.Parameter(torch.randn(8))
    opt = AdaHessian([x], lr=0.05, update_period=3, seed=77, backend="cpu")
    v_prev = torch.zeros(8)
    for t in range(1, 8):
        opt.step(lambda: 0.5 * x @ A @ x)
        v = fp32_states(opt, x)[1]
        if (t - 1) % 3 == 0:
            z = probe([x], t - 1, seed=probe_seed(77))[0]
            d = (z * (A @ z)).abs()
            torch.testing.assert_close(v, 0.999 * v_prev + 0.001 * d * d, rtol=1e-5, atol=1e-9)
        else:
            assert torch.equal(v, v_prev)
        assert opt.last_hessian_info["refreshed"] == ((t - 1) % 3 == 0)
        v_prev = v.clone()


def test_abs_and_spatial_averaging():
    h = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(spatial_average(h, (1, 1, 1, -1)),
                               h.mean((2, 3), keepdim=True).expand_as(h))
    m = torch.randn(4, 6)
    torch.testing.assert_close(spatial_average(m, (1, -1, 1, 1)),
                               m.mean(1, keepdim=True).expand_as(m))
    torch.testing.assert_close(spatial_average(m, (1, 3, 1, 1)),
                               m.reshape(-1, 3).mean(1).repeat_interleave(3).reshape(4, 6))
    assert torch.equal(spatial_average(torch.arange(5.0), (-1, -1, -1, -1)), torch.arange(5.0))
    # in the optimizer: the default averages conv kernels of |estimate| over k×k
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    opt = AdaHessian([w], backend="cpu")
    w.grad = torch.randn_like(w)
    opt.step(hessian=[h])
    d = h.abs().mean((2, 3), keepdim=True).expand_as(h)
    torch.testing.assert_close(fp32_states(opt, w)[1], 0.001 * d * d, rtol=1e-5, atol=1e-10)


def test_solves_softmax_regression():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 5, generator=g)
    y = torch.multinomial(torch.softmax(X @ torch.randn(3, 5, generator=g).T, 1), 1,
                          generator=g).squeeze(1)
    best = softmax_regression_optimum(X, y, 3)
    V = torch.nn.Parameter(torch.zeros(3, 5))
    opt = AdaHessian([V], lr=0.15, backend="cpu")
    first = None
    for _ in range(150):
        loss = opt.step(lambda: torch.nn.functional.cross_entropy(X @ V.T, y)).item()
        first = loss if first is None else first
    assert loss - best < 1e-3 * (first - best)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_states_track_the_32bit_run_within_the_derived_bound(bits):
    shape = (40, 50)
    x0 = torch.randn(shape)
    p32, pq = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
    kw = dict(lr=0.01, update_period=2, spatial_average_block_size=NONE, abs_estimate=False,
              backend="cpu")
    o32, oq = AdaHessian([p32], **kw), AdaHessian([pq], state_bits=bits, min_quant_numel=0, **kw)
    Bm = EmaBound(shape, 0.1, quant_delta("adam", bits, 0))
    Bv = EmaBound(shape, 0.001, quant_delta("adam", bits, 1))
    g = torch.Generator().manual_seed(9)
    for t in range(1, 13):
        grad = torch.randn(shape, generator=g)
        est = torch.randn(shape, generator=g) if t % 2 == 1 else None
        for p in (p32, pq):
            p.grad = grad.clone()
        for o in (o32, oq):
            o.step(hessian=None if est is None else [est.clone()])
        m32, v32 = fp32_states(o32, p32)
        mq, vq = fp32_states(oq, pq)
        Bm.advance(True, block_absmax(oq, pq, 0), m32.abs() + grad.abs())
        Bv.advance(est is not None, block_absmax(oq, pq, 1),
                   v32.abs() + (0 if est is None else est * est))
        assert ((mq - m32).abs() <= Bm.D).all() and ((vq - v32).abs() <= Bv.D).all()
    trivial = (p32.detach() - x0).abs().median()  # how far the 32-bit run moved
    drift = (pq.detach() - p32.detach()).abs().median()
    assert drift < (0.05 if bits == 8 else 0.5) * trivial


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("power", [1, 0.5])
def test_kernels_equal_reference_bit_for_bit(backend, bits, power):
    runs = []
    for backend in (backend, "reference"):
        ps = _params(6)
        opt = AdaHessian(ps, state_bits=bits, min_quant_numel=0, hessian_power=power,
                         update_period=2, weight_decay=0.01, backend=backend, seed=3)
        f = (lambda ps=ps: sum((p * p * p).sum() + (p * p).sum() for p in ps))
        for _ in range(4):
            opt.step(f)
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b) and same_state(oa.state[a], ob.state[b])


def test_state_dict_resume_is_bit_identical():
    def quad(ps):
        return lambda: sum((p.sin() * p).sum() + (p * p).sum() for p in ps)
    ps = _params(2)
    opt = AdaHessian4bit(ps, update_period=2, min_quant_numel=0, backend="cpu", seed=5)
    for _ in range(3):
        opt.step(quad(ps))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = [p.detach().clone() for p in ps]
    for _ in range(4):
        opt.step(quad(ps))
    qs = [torch.nn.Parameter(x.clone()) for x in saved]
    opt2 = AdaHessian4bit(qs, update_period=2, min_quant_numel=0, backend="cpu", seed=1)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(4):
        opt2.step(quad(qs))
    for a, b in zip(ps, qs):
        assert torch.equal(a, b) and same_state(opt.state[a], opt2.state[b])
        assert a.grad.grad_fn is None


def test_errors():
    p = torch.nn.Parameter(torch.randn(6))
    with pytest.raises(ValueError, match="must be 1 or 0.5"):
        AdaHessian([p], hessian_power=0.7)
    with pytest.raises(ValueError, match="hessian_bias_correction"):
        AdaHessian([p], hessian_bias_correction="none")
    with pytest.raises(ValueError, match="multiple"):
        AdaHessian([p], spatial_average_block_size=(4, 1, 1, 1))
    with pytest.raises(ValueError, match="4 ints"):
        AdaHessian([p], spatial_average_block_size=(1, 1))
    # a parameter that had no estimate yet cannot take a non-refresh step
    q = torch.nn.Parameter(torch.randn(3))
    opt = AdaHessian8bit([p, q], update_period=2, backend="cpu")
    opt.step(lambda: (p * p).sum())
    assert q.grad is None and float(opt.state[p]["hessian_step"]) == 1
    with pytest.raises(RuntimeError, match="no Hessian estimate yet"):
        opt.step(lambda: (p * p).sum() + (q * q).sum())
