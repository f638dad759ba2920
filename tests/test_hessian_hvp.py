"""Hessian-vector products against closed forms and torch.autograd.functional.hessian, in
float64, for every route (research/hessian.md §7.1), Gauss-Newton products, and the error paths."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit.hessian as H

D = torch.float64
EXACT = ("double_backward", "forward_over_reverse", "auto")
ATOL, RTOL = 1e-10, 1e-8


class Params(nn.Module):
    """Named parameters for closed-form models (so forward_over_reverse can rebind them)."""

    def __init__(self, **tensors):
        super().__init__()
        for name, t in tensors.items():
            setattr(self, name, nn.Parameter(t))


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def assert_close(got, want, atol=ATOL, rtol=RTOL):
    got, want = flat(got), flat(want)
    err = (got - want).abs()
    assert bool((err <= atol + rtol * want.abs()).all()), f"max abs err {err.max():.3e}"



def _unflat(x, like):
    out, i = [], 0
    for p in like:
        out.append(x[i:i + p.numel()].reshape(p.shape))
        i += p.numel()
    return out


# --- closed-form models: (module, closure, dense Hessian) ------------------------------------

def quadratic():
    n = 7
    g = torch.Generator().manual_seed(1)
    B = torch.randn(n, n, generator=g, dtype=D)
    A = B + B.T  # symmetric, indefinite
    b = torch.randn(n, generator=g, dtype=D)
    m = Params(theta=torch.randn(n, generator=g, dtype=D))
    return m, lambda: 0.5 * m.theta @ A @ m.theta + b @ m.theta, A


def linear_regression():
    g = torch.Generator().manual_seed(2)
    N, d = 20, 4
    X, y = torch.randn(N, d, generator=g, dtype=D), torch.randn(N, generator=g, dtype=D)
    m = Params(w=torch.randn(d, generator=g, dtype=D))
    # the mean square written out: forward-over-reverse through F.mse_loss with a target raises
    # in torch 2.13 (test_forward_over_reverse_mse_loss_gap)
    return m, lambda: ((X @ m.w - y) ** 2).mean(), 2.0 / N * X.T @ X


def logistic_regression():
    g = torch.Generator().manual_seed(3)
    N, d = 30, 5
    X = torch.randn(N, d, generator=g, dtype=D)
    y = torch.randint(0, 2, (N,), generator=g).to(D)
    m = Params(w=0.5 * torch.randn(d, generator=g, dtype=D))
    s = torch.sigmoid(X @ m.w.detach())
    Hm = X.T @ torch.diag(s * (1 - s)) @ X / N
    return m, lambda: F.binary_cross_entropy_with_logits(X @ m.w, y), Hm


def softmax_regression():
    g = torch.Generator().manual_seed(4)
    N, d, C = 25, 4, 3
    X = torch.randn(N, d, generator=g, dtype=D)
    y = torch.randint(0, C, (N,), generator=g)
    m = Params(W=0.5 * torch.randn(C, d, generator=g, dtype=D))
    P = torch.softmax(X @ m.W.detach().T, dim=1)
    Hm = sum(torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(x, x))
             for p, x in zip(P, X)) / N  # row-major flattening of W
    return m, lambda: F.cross_entropy(X @ m.W.T, y), Hm


def mlp():
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.GELU(),
                      nn.Linear(3, 2)).to(D)
    X = torch.randn(16, 4, generator=g, dtype=D)
    y = torch.randint(0, 2, (16,), generator=g)
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for p in m.parameters()]

    def loss_of_flat(theta):
        ps = dict(zip(names, _unflat(theta, [torch.empty(s) for s in shapes])))
        return F.cross_entropy(torch.func.functional_call(m, ps, (X,)), y)
    theta0 = flat([p.detach() for p in m.parameters()])
    Hm = torch.autograd.functional.hessian(loss_of_flat, theta0)
    return m, lambda: F.cross_entropy(m(X), y), Hm


CASES = {"quadratic": quadratic, "linear_regression": linear_regression,
         "logistic_regression": logistic_regression, "softmax_regression": softmax_regression,
         "mlp": mlp}


def probe_like(m, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in m.parameters()]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", EXACT)
def test_exact_routes_match_closed_form(case, method):
    m, f, Hm = CASES[case]()
    ps = list(m.parameters())
    v = probe_like(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "auto" must not fall back on these models
        got = H.hvp(f, m, v, method=method)
    assert_close(got, _unflat(Hm @ flat(v), ps))
    assert [t.shape for t in got] == [p.shape for p in ps]


@pytest.mark.parametrize("case", ["softmax_regression", "mlp"])
@pytest.mark.parametrize("method", EXACT + ("finite_difference",))
def test_batched_probes_equal_one_at_a_time(case, method):
    m, f, Hm = CASES[case]()
    ps = list(m.parameters())
    vs = [probe_like(m, s) for s in range(3)]
    V = [torch.stack([v[i] for v in vs]) for i in range(len(ps))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # vmap / is_grads_batched must work
        got = H.hvp(f, m, V, method=method, batched=True)
    for j, v in enumerate(vs):
        want = _unflat(Hm @ flat(v), ps)
        tol = (ATOL, RTOL) if method != "finite_difference" else (1e-7, 1e-6)
        assert_close([t[j] for t in got], want, *tol)


def test_hvp_from_loss_and_operator_reuse():
    m, f, Hm = mlp()
    ps = list(m.parameters())
    v = probe_like(m)
    want = _unflat(Hm @ flat(v), ps)
    loss = f()
    assert_close(H.hvp_from_loss(loss, ps, v, retain_graph=True), want)
    assert_close(H.hvp_from_loss(loss, ps, [2 * t for t in v]), [2 * t for t in want])
    op = H.HessianOperator(f, m)
    for k in range(3):  # the retained gradient graph is reused across products
        assert_close(op([(k + 1) * t for t in v]), [(k + 1) * t for t in want])
    assert op.method == "double_backward" and op.num_matvecs == 3
    with torch.no_grad():  # an in-place parameter update invalidates the cached graph
        ps[0].mul_(1.5)
    fresh = H.hvp(f, m, v, method="forward_over_reverse")
    assert_close(op(v), fresh)
    assert not torch.allclose(flat(fresh), flat(want))


def test_symmetry_and_linearity():
    m, f, _ = mlp()
    u, v = probe_like(m, 1), probe_like(m, 2)
    for method in ("double_backward", "forward_over_reverse"):
        hu, hv = H.hvp(f, m, u, method=method), H.hvp(f, m, v, method=method)
        assert abs(float(flat(u) @ flat(hv) - flat(v) @ flat(hu))) < 1e-12
        lin = H.hvp(f, m, [2 * a - 3 * b for a, b in zip(u, v)], method=method)
        assert_close(lin, [2 * a - 3 * b for a, b in zip(hu, hv)])


# --- finite differences: within the computed truncation bound ---------------------------------

def quartic(c, A, theta0):
    m = Params(theta=theta0.clone())
    return m, lambda: 0.25 * (c * m.theta ** 4).sum() + 0.5 * m.theta @ A @ m.theta


def test_finite_difference_within_truncation_bound():
    # f = ¼ Σ c_i θ_i⁴ + ½ θᵀAθ: Hv = (3 c θ² ⊙ v) + Av exactly, and the central difference of
    # the gradient along u = v/‖v‖ with step h has the exact truncation error ‖v‖ h² c ⊙ u³
    # (the Taylor series of the gradient stops at the cubic term), i.e. (h²/6)‖∇⁴f[u,u,u]‖‖v‖.
    g = torch.Generator().manual_seed(7)
    n = 9
    c = torch.rand(n, generator=g, dtype=D) + 0.5
    B = torch.randn(n, n, generator=g, dtype=D)
    A = B + B.T
    theta0 = torch.randn(n, generator=g, dtype=D)
    v = torch.randn(n, generator=g, dtype=D)
    m, f = quartic(c, A, theta0)
    exact = 3 * c * theta0 ** 2 * v + A @ v
    vn = float(v.norm())
    u = v / vn
    eps_mach = torch.finfo(D).eps
    grad_scale = float((c * theta0.abs() ** 3).norm() + A.norm() * theta0.norm())
    for h in (None, 1e-3, 1e-2):
        step = H.fd_step([m.theta]) if h is None else h
        got = H.hvp(f, m, [v], method="finite_difference", fd_eps=h)[0]
        trunc = vn * step ** 2 * c * u ** 3
        roundoff = 50 * eps_mach * grad_scale * vn / step
        err = got - exact
        assert bool(((err - trunc).abs() <= roundoff).all()), (step, (err - trunc).abs().max())
        if h == 1e-2:  # truncation dominates: the measured error is the predicted one
            assert float((err - trunc).norm()) < 1e-5 * float(trunc.norm())
    assert H.fd_step([m.theta]) == pytest.approx(eps_mach ** (1 / 3) * max(
        1.0, float(theta0.square().mean().sqrt())))


@pytest.mark.parametrize("case", CASES)
def test_finite_difference_close_to_exact(case):
    m, f, Hm = CASES[case]()
    ps = list(m.parameters())
    v = probe_like(m)
    want = flat(_unflat(Hm @ flat(v), ps))
    got = flat(H.hvp(f, m, v, method="finite_difference"))
    assert float((got - want).norm() / want.norm()) < 1e-7


def test_finite_difference_restores_params_exactly_even_on_error():
    m, f, _ = mlp()
    before = [p.detach().clone() for p in m.parameters()]
    H.hvp(f, m, probe_like(m), method="finite_difference")
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("injected")
        return f()
    with pytest.raises(KeyError, match="injected"):
        H.hvp(flaky, m, probe_like(m), method="finite_difference")
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


# --- Gauss-Newton products --------------------------------------------------------------------

@pytest.mark.parametrize("jvp", ["auto", "forward", "reverse", "finite_difference"])
def test_ggn_equals_hessian_for_linear_models(jvp):
    tol = (ATOL, RTOL) if jvp != "finite_difference" else (1e-8, 1e-6)
    # softmax regression: outputs linear in W, so G = H
    m, _, Hm = softmax_regression()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(25, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (25,), generator=g)
    v = probe_like(m)
    got = H.ggn_vp(lambda: X @ m.W.T, m, v, y, loss="cross_entropy", jvp=jvp)
    assert_close(got, _unflat(Hm @ flat(v), list(m.parameters())), *tol)
    # linear regression with torch's mean MSE: G = H = 2/N XᵀX
    m, _, Hm = linear_regression()
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(20, 4, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)
    v = probe_like(m)
    got = H.ggn_vp(lambda: X @ m.w, m, v, y, loss="mse", jvp=jvp)
    assert_close(got, _unflat(Hm @ flat(v), list(m.parameters())), *tol)
    # logistic regression with BCE-with-logits
    m, _, Hm = logistic_regression()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 5, generator=g, dtype=D)
    got = H.ggn_vp(lambda: X @ m.w, m, probe_like(m), loss="binary_cross_entropy", jvp=jvp)
    assert_close(got, _unflat(Hm @ flat(probe_like(m)), list(m.parameters())), *tol)


def test_ggn_mlp_against_explicit_jacobian_and_ignore_index():
    torch.manual_seed(11)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(D)
    X = torch.randn(6, 3, dtype=D)
    y = torch.tensor([0, 3, -100, 1, 2, -100])
    ps = list(m.parameters())
    names = [n for n, _ in m.named_parameters()]
    theta0 = flat([p.detach() for p in ps])

    def out_of_flat(theta):
        return torch.func.functional_call(m, dict(zip(names, _unflat(theta, ps))), (X,))
    J = torch.autograd.functional.jacobian(out_of_flat, theta0).reshape(6 * 4, -1)
    P = torch.softmax(m(X).detach(), dim=1)
    keep = (y != -100)
    Hl = torch.block_diag(*[(torch.diag(p) - torch.outer(p, p)) * float(k)
                            for p, k in zip(P, keep)]) / int(keep.sum())
    G = J.T @ Hl @ J
    v = probe_like(m)
    for jvp in ("forward", "reverse"):
        got = H.ggn_vp(lambda: m(X), m, v, y, jvp=jvp)
        assert_close(got, _unflat(G @ flat(v), ps))
    # G is PSD and differs from H for a nonlinear network
    gv = flat(H.ggn_vp(lambda: m(X), m, v, y))
    assert float(flat(v) @ gv) >= 0
    hv = flat(H.hvp(lambda: F.cross_entropy(m(X), y), m, v))
    assert not torch.allclose(gv, hv, atol=1e-6)
    # the GGN operator is symmetric PSD: its Lanczos extremes are >= 0
    op = H.GGNOperator(lambda: m(X), m, y)
    lo = H.lanczos(op, 1, which="SA", max_steps=op.numel)
    assert float(lo.eigenvalues[0]) > -1e-10


# --- errors -----------------------------------------------------------------------------------

class CubeNoDoubleBackward(torch.autograd.Function):
    """x³ with a backward that cannot be differentiated again and no forward-AD rule (the shape
    of a fused kernel: Triton / Liger / Apex)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return 3 * x ** 2 * g


def test_no_exact_route_falls_back_to_finite_difference_with_warning():
    g = torch.Generator().manual_seed(9)
    m = Params(x=torch.randn(5, generator=g, dtype=D))
    f = lambda: CubeNoDoubleBackward.apply(m.x).sum()  # noqa: E731
    v = torch.randn(5, generator=g, dtype=D)
    exact = 6 * m.x.detach() * v
    with pytest.warns(UserWarning, match=r"falling back to 'finite_difference'") as rec:
        got = H.hvp(f, m, [v])[0]
    msg = str(rec[0].message)
    assert "double_backward" in msg and "forward_over_reverse" in msg
    assert torch.allclose(got, exact, rtol=1e-7, atol=1e-8)
    with pytest.raises(RuntimeError, match=r"no exact Hessian-vector route.*finite_difference"):
        H.hvp(f, m, [v], fallback=None)
    # PyTorch does not fail double backward here, it drops the dependency: the explicit route
    # can only warn (zeros are right for a loss linear in params, wrong here)
    with pytest.warns(UserWarning, match="once_differentiable"):
        assert torch.equal(H.hvp(f, m, [v], method="double_backward")[0], torch.zeros(5, dtype=D))
    with pytest.raises(RuntimeError, match="setup_context"):
        H.hvp(f, m, [v], method="forward_over_reverse")
    # the operator settles the route once (one warning), then keeps it
    op = H.HessianOperator(f, m)
    with pytest.warns(UserWarning, match="finite_difference"):
        op([v])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert torch.allclose(op([v])[0], exact, rtol=1e-7, atol=1e-8)
    assert op.method == "finite_difference"
    with pytest.warns(UserWarning, match="no graph"):
        H.hvp_from_loss(f(), list(m.parameters()), [v])


def test_forward_over_reverse_mse_loss_gap():
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(20, 4, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)
    m = Params(w=torch.randn(4, generator=g, dtype=D))
    f = lambda: F.mse_loss(X @ m.w, y)  # noqa: E731
    v = [torch.randn(4, generator=g, dtype=D)]
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
        H.hvp(f, m, v, method="forward_over_reverse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = H.hvp(f, m, v)  # auto: double backward works, no warning
    assert_close(got, [2.0 / 20 * X.T @ X @ v[0]])


def test_fused_attention_falls_back_and_math_backend_is_exact():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator().manual_seed(12)
    m = Params(wq=0.5 * torch.randn(8, 8, generator=g, dtype=D))
    x = torch.randn(1, 2, 5, 8, generator=g, dtype=D)

    def f():
        q = x @ m.wq
        return F.scaled_dot_product_attention(q, x, x).square().sum()
    v = [torch.randn(8, 8, generator=g, dtype=D)]
    with sdpa_kernel(SDPBackend.MATH):
        exact = H.hvp(f, m, v, method="double_backward")[0]
    with pytest.warns(UserWarning, match="scaled_dot_product"):
        got = H.hvp(f, m, v)[0]
    assert float((got - exact).norm() / exact.norm()) < 1e-6


def test_clear_errors():
    m, f, _ = quadratic()
    v = probe_like(m)
    frozen = torch.randn(3, dtype=D)
    with pytest.raises(ValueError, match=r"params\[0\].*does not require grad"):
        H.hvp(lambda: frozen.sum(), [frozen], [torch.ones(3, dtype=D)])
    with pytest.raises(TypeError, match="scalar tensor.*not a tuple"):
        H.hvp(lambda: (f(), 1.0), m, v)
    with pytest.raises(TypeError, match="scalar tensor"):
        H.hvp(lambda: 3.0, m, v, method="finite_difference")
    with pytest.raises(ValueError, match="scalar loss.*shape"):
        H.hvp(lambda: m.theta * 2, m, v)
    with pytest.raises(ValueError, match="scalar loss"):
        H.hvp(lambda: m.theta * 2, m, v, method="forward_over_reverse")

    def no_graph():
        with torch.no_grad():
            return f()
    with pytest.raises(ValueError, match="does not require grad"):
        H.hvp(no_graph, m, v)
    with pytest.raises(ValueError, match="shape"):
        H.hvp(f, m, [torch.ones(3, dtype=D)])
    with pytest.raises(ValueError, match="needs the module"):
        H.hvp(f, list(m.parameters()), v, method="forward_over_reverse")
    with pytest.raises(ValueError, match="method must be"):
        H.hvp(f, m, v, method="nope")
    with pytest.raises(ValueError, match="empty"):
        H.hvp(f, [], [])
    with pytest.raises(TypeError, match="network outputs"):
        H.ggn_vp(lambda: "x", m, v)
