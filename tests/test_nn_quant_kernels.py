"""QuantLinear on every kernel backend equals QuantLinear on the reference bit for bit: forward
output and the three gradients, for each preset, a stochastic gradient with a quantized saved
activation, in fp32 and bf16."""
import pytest
import torch

from lowbit.nn import FP4, FP8, INT4, LinearQuantConfig, QuantLinear, TensorQuant

from conftest import kernel_backend_params

STOCHASTIC = LinearQuantConfig(
    weight=TensorQuant("int8", scaling="row"), activation=TensorQuant("int8", block_size=16),
    grad_output=TensorQuant("e2m1", block_size=32, scale_format="e8m0", rounding="stochastic",
                            hadamard=True, hadamard_block=16),
    saved_activation=TensorQuant("e4m3", scaling="column", rounding="stochastic"), seed=7)
CONFIGS = {"int4": INT4, "fp8": FP8, "fp4": FP4, "stochastic": STOCHASTIC}


def forward_backward(config, backend, dtype, calls=2):
    torch.manual_seed(3)
    layer = QuantLinear(64, 96, config=config, layer_index=2, dtype=dtype, backend=backend)
    out = []
    for _ in range(calls):     # a second call draws fresh stochastic bits
        x = torch.randn(3, 11, 64).to(dtype).requires_grad_(True)
        g = torch.randn(3, 11, 96).to(dtype)
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(g)
        out += [y, x.grad, layer.weight.grad, layer.bias.grad]
    return out


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quant_linear_kernels_equal_the_reference(backend, name, dtype):
    want = forward_backward(CONFIGS[name], "reference", dtype)
    got = forward_backward(CONFIGS[name], backend, dtype)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
