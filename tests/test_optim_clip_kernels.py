"""The clipping steps inside the fused optimizer kernel (clip_math.h transform, SPAM's spike clip,
momentum reset, decay after the update, per-tensor step size and decay of update clipping,
clipped-element counters) and the update-clipping statistics pass on every backend, bit for bit
against lowbit.reference.optim.fused_step, for 32/8/4-bit states and fp32/bf16 params."""
import pytest
import torch

from lowbit import ops
from lowbit.reference import clip as clip_ref
from lowbit.reference import optim as ref
from conftest import kernel_backend_params
from test_optim_kernels import _clone, _make, _same

SIZES = (1, 255, 257, 4097, 33 * 65)

# name -> (kind, flags beyond the rule's own)
CASES = {
    "value": ("adam", clip_ref.VALUE_CLIP),
    "scale": ("adam", clip_ref.TENSOR_SCALE),
    "stable_spam": ("adam", clip_ref.ADA_CLIP | clip_ref.NORM_SCALE),
    "spam": ("adam", ref.SPIKE_CLIP | ref.DECAY_AFTER),
    "spam_reset": ("adam", ref.SPIKE_CLIP | ref.RESET | ref.DECAY_AFTER),
    "everything": ("adam", clip_ref.TRANSFORM_FLAGS | ref.SPIKE_CLIP | ref.DECAY_AFTER),
    "update_scale": ("adam", ref.UPDATE_SCALE),
    "update_scale_spam": ("adam", ref.UPDATE_SCALE | clip_ref.TENSOR_SCALE | ref.SPIKE_CLIP |
                          ref.DECAY_AFTER),
    "lion": ("lion", clip_ref.VALUE_CLIP | clip_ref.TENSOR_SCALE | ref.RESET | ref.DECAY_AFTER),
    "sgd": ("sgd", clip_ref.ADA_CLIP | clip_ref.TENSOR_SCALE | ref.RESET),
}


def _scalars(kind, step):
    if kind == "adam":
        sc = ref.adam_scalars(1e-3, 0.9, 0.999, 1e-8, 1e-2, step)
    elif kind == "lion":
        sc = ref.lion_scalars(1e-4, 0.9, 0.99, 1e-2)
    else:
        sc = ref.sgd_scalars(1e-2, 0.9, 0.0, 1e-2)
    # value clip inside the gradients' range; theta small enough that spikes occur every step
    return ref.with_clip_scalars(sc, value_clip=1.5, spike_threshold=3.0, spike_floor=1e-3)


def _clip_table(n, step):
    # per tensor (s, thr, r, k): thresholds inside the (scaled) gradients' range; then the step
    # size and decay factor of update clipping, around the group's
    g = torch.Generator().manual_seed(100 + step)
    s = 0.5 + torch.rand(n, generator=g)
    thr = 0.3 + 2 * torch.rand(n, generator=g)
    r = 0.2 + 0.7 * torch.rand(n, generator=g)
    k = 0.5 + torch.rand(n, generator=g)
    lr = 1e-3 * (0.2 + torch.rand(n, generator=g))
    decay = 1.0 - 1e-5 * torch.rand(n, generator=g)
    return torch.stack([s, thr, r, k, lr, decay], dim=1).float().contiguous()


def _run(backend, case, state_bits, dtype, writeback, sizes=SIZES, steps=4):
    kind, extra = CASES[case]
    torch.manual_seed(5)
    params, states = _make(kind, sizes, dtype, state_bits, writeback)
    twins, twin_states = _clone(params, states)
    counts = torch.zeros(len(sizes), dtype=torch.int64)
    twin_counts = counts.clone()
    for step in range(1, steps + 1):
        grads = [(torch.randn(p.shape) * (1.0 if step % 2 else 3.0)).to(dtype) for p in params]
        keys = ([int(k) for k in torch.randint(0, 2**62, (len(params),))]
                if writeback == "stochastic" else [])
        sc = _scalars(kind, step)
        flags = ref.step_flags(kind, sc, first_step=step == 1) | extra
        # (at step 1, v = 0: the floor decides the clip)
        table = _clip_table(len(sizes), step)
        ops.optim_step(params, grads, *states, keys, kind, state_bits, 0, sc, flags, writeback,
                       backend, [], [], table, counts)
        ops.optim_step(twins, grads, *twin_states, keys, kind, state_bits, 0, sc, flags,
                       writeback, "reference", [], [], table, twin_counts)
        for a, b in zip(params, twins):
            assert _same(a, b), (case, step)
        for got, want in zip(states, twin_states):
            for a, b in zip(got, want):
                assert _same(a, b), (case, step)
        assert torch.equal(counts, twin_counts), (case, step, counts, twin_counts)
    # the element-wise clips did act on the larger tensors (a pure scale counts nothing)
    elementwise = extra & (clip_ref.VALUE_CLIP | clip_ref.ADA_CLIP | ref.SPIKE_CLIP)
    assert (twin_counts[2:] > 0).all() if elementwise else (twin_counts == 0).all()


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("state_bits", [32, 8, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_clip_steps_fp32_params(backend, state_bits, case):
    _run(backend, case, state_bits, torch.float32, "f32")


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("state_bits", [8, 4])
@pytest.mark.parametrize("case", ["stable_spam", "spam_reset"])
def test_clip_steps_bf16_stochastic(backend, state_bits, case):
    _run(backend, case, state_bits, torch.bfloat16, "stochastic")


@pytest.mark.parametrize("backend", kernel_backend_params() + ["reference"])
def test_per_tensor_flags_need_the_table(backend):
    params, states = _make("adam", (10,), torch.float32, 32, "f32")
    sc = _scalars("adam", 1)
    flags = ref.step_flags("adam", sc) | clip_ref.TENSOR_SCALE
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        ops.optim_step(params, [torch.ones(10)], *states, [], "adam", 32, 0, sc, flags, "f32",
                       backend)


RMS_CASES = {"plain": (0, 1e-2, True), "clips": (clip_ref.VALUE_CLIP | clip_ref.TENSOR_SCALE |
                                                 ref.SPIKE_CLIP | ref.RESET, 1e-2, True),
             "l2": (0, 1e-2, False)}


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("state_bits", [32, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(RMS_CASES))
def test_update_clip_statistics_pass(backend, state_bits, dtype, case):
    # the rms pass adds sum(g^2 / max(v_new, eps_t^2)) per tensor and writes nothing else; sums
    # agree with the reference to float64 rounding (backends add in their own order)
    extra, wd, decoupled = RMS_CASES[case]
    wb = "f32" if dtype == torch.float32 else "stochastic"
    torch.manual_seed(9)
    params, states = _make("adam", SIZES, dtype, state_bits, wb)
    for step in (1, 2):  # a real step between the two, so v is not zero at the second
        grads = [(torch.randn(p.shape) * 2.0).to(dtype) for p in params]
        sc = ref.with_clip_scalars(ref.adam_scalars(1e-3, 0.9, 0.999, 1e-8, wd, step, decoupled),
                                   value_clip=1.5, spike_threshold=3.0, spike_floor=1e-3)
        flags = ref.step_flags("adam", sc) | extra
        table = _clip_table(len(SIZES), step)
        keys = [7 + i for i in range(len(SIZES))] if wb == "stochastic" else []
        before = [p.clone() for p in params], [[t.clone() for t in st] for st in states]
        got = torch.zeros(len(SIZES), dtype=torch.float64)
        want = torch.zeros(len(SIZES), dtype=torch.float64)
        ops.optim_step(params, grads, *states, keys, "adam", state_bits, 0, sc, flags, wb,
                       backend, [], [], table, None, got)
        ops.optim_step(params, grads, *states, keys, "adam", state_bits, 0, sc, flags, wb,
                       "reference", [], [], table, None, want)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        assert (want > 0).all()
        assert all(torch.equal(a, b) for a, b in zip(params, before[0]))
        assert all(torch.equal(a, b) for st, bst in zip(states, before[1]) for a, b in zip(st, bst))
        ops.optim_step(params, grads, *states, keys, "adam", state_bits, 0, sc, flags, wb,
                       "reference", [], [], table)


def test_update_scale_needs_adam():
    params, states = _make("lion", (10,), torch.float32, 32, "f32")
    sc = _scalars("lion", 1)
    with pytest.raises(ValueError, match="Adam"):
        ops.optim_step(params, [torch.ones(10)], *states, [], "lion", 32, 0, sc,
                       ref.step_flags("lion", sc) | ref.UPDATE_SCALE, "f32", "reference", [], [],
                       _clip_table(1, 1))


def test_reset_and_spike_semantics():
    # the reference itself: RESET zeroes the loaded moments (the step then starts from zero
    # states), SPIKE_CLIP clamps against the loaded v (before the reset), DECAY_AFTER decays
    # the updated value
    sc = _scalars("adam", 3)
    x = torch.tensor([1.0, 1.0, 1.0])
    g = torch.tensor([10.0, -10.0, 0.5])
    m = torch.tensor([0.3, 0.3, 0.3])
    v = torch.tensor([1.0, 1.0, 1.0])
    base = ref.step_flags("adam", sc)
    x1, m1, v1, clipped = ref.update("adam", x, g, m, v, sc, base | ref.SPIKE_CLIP)
    lim = 3.0 * 1.0  # theta * max(v, floor)
    gc = torch.tensor([lim ** 0.5, -lim ** 0.5, 0.5])
    assert clipped.tolist() == [True, True, False]
    xr, mr, vr, _ = ref.update("adam", x, gc, m, v, sc, base)
    assert torch.equal(x1, xr) and torch.equal(m1, mr) and torch.equal(v1, vr)
    x2, m2, v2, _ = ref.update("adam", x, g, m, v, sc, base | ref.RESET)
    x3, m3, v3, _ = ref.update("adam", x, g, torch.zeros(3), torch.zeros(3), sc, base)
    assert torch.equal(x2, x3) and torch.equal(m2, m3) and torch.equal(v2, v3)
    x4, *_ = ref.update("adam", x, g, m, v, sc, base | ref.DECAY_AFTER)
    no_decay = base & ~ref.DECAY
    x5, *_ = ref.update("adam", x, g, m, v, sc, no_decay)
    assert torch.equal(x4, x5 * torch.tensor(sc[0], dtype=torch.float32))


def test_spike_floor_keeps_zero_v_from_zeroing_gradients():
    # SPAM's test g^2 > theta * v clamps every gradient to 0 where v == 0 (a fresh or quantized-to-0
    # second moment), and v then stays 0: the floor bounds the clamp away from 0 instead.
    sc = _scalars("adam", 5)  # theta 3, floor 1e-3
    x = torch.ones(3)
    g = torch.tensor([0.5, -2.0, 1e-3])
    flags = ref.step_flags("adam", sc) | ref.SPIKE_CLIP
    _, _, v1, clipped = ref.update("adam", x, g, torch.zeros(3), torch.zeros(3), sc, flags)
    bound = (3.0 * 1e-3) ** 0.5
    assert clipped.tolist() == [True, True, False]
    assert (v1 > 0).all()
    want = torch.tensor([bound, -bound, 1e-3]).square() * (1 - 0.999)
    torch.testing.assert_close(v1, want, rtol=1e-6, atol=0)
