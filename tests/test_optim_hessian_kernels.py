"""The curvature optimizers' rules inside the fused kernel — Sophia (Hessian EMA refresh, clipped
ratio, both denominator forms) and AdaHessian (Adam whose second moment follows the Hessian
estimate, hessian_power 1 or 1/2) — on every backend, bit for bit against
lowbit.reference.optim.fused_step, for 32/8/4-bit states and fp32/bf16 params; and the rules'
semantics on hand-made inputs."""
import pytest
import torch

from lowbit import ops
from lowbit.reference import clip as clip_ref
from lowbit.reference import optim as ref
from conftest import kernel_backend_params
from test_optim_kernels import _clone, _make, _same

SIZES = (1, 255, 257, 4097, 33 * 65)

# name -> (kind, flags beyond the rule's own, whether steps refresh the Hessian estimate)
CASES = {
    "sophia": ("sophia", 0, False),
    "sophia_refresh": ("sophia", ref.HESS_EMA, True),
    "sophia_official": ("sophia", ref.HESS_EMA | ref.SOPHIA_ADD_EPS, True),
    "sophia_clipped_grads": ("sophia", ref.HESS_EMA | clip_ref.TENSOR_SCALE | clip_ref.VALUE_CLIP,
                             True),
    "adahessian": ("adam", ref.HESS_V | ref.HESS_EMA, True),
    "adahessian_frozen": ("adam", ref.HESS_V, False),
    "adahessian_quarter": ("adam", ref.HESS_V | ref.HESS_EMA | ref.QUARTER, True),
}


def _scalars(kind, step):
    if kind == "sophia":
        sc = ref.sophia_scalars(1e-3, 0.965, 0.99, 0.05, 1e-12, 1.0, 0.1)
    else:
        sc = ref.adam_scalars(0.1, 0.9, 0.999, 1e-4, 1e-2, step)
    return ref.with_clip_scalars(sc, value_clip=1.5)


def _table(n):
    return torch.tensor([ref.NO_CLIP] * n, dtype=torch.float32).index_fill_(
        1, torch.tensor([0]), 0.7).contiguous()


def _run(backend, case, state_bits, dtype, writeback, steps=4):
    kind, extra, refresh = CASES[case]
    torch.manual_seed(7)
    params, states = _make(kind, SIZES, dtype, state_bits, writeback)
    twins, twin_states = _clone(params, states)
    for step in range(1, steps + 1):
        grads = [(torch.randn(p.shape) * (1.0 if step % 2 else 3.0)).to(dtype) for p in params]
        # signed estimates (Hutchinson): negative curvature takes Sophia's eps branch
        hess = [torch.randn(p.shape) * 2.0 for p in params] if refresh else []
        keys = [11 * step + i for i in range(len(SIZES))] if writeback == "stochastic" else []
        sc = _scalars(kind, step)
        flags = ref.step_flags(kind, sc) | extra
        table = _table(len(SIZES))
        ops.optim_step(params, grads, *states, keys, kind, state_bits, 0, sc, flags, writeback,
                       backend, [], [], table, None, None, hess)
        ops.optim_step(twins, grads, *twin_states, keys, kind, state_bits, 0, sc, flags,
                       writeback, "reference", [], [], table, None, None, hess)
        for a, b in zip(params, twins):
            assert _same(a, b), (case, step)
        for got, want in zip(states, twin_states):
            for a, b in zip(got, want):
                assert _same(a, b), (case, step)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("state_bits", [32, 8, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_hessian_rules_fp32_params(backend, state_bits, case):
    _run(backend, case, state_bits, torch.float32, "f32")


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("state_bits", [8, 4])
@pytest.mark.parametrize("case", ["sophia_refresh", "adahessian"])
def test_hessian_rules_bf16_stochastic(backend, state_bits, case):
    _run(backend, case, state_bits, torch.bfloat16, "stochastic")


@pytest.mark.parametrize("backend", kernel_backend_params() + ["reference"])
def test_refresh_needs_one_estimate_per_tensor(backend):
    params, states = _make("sophia", (10, 20), torch.float32, 32, "f32")
    sc = _scalars("sophia", 1)
    flags = ref.step_flags("sophia", sc) | ref.HESS_EMA
    with pytest.raises(ValueError, match="estimate"):
        ops.optim_step(params, [torch.ones(10), torch.ones(20)], *states, [], "sophia", 32, 0, sc,
                       flags, "f32", backend, [], [], None, None, None, [torch.ones(10)])
    with pytest.raises(ValueError, match="Hessian"):
        ops.optim_step(params, [torch.ones(10), torch.ones(20)], *states[:2], [], [], [], [],
                       "lion", 32, 0, ref.lion_scalars(1e-4, 0.9, 0.99, 0.0),
                       ref.HESS_V, "f32", backend, [], [])


def test_sophia_semantics():
    # clip(m / max(gamma h, eps), c): curvature zero or negative saturates to lr * c * sign(m)
    # (sign-momentum); |m| below gamma h is the Newton-like ratio; the EMA takes the estimate
    sc = ref.sophia_scalars(0.5, 0.0, 0.99, 0.1, 1e-12, 1.0, 0.0)  # beta1 0: m = g
    x = torch.zeros(4)
    g = torch.tensor([1.0, -1.0, 0.02, 0.02])
    s2 = torch.tensor([0.0, -3.0, 1.0, 0.1])
    flags = ref.step_flags("sophia", sc)
    x1, m1, h1, _ = ref.update("sophia", x, g, torch.zeros(4), s2, sc, flags)
    assert torch.equal(m1, g) and torch.equal(h1, s2)
    # 0.02 / (0.1 * 1) = 0.2 -> 0.5 * 0.2; 0.02 / max(0.01, 1e-12) = 2 -> clipped to 1
    torch.testing.assert_close(x1, torch.tensor([-0.5, 0.5, -0.1, -0.5]), rtol=1e-6, atol=0)
    x2, _, h2, _ = ref.update("sophia", x, g, torch.zeros(4), s2, sc, flags | ref.HESS_EMA,
                              h=torch.full((4,), 5.0))
    torch.testing.assert_close(h2, s2 * 0.99 + 0.01 * 5.0, rtol=1e-6, atol=0)
    # the official code's gamma * h + eps: with h = 0, 1 / 1e-12 still clips to 1
    x3, *_ = ref.update("sophia", x, g, torch.zeros(4), s2, sc, flags | ref.SOPHIA_ADD_EPS)
    assert x3[0] == -0.5


def test_adahessian_semantics():
    # v follows the estimate (h^2), not g; frozen between refreshes; power 1/2 takes a 4th root
    sc = ref.adam_scalars(0.1, 0.9, 0.999, 1e-4, 0.0, 1)
    x, g = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])
    h = torch.tensor([4.0, 0.5, -2.0])
    base = ref.step_flags("adam", sc) | ref.HESS_V
    _, _, v1, _ = ref.update("adam", x, g, torch.zeros(3), torch.zeros(3), sc,
                             base | ref.HESS_EMA, h=h)
    torch.testing.assert_close(v1, 0.001 * h * h, rtol=1e-6, atol=0)
    _, _, v2, _ = ref.update("adam", x, g, torch.zeros(3), v1, sc, base)
    assert torch.equal(v2, v1)
    xq, *_ = ref.update("adam", x, g, torch.zeros(3), v1, sc, base | ref.QUARTER)
    want = -sc[6] * (0.1 * g) / (v1.double().sqrt().sqrt().float() + sc[5])
    torch.testing.assert_close(xq, want, rtol=1e-6, atol=0)
