"""lowbit.optim beyond the update rule: state formats, bf16/fp16 parameters (stochastic rounding,
kahan), non-finite gradients, state_dict save / resume / import / export / conversion, bad input."""
import io

import pytest
import torch

import lowbit.optim as lo
from lowbit.reference import optim as ref
from conftest import kernel_backend_params
from optim_helpers import RefTensor


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3))
    return m.to(dtype)


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    losses = []
    for _ in range(steps):
        x, y = torch.randn(32, 64, generator=g).to(dtype), torch.randn(32, 3, generator=g)
        opt.zero_grad()
        loss = ((model(x).float() - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls, kind, bits, kw", [
    (lo.AdamW8bit, "adam", 8, {}), (lo.AdamW4bit, "adam", 4, {}),
    (lo.Lion8bit, "lion", 8, {}), (lo.SGD8bit, "sgd", 8, {"momentum": 0.9})])
def test_quantized_optimizer_equals_reference_and_keeps_small_tensors_32bit(cls, kind, bits, kw):
    model = _model()
    opt = cls(model.parameters(), lr=1e-3, **kw)
    w = model[0].weight   # 5120 elements: quantized; biases (< 4096) keep 32-bit states
    r = RefTensor(w.detach(), kind, bits)
    g = torch.Generator().manual_seed(3)
    for step in range(1, 6):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 0.01
        sc, flag_kw = opt._scalars(opt.param_groups[0], step)
        r.step(w.grad, sc, **flag_kw)
        opt.step()
        assert torch.equal(w.detach(), r.p)
    name = ref.STATE_NAMES[kind][0]
    st = opt.state[w]
    assert st[name + "_codes"].dtype == torch.uint8
    assert torch.equal(st[name + "_codes"], r.states[0][0])
    assert name in opt.state[model[0].bias]        # 80 elements -> 32-bit
    assert st["step"].item() == 5


CKPT_CASES = {
    "adamw32": (lo.AdamW, torch.float32, {}),
    "adamw8": (lo.AdamW8bit, torch.float32, {}),
    "adamw4": (lo.AdamW4bit, torch.float32, {}),
    "adamw8_bf16_sr": (lo.AdamW8bit, torch.bfloat16, {}),
    "adamw4_bf16_kahan": (lo.AdamW4bit, torch.bfloat16, {"kahan": True}),
    "lion8_fp16_sr": (lo.Lion8bit, torch.float16, {}),
    "sgd8_bf16_sr": (lo.SGD8bit, torch.bfloat16, {"momentum": 0.9}),
}


@pytest.mark.parametrize("case", CKPT_CASES)
def test_checkpoint_resume_is_bit_identical(case):
    cls, dtype, kw = CKPT_CASES[case]
    a = _model(dtype)
    opt = cls(a.parameters(), lr=1e-3, seed=5, **kw)
    _train(a, opt, 6)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt.state_dict()}, buf)
    uninterrupted = _train(a, opt, 6, seed=7)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)      # plain tensors only
    b = _model(dtype)
    b.load_state_dict(ckpt["model"])
    opt_b = cls(b.parameters(), lr=1e-3, seed=99, **kw)   # the seed is restored from the ckpt
    opt_b.load_state_dict(ckpt["opt"])
    resumed = _train(b, opt_b, 6, seed=7)
    assert resumed == uninterrupted
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a.parameters(), b.parameters()):
        for k, v in opt.state[pa].items():
            assert v.dtype == opt_b.state[pb][k].dtype and torch.equal(v, opt_b.state[pb][k])


def test_bf16_stochastic_rounding_keeps_updates_below_half_an_ulp():
    # A constant gradient whose SGD step is 1/8 of a bf16 ulp at 1.0: round-to-nearest never moves
    # the parameter; stochastic rounding moves it by the right amount on average (unbiased).
    ulp = 2.0**-7
    results = {}
    for sr in (False, True):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = lo.SGD([p], lr=ulp / 8, stochastic_rounding=sr, seed=3)
        for _ in range(32):
            p.grad = -torch.ones_like(p)   # each step adds ulp/8
            opt.step()
        results[sr] = p.detach().float()
    assert torch.equal(results[False], torch.ones(4096))
    drift = (results[True] - 1.0).mean().item()
    assert abs(drift - 32 * ulp / 8) < 0.1 * 32 * ulp / 8


def test_bf16_kahan_tracks_the_fp32_trajectory():
    torch.manual_seed(0)
    # start and gradients exactly representable in bf16: only the write-back differs
    p0 = torch.randn(8192).bfloat16().float()
    grads = [torch.randn(8192).bfloat16().float() for _ in range(200)]

    def run(dtype, **kw):
        p = torch.nn.Parameter(p0.clone().to(dtype))
        opt = lo.AdamW([p], lr=1e-4, weight_decay=0.0, **kw)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        comp = opt.state[p].get("kahan_comp")
        return p.detach().float() + (comp.float() if comp is not None else 0.0)

    exact = run(torch.float32)
    err = {name: (run(torch.bfloat16, **kw) - exact).abs().mean().item()
           for name, kw in (("nearest", {"stochastic_rounding": False}), ("kahan", {"kahan": True}))}
    assert err["kahan"] < err["nearest"] / 20


def test_nonfinite_gradients_skip_the_group_and_are_reported():
    model = _model()
    opt = lo.AdamW8bit([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    _train(model, opt, 2)
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    p0 = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[0].weight.grad[3, 4] = float("inf")
    model[0].bias.grad[1] = float("nan")
    opt.step()
    info = opt.last_step_info
    assert info[0]["skipped"] and info[0]["nonfinite_tensors"] == 2
    assert not info[1]["skipped"] and info[1]["grad_norm"] > 0
    assert opt.param_groups[0]["skipped_steps"] == 1 and opt.param_groups[1]["skipped_steps"] == 0
    for p, q in zip(model[0].parameters(), p0[:2]):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, before[p][k])
    assert not torch.equal(model[2].weight, p0[2])
    assert opt.state[model[2].weight]["step"].item() == 3
    assert opt.state_dict()["param_groups"][0]["skipped_steps"] == 1

    strict = lo.AdamW(model.parameters(), nonfinite="raise")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[2].bias.grad[0] = float("nan")
    w = model[0].weight.detach().clone()
    with pytest.raises(FloatingPointError, match="param_groups\\[0\\].*inf or NaN"):
        strict.step()
    assert torch.equal(model[0].weight, w) and len(strict.state) == 0


@pytest.mark.parametrize("cls, bits", [(lo.AdamW8bit, 8), (lo.AdamW4bit, 4)])
def test_torch_adamw_state_dict_imports_quantized_and_exports_back(cls, bits):
    a = _model()
    torch_opt = torch.optim.AdamW(a.parameters(), lr=1e-3)
    _train(a, torch_opt, 5)
    ours = cls(a.parameters(), lr=5.0)
    ours.load_state_dict(torch_opt.state_dict())
    assert ours.param_groups[0]["lr"] == 1e-3 and ours.param_groups[0]["state_bits"] == bits
    w = a[0].weight
    st = ours.state[w]
    assert st["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in st
    fmt = ours._format_for(w, ours.param_groups[0])
    m, v = ours._moments_fp32(w, st, ("exp_avg", "exp_avg_sq"), fmt)
    for q, exact, am in ((m, torch_opt.state[w]["exp_avg"], st["exp_avg_absmax"]),
                         (v, torch_opt.state[w]["exp_avg_sq"], st["exp_avg_sq_absmax"])):
        block = ref.STATE_FORMATS[bits][2]
        per_elem = am.repeat_interleave(block)[:w.numel()].view(w.shape)
        assert ((q - exact).abs() <= 0.5 * per_elem).all()   # within a code gap of the block
    assert st["step"].item() == 5
    _train(a, ours, 3)
    # export: torch.optim.AdamW loads it and its next step equals ours from the same state
    exported = ours.export_state_dict()
    assert set(exported["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    b = _model()
    b.load_state_dict(a.state_dict())
    back = torch.optim.AdamW(b.parameters(), lr=1e-3)
    back.load_state_dict(exported)
    check = lo.AdamW(a.parameters(), lr=1e-3)
    check.load_state_dict(exported)
    _train(a, check, 1, seed=4)
    _train(b, back, 1, seed=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_loading_between_state_bits_converts():
    a = _model()
    opt8 = lo.AdamW8bit(a.parameters())
    _train(a, opt8, 4)
    w = a[0].weight
    m8, v8 = opt8._moments_fp32(w, opt8.state[w], ("exp_avg", "exp_avg_sq"), (8, 256))
    opt32 = lo.AdamW(a.parameters())
    opt32.load_state_dict(opt8.state_dict())
    assert torch.equal(opt32.state[w]["exp_avg"], m8)       # dequantization is exact
    opt4 = lo.AdamW4bit(a.parameters())
    opt4.load_state_dict(opt8.state_dict())
    assert opt4.state[w]["exp_avg_codes"].numel() == (w.numel() + 1) // 2
    back8 = lo.AdamW8bit(a.parameters())
    back8.load_state_dict(opt32.state_dict())
    assert torch.equal(back8.state[w]["exp_avg_codes"], opt8.state[w]["exp_avg_codes"])
    for opt in (opt32, opt4, back8):
        losses = _train(a, opt, 3)
        assert all(torch.isfinite(torch.tensor(losses)))


def test_bad_inputs_raise_and_leave_state_unchanged():
    model = _model()
    opt = lo.AdamW8bit(model.parameters())
    _train(model, opt, 2)
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    p0 = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[2].weight.grad = torch.zeros_like(model[2].weight).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    # (torch refuses `p.grad = ...` of another shape, dtype or device; `.grad.data` gets around it)
    model[2].weight.grad = torch.zeros_like(model[2].weight)
    model[2].weight.grad.data = torch.zeros(model[2].weight.shape, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"params'\]\[2\]: gradient dtype torch.bfloat16 does "
                                        "not match parameter dtype torch.float32"):
        opt.step()
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, before[k])
    for p, q in zip(model.parameters(), p0):
        assert torch.equal(p, q)
    c = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    c.grad = torch.zeros_like(c)
    with pytest.raises(RuntimeError, match="complex"):
        lo.AdamW([c]).step()
    f64 = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    f64.grad = torch.zeros_like(f64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        lo.AdamW([f64]).step()
    nc = torch.nn.Parameter(torch.zeros(8, 8).t())
    nc.grad = torch.zeros_like(nc)
    with pytest.raises(RuntimeError, match="non-contiguous"):
        lo.AdamW([nc]).step()
    with pytest.raises(ValueError, match="state_bits must be 32, 8 or 4"):
        lo.AdamW(model.parameters(), state_bits=16)
    with pytest.raises(ValueError, match="exclude each other"):
        lo.AdamW(model.parameters(), kahan=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="Nesterov"):
        lo.SGD(model.parameters(), nesterov=True)


def test_state_dict_from_another_model_is_rejected_at_load():
    a = _model()
    opt = lo.AdamW8bit(a.parameters())
    _train(a, opt, 1)
    other = torch.nn.Sequential(torch.nn.Linear(64, 90), torch.nn.Tanh(), torch.nn.Linear(90, 3))
    opt_o = lo.AdamW8bit(other.parameters())
    _train(other, opt_o, 1)
    before = {k: v.clone() for k, v in opt_o.state[other[0].weight].items()}
    with pytest.raises(RuntimeError, match="saved for another model"):
        opt_o.load_state_dict(opt.state_dict())
    for k, v in opt_o.state[other[0].weight].items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="number of parameter groups"):
        opt_o.load_state_dict({"state": {}, "param_groups": []})


def test_same_seed_same_bits_other_seed_other_bits():
    def run(seed):
        m = _model(torch.bfloat16)
        _train(m, lo.AdamW8bit(m.parameters(), seed=seed), 3)
        return m[0].weight.detach().clone()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_block_size_argument_and_conversion_on_load():
    a = _model()
    opt = lo.AdamW8bit(a.parameters(), block_size=64)
    _train(a, opt, 3)
    w = a[0].weight
    assert opt.state[w]["exp_avg_absmax"].numel() == w.numel() // 64
    other = lo.AdamW4bit(a.parameters(), block_size=1024)
    other.load_state_dict(opt.state_dict())       # 8-bit/64 -> 4-bit/1024
    assert other.state[w]["exp_avg_absmax"].numel() == -(-w.numel() // 1024)
    assert other.param_groups[0]["block_size"] == 1024
    _train(a, other, 2)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        lo.AdamW8bit(a.parameters(), block_size=100)


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_optimizers_on_every_backend_follow_the_reference_bit_for_bit(backend):
    # Whole optimizers (groups, quantized and 32-bit states, bf16 stochastic write-back, Lion and
    # SGD): the same trajectory on the kernel backend as on the reference.
    def run(backend_name):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 3)).bfloat16()
        opts = [lo.AdamW8bit(model[0].parameters(), lr=1e-2, seed=1, backend=backend_name),
                lo.Lion4bit(model[2].parameters(), lr=1e-3, seed=2, min_quant_numel=0,
                            backend=backend_name)]
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            x = torch.randn(8, 96, generator=g).bfloat16()
            for o in opts:
                o.zero_grad()
            model(x).float().square().mean().backward()
            for o in opts:
                o.step()
        return [p.detach().clone() for p in model.parameters()], [
            {k: v.clone() for k, v in o.state[p].items()} for o in opts
            for gr in o.param_groups for p in gr["params"]]

    got, got_states = run(backend)
    want, want_states = run("reference")
    for a, b in zip(got, want):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for sa, sb in zip(got_states, want_states):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_step_bumps_the_parameters_version_like_an_inplace_op():
    # autograd must notice that a tensor it saved was modified by the step
    w = torch.nn.Parameter(torch.randn(5000))
    loss = (w * w).sum()          # saves w for backward
    w.grad = torch.ones_like(w)
    lo.AdamW8bit([w]).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_mixed_dtypes_empty_and_gradless_parameters_in_one_group():
    # one group holding fp32, bf16 and fp16 params (one fused call per dtype), an empty tensor and
    # a parameter without a gradient: each updates exactly as it would alone
    torch.manual_seed(0)
    shapes = [(5000,), (70, 80), (4100,), (0,), (33,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float32]
    init = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]

    def run(with_grad):
        """3 steps of AdamW8bit over params initialised from `init`; only those whose index is in
        `with_grad` get gradients (the same ones every time: one generator, all drawn)."""
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = lo.AdamW8bit(ps, seed=4)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            grads = [torch.randn(t.shape, generator=g).to(t.dtype) for t in init]
            for j, p in enumerate(ps):
                p.grad = grads[j] if j in with_grad else None
            opt.step()
        return ps, opt

    together, opt = run(with_grad={0, 1, 2, 3})
    for i in range(4):
        # (the stochastic-rounding key depends on the parameter's index: keep the positions)
        alone, _ = run(with_grad={i})
        assert torch.equal(alone[i], together[i]), i
    assert torch.equal(together[4], init[4]) and len(opt.state[together[4]]) == 0
