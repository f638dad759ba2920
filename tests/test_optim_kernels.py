"""The fused multi-tensor optimizer step (lowbit::optim_step): the CPU kernel, the CUDA kernel (run
by the simulator) and the Triton kernel (run by the interpreter) equal the reference
(lowbit.reference.optim.fused_step) bit for bit — params, compensations, codes, absmax, fp32
states — over several steps on tensors of awkward sizes, for every rule, state format, param
dtype and write-back mode."""
import pytest
import torch

from lowbit import ops
from lowbit.reference import clip as clip_ref
from lowbit.reference import optim as ref
from conftest import kernel_backend_params

SIZES = (1, 255, 257, 4097, 33 * 65)

# name -> (kind, scalars(step), flag kwargs(step))
RULES = {
    "adamw": ("adam", lambda t: ref.adam_scalars(1e-3, 0.9, 0.999, 1e-8, 1e-2, t), {}),
    "adam_l2": ("adam", lambda t: ref.adam_scalars(1e-3, 0.9, 0.999, 1e-8, 1e-2, t, False), {}),
    "adamw_maximize": ("adam", lambda t: ref.adam_scalars(1e-3, 0.9, 0.99, 1e-6, 0.0, t),
                       {"maximize": True}),
    "lion": ("lion", lambda t: ref.lion_scalars(1e-4, 0.9, 0.99, 1e-2), {}),
    "lion_maximize": ("lion", lambda t: ref.lion_scalars(3e-4, 0.95, 0.98, 0.0),
                      {"maximize": True}),
    "sgd_nesterov": ("sgd", lambda t: ref.sgd_scalars(1e-2, 0.9, 0.0, 1e-2), {"nesterov": True}),
    "sgd_dampening": ("sgd", lambda t: ref.sgd_scalars(1e-2, 0.8, 0.3, 0.0), {}),
    "sgd_plain": ("sgd", lambda t: ref.sgd_scalars(1e-2, 0.0, 0.0, 1e-3), {}),
    "sgd_maximize": ("sgd", lambda t: ref.sgd_scalars(1e-2, 0.9, 0.0, 0.0), {"maximize": True}),
}


def _make(kind, sizes, dtype, state_bits, writeback, momentum=True, block=0):
    """Params, and (state1, absmax1, state2, absmax2, comps) lists, freshly initialised."""
    params = [(torch.randn(n) * 0.1).to(dtype) for n in sizes]
    nstates = {"adam": 2, "lion": 1, "sgd": 1 if momentum else 0, "sophia": 2}[kind]
    lists = [[], [], [], []]
    for p in params:
        for j in range(nstates):
            if state_bits == 32:
                lists[2 * j].append(torch.zeros(p.shape))
            else:
                codes, absmax = ref.quantize_state(torch.zeros(p.numel()), j, state_bits, block,
                                                   kind)
                lists[2 * j].append(codes)
                lists[2 * j + 1].append(absmax)
    comps = [torch.zeros_like(p) for p in params] if writeback == "kahan" else []
    return params, (*lists, comps)


def _clone(params, states):
    return [p.clone() for p in params], tuple([t.clone() for t in lst] for lst in states)


def _same(a, b):
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _signed_zeros(t):
    """t with about half its elements replaced by +0 or -0."""
    pick = torch.rand(t.shape) < 0.5
    zeros = torch.where(torch.rand(t.shape) < 0.5, 0.0, -0.0).to(t.dtype)
    return torch.where(pick, zeros, t)


def _run(backend, rule, state_bits, dtype, writeback, sizes=SIZES, steps=4, seed=0, block=0,
         zeros=False):
    kind, scalars, kw = RULES[rule]
    torch.manual_seed(seed)
    params, states = _make(kind, sizes, dtype, state_bits, writeback,
                           momentum=rule != "sgd_plain", block=block)
    if zeros:
        params = [_signed_zeros(p) for p in params]
    twins, twin_states = _clone(params, states)
    for step in range(1, steps + 1):
        grads = [(torch.randn(p.shape) * 10.0 ** (step - 3)).to(dtype) for p in params]
        if zeros:
            grads = [_signed_zeros(g) for g in grads]
        keys = ([int(k) for k in torch.randint(0, 2**62, (len(params),))]
                if writeback == "stochastic" else [])
        sc = scalars(step)
        flags = ref.step_flags(kind, sc, first_step=step == 1, **kw)
        ops.optim_step(params, grads, *states, keys, kind, state_bits, block, sc, flags,
                       writeback, backend, [], [])
        ops.optim_step(twins, grads, *twin_states, keys, kind, state_bits, block, sc, flags,
                       writeback, "reference", [], [])
        for a, b in zip(params, twins):
            assert _same(a, b), (rule, step)
        for got, want in zip(states, twin_states):
            for a, b in zip(got, want):
                assert _same(a, b), (rule, step)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("state_bits", [32, 8, 4])
@pytest.mark.parametrize("rule", [r for r in RULES if r != "sgd_plain"])
def test_rules_fp32_params(backend, state_bits, rule):
    _run(backend, rule, state_bits, torch.float32, "f32")


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_sgd_without_momentum(backend):
    _run(backend, "sgd_plain", 32, torch.float32, "f32")
    _run(backend, "sgd_plain", 32, torch.bfloat16, "stochastic")


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("state_bits", [32, 8, 4])
@pytest.mark.parametrize("dtype, writeback", [
    (torch.bfloat16, "stochastic"), (torch.bfloat16, "nearest"), (torch.bfloat16, "kahan"),
    (torch.float16, "stochastic"), (torch.float16, "kahan")], ids=str)
def test_low_precision_params(backend, state_bits, dtype, writeback):
    _run(backend, "adamw", state_bits, dtype, writeback)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("rule, state_bits, writeback", [
    ("lion", 8, "stochastic"), ("sgd_nesterov", 4, "kahan"), ("adam_l2", 8, "stochastic")])
def test_other_rules_low_precision_params(backend, rule, state_bits, writeback):
    _run(backend, rule, state_bits, torch.bfloat16, writeback)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("state_bits", [32, 8, 4])
def test_many_tensors_in_one_call(backend, state_bits):
    # More tensors than one CUDA launch's parameter table holds (28), empty ones included.
    torch.manual_seed(1)
    sizes = [0, 1] + torch.randint(2, 700, (38,)).tolist()
    _run(backend, "adamw", state_bits, torch.bfloat16, "stochastic", sizes=sizes, steps=2)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("state_bits, block", [(8, 64), (8, 2048), (4, 32), (4, 4096)])
def test_block_sizes(backend, state_bits, block):
    _run(backend, "adamw", state_bits, torch.float32, "f32", block=block, steps=2)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("rule", ["adamw_maximize", "lion_maximize", "sgd_maximize"])
def test_signed_zeros(backend, rule):
    # -0 stays -0: maximize negates by flipping the sign bit (0 - g would give +0 for g = +0),
    # torch's clone starts SGD's buffer, and Lion's sign keeps the zero's sign.
    _run(backend, rule, 32, torch.bfloat16, "nearest", zeros=True)


def _stats_grads(dtype):
    torch.manual_seed(3)
    grads = [(torch.randn(n) * 3).to(dtype) for n in (0, 1, 1023, 1025, 70_000, 200_003)]
    grads[2][5] = float("nan")
    grads[4][7] = float("inf")
    grads[4][9] = -float("inf")
    grads[5][-1] = float("nan")
    grads[5][0] = 40.0  # the largest magnitude, at the first element
    return grads


def _assert_stats_equal(got, want):
    # counts and maxima exact; sums of squares to float64 rounding (exact squares, added in
    # another order)
    assert torch.equal(got[:, 1:], want[:, 1:])
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_grad_stats_match_reference(backend, dtype):
    grads = _stats_grads(dtype)
    got = ops.grad_stats(grads, backend)
    want = ops.grad_stats(grads, "reference")
    assert want[:, 1].tolist() == [0, 0, 1, 0, 2, 1] and want[:, 3].tolist() == [0, 0, 1, 0, 0, 1]
    assert want[5, 2].item() == 40.0
    _assert_stats_equal(got, want)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flags", [clip_ref.VALUE_CLIP, clip_ref.TENSOR_SCALE | clip_ref.ADA_CLIP,
                                   clip_ref.TRANSFORM_FLAGS], ids=["value", "scale+ada", "all"])
def test_grad_stats_after_clip_transform(backend, dtype, flags):
    grads = _stats_grads(dtype)
    # per tensor (scale, threshold, ratio, k): thresholds inside the gradients' range, so both
    # sides of every comparison occur
    xform = torch.tensor([[0.5, 1.0, 0.25, 0.7], [2.0, 0.1, 0.5, 1.5], [0.75, 2.0, 0.9, 0.3],
                          [1.0, 0.5, 0.3, 2.0], [0.3, 1.5, 0.2, 1.1], [1.25, 3.0, 0.6, 0.9]],
                         dtype=torch.float32)
    got = ops.grad_stats(grads, backend, xform, 2.5, flags)
    want = ops.grad_stats(grads, "reference", xform, 2.5, flags)
    _assert_stats_equal(got, want)
    # the transform did act on every tensor large enough to reach its thresholds, and the
    # counts stay those of the raw gradients (a clamp must not hide an inf from the skip check)
    raw = ops.grad_stats(grads, "reference")
    assert (want[2:, 0] != raw[2:, 0]).all()
    assert torch.equal(want[:, 1], raw[:, 1]) and torch.equal(want[:, 3], raw[:, 3])
