"""QuantLinear: nn.Linear with fake-quantized operands (simulated low precision).

THIS SIMULATES LOW PRECISION. Every quantized tensor is quantized and immediately dequantized
(lowbit.lowprec.fake_quant: one fused kernel pass on the cpu, cuda and triton backends) and the
matmuls run in the operands' own dtype on those dequantized values; no low-precision matmul
happens here. What the model sees — every forward value and gradient — is what a real 4/8-bit
pipeline with the same rounding and scaling would produce, up to the accumulation order and
precision of the matmul. The one real memory saving is the optional saved_activation role.

Forward:   y = fq_a(x) @ fq_w(W)^T + b
Backward:  g_hat = fq_g(dL/dy); dL/dx = g_hat @ fq_w(W); dL/dW = g_hat^T @ x_s;
           dL/db = sum of g_hat (straight-through: the quantizers count as the identity).
x_s is fq_a(x), or with a saved_activation spec the dequantized codes of fq_a(x) under that spec
(kept between forward and backward as one code byte per element plus the scales).
With a Hadamard rotation, fq(t) = H(fake_quant(H(t))) on the inner dimension, H the normalized
block Walsh–Hadamard transform (its own inverse), fp32 in between and one cast at the end
(lowbit.reference.hadamard.rotated_fake_quant). For the forward this equals
fake_quant(x H) @ fake_quant(W H)^T (HH^T = I), the rotated low-precision product; for the
gradient the inner dimension of g_hat @ fq_w(W) is out_features, and g_hat^T @ x reuses the same
rotated-back g_hat. A role with no quantizer is used as is and never rotated (a rotation alone
changes nothing but rounding); an all-None config, or `layer.quantize = False`, runs nn.Linear's
own F.linear, bit for bit. Otherwise the backward is the three matmuls above, written out.

Randomness: a stochastic role uses the Philox key sr_key(config.seed, 4 * layer_index + role,
call) with role 0 weight, 1 activation, 2 grad_output, 3 saved_activation and `call` the layer's
forward count (the backward uses its forward's count); element i (offset 0) uses word i % 4 of
counter i // 4, as lowbit.reference.lowprec says. Same seed, layer order and call sequence ->
same bits. The count is the layer's extra state in state_dict(), so a resumed run draws what
the uninterrupted one would.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import lowprec
from ..reference.lowprec import Quantized, check_float
from ..reference.optim import sr_key
from .config import ROLES, LinearQuantConfig, NONE, TensorQuant

_ROLE_ID = {role: i for i, role in enumerate(ROLES)}


def fq(t: torch.Tensor, spec: TensorQuant | None, key: int, backend: str | None = None):
    """The fake quantizer of one role, with its optional Hadamard rotation of the last dim."""
    if spec is None:
        return t
    return lowprec.fake_quant(t, spec, key, hadamard_block=spec.hadamard_block
                              if spec.hadamard else 0, backend=backend)


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, config, keys, backend):
        x_hat = fq(x, config.activation, keys[1], backend)
        w_hat = fq(weight, config.weight, keys[0], backend)
        spec_s = config.saved_activation
        ctx.saved_spec, ctx.x_dtype = None, x_hat.dtype
        if spec_s is not None and ctx.needs_input_grad[1]:
            q = lowprec.quantize(x_hat, spec_s, keys[3], backend=backend)
            ctx.saved_spec = spec_s
            ctx.save_for_backward(q.codes, q.scales, w_hat, bias)
        else:
            ctx.save_for_backward(x_hat, None, w_hat, bias)
        ctx.spec_g, ctx.key_g, ctx.backend = config.grad_output, keys[2], backend
        return F.linear(x_hat, w_hat, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x_saved, scales, w_hat, bias = ctx.saved_tensors
        if ctx.saved_spec is not None:
            x_saved = lowprec.dequantize(Quantized(x_saved, scales), ctx.saved_spec, ctx.x_dtype)
        g_hat = fq(grad_out, ctx.spec_g, ctx.key_g, ctx.backend)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = g_hat.reshape(-1, g_hat.shape[-1])
        grad_x = g_hat.matmul(w_hat) if need_x else None
        grad_w = g2.t().mm(x_saved.reshape(-1, x_saved.shape[-1])) if need_w else None
        grad_b = g2.sum(0) if need_b and bias is not None else None
        return grad_x, grad_w, grad_b, None, None, None


class QuantLinear(nn.Linear):
    """nn.Linear whose forward/backward simulate low-precision operands (see the module
    docstring: matmuls run in the operands' dtype on dequantized values).

    config: a LinearQuantConfig (lowbit.nn.INT4, FP8, FP4, NONE or your own).
    layer_index: distinguishes layers' random streams (convert() numbers them in order).
    backend: the lowbit backend of the quantize kernels (None: the default for the device).
    Set `quantize = False` to run exactly as nn.Linear (e.g. for evaluation).
    state_dict() carries the forward count (the position of the random streams) as extra state;
    loading a plain nn.Linear's state dict keeps the current count.
    """

    def __init__(self, in_features, out_features, bias=True, config: LinearQuantConfig = NONE,
                 layer_index: int = 0, device=None, dtype=None, backend: str | None = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(config, layer_index, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LinearQuantConfig = NONE,
                    layer_index: int = 0, backend: str | None = None) -> "QuantLinear":
        """A QuantLinear holding the very same weight and bias Parameter objects as `linear`
        (optimizers that already hold them keep working). Hooks are not carried over."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight = linear.weight
        if linear.bias is None:
            q.register_parameter("bias", None)
        else:
            q.bias = linear.bias
        q.train(linear.training)
        q._setup(config, layer_index, backend)
        return q

    def _setup(self, config, layer_index, backend):
        if not isinstance(config, LinearQuantConfig):
            raise TypeError(f"config must be a LinearQuantConfig, got {type(config).__name__}")
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
            raise ValueError(f"layer_index must be a non-negative int, got {layer_index!r}")
        hb = config.forward_hadamard()
        if hb is not None and self.in_features % hb:
            raise ValueError(f"in_features={self.in_features} is not a multiple of the forward "
                             f"hadamard block {hb}")
        g = config.grad_output
        if g is not None and g.hadamard and self.out_features % g.hadamard_block:
            raise ValueError(f"out_features={self.out_features} is not a multiple of the "
                             f"grad_output hadamard block {g.hadamard_block}")
        self.config, self.layer_index, self.backend = config, layer_index, backend
        # no role quantized: nn.Linear's own computation (and autograd), bit for bit
        self._plain = all(getattr(config, r) is None for r in ROLES)
        self.quantize, self.calls = True, 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_float("input", input)
        if not self.quantize or self._plain:
            return F.linear(input, self.weight, self.bias)
        base = len(ROLES) * self.layer_index
        keys = tuple(sr_key(self.config.seed, base + r, self.calls) for r in range(len(ROLES)))
        self.calls += 1
        return _QuantLinearFn.apply(input, self.weight, self.bias, self.config, keys,
                                    self.backend)

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or not isinstance(state.get("calls"), int):
            raise ValueError(f"QuantLinear extra state must be {{'calls': int}}, got {state!r}")
        self.calls = state["calls"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A plain nn.Linear checkpoint (e.g. the model before convert()) has no stream position:
        # load it without reporting the extra state as missing, as BatchNorm does for
        # num_batches_tracked.
        missing = []
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                      unexpected_keys, error_msgs)
        missing_keys.extend(k for k in missing if k != prefix + "_extra_state")

    def extra_repr(self) -> str:
        c = self.config
        roles = ", ".join(f"{r}={getattr(c, r).format if getattr(c, r) else None}"
                          for r in _ROLE_ID)
        return f"{super().extra_repr()}, {roles}"
