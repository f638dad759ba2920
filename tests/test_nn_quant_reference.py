"""lowbit.nn reference: QuantLinear equals nn.Linear with quantization off, its forward is the
documented composition, its stochastically rounded gradient is unbiased (and round-to-nearest's
is not), convert() swaps the right layers keeping the Parameters, and small models train under
the INT4 and FP4 presets."""
import math

import pytest
import torch
from torch import nn

import lowbit.nn as lnn
from lowbit.nn import FP4, FP8, INT4, NONE, LinearQuantConfig, QuantLinear, TensorQuant
from lowbit.nn.linear import fq
from lowbit.reference.hadamard import block_hadamard
from lowbit.reference.lowprec import fake_quant


def twin(in_f, out_f, bias, dtype, config):
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    q = QuantLinear(in_f, out_f, bias=bias, config=config, dtype=dtype)
    with torch.no_grad():
        q.weight.copy_(ref.weight)
        if bias:
            q.bias.copy_(ref.bias)
    return ref, q


def run(layer, x, g):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return y, grads


@pytest.mark.parametrize("config, disable", [(NONE, False), (INT4, True), (FP4, True),
                                             (FP8, True)], ids=["none", "int4-off", "fp4-off",
                                                                 "fp8-off"])
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 64)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantization_off_equals_nn_linear_exactly(config, disable, shape, bias, dtype):
    # FP4 has the Hadamard rotation on, INT4/FP8 off; switched off, none may change a bit.
    ref, q = twin(64, 32, bias, dtype, config)
    q.quantize = not disable
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape[:-1] + (32,), generator=gen).to(dtype)
    y_ref, g_ref = run(ref, x, g)
    y_q, g_q = run(q, x, g)
    assert torch.equal(y_ref, y_q)
    for a, b in zip(g_ref, g_q):
        assert torch.equal(a, b)


def test_forward_and_backward_are_the_documented_composition():
    ref, q = twin(64, 32, True, torch.float32, FP4)
    x = torch.randn(9, 64)
    g = torch.randn(9, 32)
    y, (gx, gw, gb) = run(q, x, g)
    keys = [lnn.linear.sr_key(0, r, 0) for r in range(3)]
    # rotate, fake-quantize, rotate back (H is its own inverse)
    x_hat = block_hadamard(fake_quant(block_hadamard(x, 32), FP4.activation, keys[1]), 32)
    w_hat = block_hadamard(fake_quant(block_hadamard(ref.weight.detach(), 32), FP4.weight,
                                      keys[0]), 32)
    assert torch.equal(y, nn.functional.linear(x_hat, w_hat, ref.bias.detach()))
    g_hat = fq(g, FP4.grad_output, keys[2])
    assert torch.allclose(gx, g_hat @ w_hat, atol=1e-5)
    assert torch.allclose(gw, g_hat.t() @ x_hat, atol=1e-5)
    assert torch.allclose(gb, g_hat.sum(0), atol=1e-5)
    # the rotated forward equals the low-precision product in the rotated basis
    xr = fake_quant(block_hadamard(x, 32), FP4.activation, keys[1])
    wr = fake_quant(block_hadamard(ref.weight.detach(), 32), FP4.weight, keys[0])
    assert torch.allclose(y, xr @ wr.t() + ref.bias.detach(), atol=1e-4)
    # the INT4 preset quantizes both operands and leaves the gradient alone
    _, q4 = twin(64, 32, False, torch.float32, INT4)
    y4, (gx4, _) = run(q4, x, g)
    w4 = fake_quant(q4.weight.detach(), INT4.weight)
    assert torch.equal(y4, fake_quant(x, INT4.activation) @ w4.t())
    assert torch.allclose(gx4, g @ w4, atol=1e-5)


def sr_grad_config(rounding, hadamard):
    return LinearQuantConfig(grad_output=TensorQuant("e2m1", scaling="row", rounding=rounding,
                                                     hadamard=hadamard, hadamard_block=32),
                             seed=123)


@pytest.mark.parametrize("hadamard", [False, True])
def test_stochastic_gradient_is_unbiased_and_nearest_is_biased(hadamard):
    # dL/dy = G is designed so that round-to-nearest is biased: row scale 1 (an entry 6), the
    # rest at 0.7, which RTN sends to 0.5. SR is unbiased: the mean of N draws of dW = g_hat^T x
    # lies within 5 standard deviations, Var(dW_ij) <= sum_t x_tj^2 (gap_t)^2 / 4 with gap_t <=
    # 2 * scale_t the widest E2M1 step (a rotation mixes independent errors with unit-norm
    # weights, so the same bound holds), and the same for dx through W.
    t, i, o, n = 16, 32, 32, 300
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(t, i, generator=gen) + 0.5
    G = torch.full((t, o), 0.7)
    G[:, 0] = 6.0
    if hadamard:     # make the *rotated* gradient the designed one
        G = block_hadamard(G, 32)
    layer = QuantLinear(i, o, bias=False, config=sr_grad_config("stochastic", hadamard))
    w = layer.weight.detach()
    true_w, true_x = G.t() @ x, G @ w
    mean_w, mean_x = torch.zeros(o, i), torch.zeros(t, i)
    for _ in range(n):
        xs = x.clone().requires_grad_(True)
        layer.weight.grad = None
        layer(xs).backward(G)
        mean_w += layer.weight.grad / n
        mean_x += xs.grad / n
    scale = (block_hadamard(G, 32) if hadamard else G).abs().amax(1) / 6
    sd_w = torch.sqrt((x**2 * scale[:, None] ** 2).sum(0) / n)[None, :]      # (1, i)
    sd_x = torch.sqrt(((w**2).sum(0)[None, :]) * scale[:, None] ** 2 / n)    # (t, i)
    assert ((mean_w - true_w).abs() <= 5 * sd_w + 1e-4).all()
    assert ((mean_x - true_x).abs() <= 5 * sd_x + 1e-4).all()
    # round-to-nearest: deterministic, and its error (0.2 * sum_t x_tj per entry, or that
    # rotated back into the first output row with Hadamard) lies far outside SR's bound
    rn = QuantLinear(i, o, bias=False, config=sr_grad_config("nearest", hadamard))
    with torch.no_grad():
        rn.weight.copy_(w)
    rn(x).backward(G)
    excess = (rn.weight.grad - true_w).abs() / (5 * sd_w)
    assert (excess.amax() > 10) if hadamard else (excess[1:] > 2).all()


def test_stochastic_streams_are_reproducible_and_fresh_per_call():
    cfg = sr_grad_config("stochastic", False)
    grads = []
    for _ in range(2):
        layer = QuantLinear(32, 32, bias=False, config=cfg)
        with torch.no_grad():
            layer.weight.fill_(0.1)
        x = torch.ones(4, 32)
        g = torch.linspace(-1, 1, 128).view(4, 32)
        calls = []
        for _ in range(2):
            layer.weight.grad = None
            layer(x).backward(g)
            calls.append(layer.weight.grad.clone())
        assert not torch.equal(calls[0], calls[1])      # a new key every call
        grads.append(calls)
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # same seed -> same bits


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)      # excluded by name ("*embed*")
        self.blocks = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU())
        self.head = nn.Linear(32, 4)       # excluded by name

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def test_convert_swaps_the_right_layers_and_keeps_the_parameters():
    torch.manual_seed(0)
    model = Tiny()
    params_before = {name: p for name, p in model.named_parameters()}
    embed, head = model.embed, model.head
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert lnn.convert(model, INT4) is model
    assert type(model.blocks[0]) is QuantLinear and type(model.blocks[2]) is QuantLinear
    assert model.embed is embed and type(embed) is nn.Linear
    assert model.head is head and type(head) is nn.Linear
    assert [model.blocks[0].layer_index, model.blocks[2].layer_index] == [0, 1]
    for name, p in model.named_parameters():
        assert p is params_before[name]
    before = model.blocks[0].weight.detach().clone()
    model(torch.randn(5, 8)).square().mean().backward()
    opt.step()                                  # the old optimizer still moves the layers
    assert not torch.equal(before, model.blocks[0].weight)
    # explicit patterns override the config's; already converted layers are left alone
    m2 = lnn.convert(Tiny(), FP8, exclude=("blocks.2",))
    assert [type(m2.embed), type(m2.blocks[0]), type(m2.blocks[2]), type(m2.head)] == \
        [QuantLinear, QuantLinear, nn.Linear, QuantLinear]
    first = m2.blocks[0]
    lnn.convert(m2, FP8, exclude=())
    assert m2.blocks[0] is first


@pytest.mark.parametrize("config", [INT4, FP4], ids=["int4", "fp4"])
def test_tiny_model_trains_under_the_preset(config):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(256, 8)
    with torch.no_grad():
        target = teacher(x)
    model = lnn.convert(Tiny(), config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        batch = slice((step % 4) * 64, (step % 4 + 1) * 64)
        loss = nn.functional.mse_loss(model(x[batch]), target[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown format 'fp6'"):
        TensorQuant("fp6")
    with pytest.raises(ValueError, match="hadamard block must be a power of two"):
        TensorQuant("e2m1", hadamard=True, hadamard_block=24)
    with pytest.raises(ValueError, match="same hadamard setting"):
        LinearQuantConfig(weight=TensorQuant("int4", hadamard=True),
                          activation=TensorQuant("int4"))
    with pytest.raises(TypeError, match="grad_output must be a TensorQuant"):
        LinearQuantConfig(grad_output="e5m2")
    with pytest.raises(ValueError, match="in_features=48 is not a multiple"):
        QuantLinear(48, 32, config=FP4)
    with pytest.raises(ValueError, match="out_features=40 is not a multiple"):
        QuantLinear(32, 40, config=FP4)
    with pytest.raises(ValueError, match="in_features=8"):
        lnn.convert(nn.Sequential(nn.Linear(8, 32)), FP4)
    with pytest.raises(TypeError, match="config must be a LinearQuantConfig"):
        lnn.convert(nn.Linear(4, 4), "int4")
    with pytest.raises(TypeError, match="input must be a floating tensor"):
        QuantLinear(32, 32, config=INT4)(torch.ones(2, 32, dtype=torch.int64))


def test_saved_activation_is_kept_as_codes_and_feeds_the_weight_gradient():
    spec = TensorQuant("int8", scaling="row")
    cfg = LinearQuantConfig(activation=TensorQuant("e4m3", scaling="row"), saved_activation=spec,
                            seed=5)
    layer = QuantLinear(64, 32, config=cfg)
    x = torch.randn(10, 64, requires_grad=True)
    g = torch.randn(10, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.backward(g)
    # the activation travels as one int8 code per element plus one fp32 scale per row
    assert sorted(str(t.dtype) for t in saved if t.shape[0] == 10) == ["torch.float32",
                                                                       "torch.int8"]
    keys = [lnn.linear.sr_key(5, r, 0) for r in range(4)]
    x_hat = fake_quant(x.detach(), cfg.activation, keys[1])
    w = layer.weight.detach()
    assert torch.equal(y, nn.functional.linear(x_hat, w, layer.bias.detach()))
    x_s = fake_quant(x_hat, spec, keys[3])
    assert torch.allclose(layer.weight.grad, g.t() @ x_s, atol=1e-5)
    assert not torch.allclose(layer.weight.grad, g.t() @ x_hat, atol=1e-5)
    assert torch.allclose(x.grad, g @ w, atol=1e-5)      # dL/dx does not read the activation
    with pytest.raises(ValueError, match="saved_activation cannot use a hadamard"):
        LinearQuantConfig(saved_activation=TensorQuant("int8", hadamard=True))


def test_state_dict_carries_the_stream_position_and_loads_plain_linear_checkpoints():
    cfg = sr_grad_config("stochastic", False)
    torch.manual_seed(0)
    model = lnn.convert(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)), cfg, exclude=())
    x, g = torch.randn(4, 32), torch.randn(4, 32)

    def step(m):
        m.zero_grad()
        m(x).backward(g)
        return m[0].weight.grad.clone()

    step(model)
    sd = model.state_dict()
    assert sd["0._extra_state"] == {"calls": 1}
    want = step(model)
    torch.manual_seed(0)
    resumed = lnn.convert(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)), cfg, exclude=())
    resumed.load_state_dict(sd)
    assert resumed[0].calls == 1 and torch.equal(step(resumed), want)
    # a checkpoint of the unconverted model loads strictly and keeps the count
    plain = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    resumed.load_state_dict(plain.state_dict())
    assert resumed[0].calls == 2 and torch.equal(resumed[0].weight, plain[0].weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        resumed.load_state_dict({"0.weight": plain[0].weight})
    with pytest.raises(ValueError, match="extra state must be"):
        resumed[0].set_extra_state({"calls": "3"})
