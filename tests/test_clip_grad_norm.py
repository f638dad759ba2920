"""lowbit.clip_grad_norm_ (and get_total_norm / clip_grads_with_norm_) against torch's: returned
norm, clipped gradients and non-finite behaviour, for norm types 2, inf and a fallback one, on
the statistics pass of every backend."""
import math

import pytest
import torch

import lowbit
from lowbit.clip import clip_grads_with_norm_, get_total_norm
from conftest import kernel_backend_params

SHAPES = [(1,), (4097,), (33, 65), (3, 5, 7)]


def _params(dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in SHAPES]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(dtype)
    ps.append(torch.nn.Parameter(torch.zeros(3, dtype=dtype)))  # no grad: skipped
    return ps


def _pair(dtype, scale=1.0, seed=0):
    a, b = _params(dtype, scale, seed), _params(dtype, scale, seed)
    return a, b


# fp32: both sides accumulate in different orders and precisions (torch fp32, lowbit float64)
TOL = {torch.float32: dict(rtol=2e-6, atol=0), torch.bfloat16: dict(rtol=1e-2, atol=0)}


@pytest.mark.parametrize("backend", ["reference"] + kernel_backend_params())
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 3.0], ids=["l2", "inf", "l1", "l3"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
def test_matches_torch(backend, norm_type, max_norm):
    ours, theirs = _pair(torch.float32)
    got = lowbit.clip_grad_norm_(ours, max_norm, norm_type, backend=backend)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    for p, q in zip(ours, theirs):
        if q.grad is None:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float32])
    if max_norm < 1.0:  # the clipped gradients have the requested norm
        total = torch.nn.utils.get_total_norm([p.grad for p in ours if p.grad is not None],
                                              norm_type)
        assert total.item() == pytest.approx(max_norm, rel=1e-5)


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_bf16_grads(backend):
    ours, theirs = _pair(torch.bfloat16, scale=3.0)
    got = lowbit.clip_grad_norm_(ours, 1.0, backend=backend)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    # lowbit's total is fp32 from float64 sums; torch's is bf16
    assert got.dtype == torch.float32 and want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.float(), **TOL[torch.bfloat16])
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in
                                                _params(torch.bfloat16, 3.0)
                                                if p.grad is not None]))
    assert got.item() == pytest.approx(exact.item(), rel=1e-6)
    for p, q in zip(ours, theirs):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_nonfinite_like_torch(backend, bad, norm_type):
    ours, theirs = _pair(torch.float32)
    for ps in (ours, theirs):
        ps[1].grad[17] = bad
    got = lowbit.clip_grad_norm_(ours, 1.0, norm_type, backend=backend)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    for p, q in zip(ours, theirs):
        if q.grad is not None:  # inf total: finite grads -> 0, inf -> NaN; NaN: all NaN
            torch.testing.assert_close(p.grad, q.grad, equal_nan=True, rtol=0, atol=0)
    ours, theirs = _pair(torch.float32)
    for ps in (ours, theirs):
        ps[1].grad[3] = bad
    with pytest.raises(RuntimeError, match="error_if_nonfinite=False"):
        lowbit.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True, backend=backend)
    with pytest.raises(RuntimeError, match="error_if_nonfinite=False"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, error_if_nonfinite=True)


def test_edge_cases():
    # empty list, a single tensor, parameters without grads
    assert torch.equal(lowbit.clip_grad_norm_([], 1.0), torch.tensor(0.0))
    p = torch.nn.Parameter(torch.zeros(4))
    assert torch.equal(lowbit.clip_grad_norm_([p], 1.0), torch.tensor(0.0))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert lowbit.clip_grad_norm_(p, 1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0, 0.0, 0.0]) / (5.0 + 1e-6))
    # an empty gradient adds nothing (torch's inf norm raises on it instead)
    e = torch.nn.Parameter(torch.zeros(0))
    e.grad = torch.zeros(0)
    p.grad = torch.tensor([3.0, -4.0, 0.0, 0.0])
    assert lowbit.clip_grad_norm_([e, p], 10.0, math.inf).item() == 4.0
    assert lowbit.clip_grad_norm_([e, p], 10.0).item() == pytest.approx(5.0)


def test_split_api_matches_torch():
    ours, theirs = _pair(torch.float32)
    grads = [p.grad for p in ours if p.grad is not None]
    total = get_total_norm(grads)
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(
        [p.grad for p in theirs if p.grad is not None]), **TOL[torch.float32])
    clip_grads_with_norm_(ours, 0.25, total)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.25, total)
    for p, q in zip(ours, theirs):
        if q.grad is not None:
            assert torch.equal(p.grad, q.grad)
