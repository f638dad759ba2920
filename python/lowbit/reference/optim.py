"""Reference Adam/AdamW step with 32-, 8- and 4-bit states: the spec the fused optimizer kernels
(issue 3) must reproduce. fp32 parameters only so far; bf16/fp16 write-back with stochastic
rounding is specified with the kernels.

Per element, every operation rounded once in fp32, in this order (torch.optim.AdamW's order, so
32-bit states match it within fp32 rounding; torch itself may fuse some of these into FMAs):

    g  = -g                                  if maximize
    p  = p * decay                           AdamW: decay = fp32(1 - lr * weight_decay)
    g  = g + wd * p                          Adam with weight_decay (L2, coupled) instead
    m  = m + a1 * (g - m)                    a1 = fp32(1 - beta1)   (torch's lerp for weight < .5)
    v  = v * b2 + a2 * (g * g)               b2 = fp32(beta2), a2 = fp32(1 - beta2)
    d  = sqrt(v) / bc2 + eps                 bc2 = fp32(sqrt(1 - beta2**step)), eps = fp32(eps)
    p  = p - step_size * (m / d)             step_size = fp32(lr / (1 - beta1**step))

The host-side scalars are computed in float64 and rounded to fp32 once. Quantized states
(8-bit: m "dynamic" / v "udynamic", block 256; 4-bit: m "dynamic4" / v "linear4_nozero", block
128) are dequantized before the update, the parameter update uses the unquantized new m and v,
and the new m and v are quantized with nearest rounding against absmax recomputed from the new
values (lowbit.reference.quant).
"""
import math
import struct

import torch

from .quant import dequantize_blockwise, quantize_blockwise
from .. import codebooks

# state_bits -> (m codebook, v codebook, block size)
STATE_FORMATS = {8: ("dynamic", "udynamic", 256), 4: ("dynamic4", "linear4_nozero", 128)}


def f32(x: float) -> float:
    """Round a Python float (float64) to the nearest fp32 value."""
    return struct.unpack("f", struct.pack("f", x))[0]


def adam_scalars(lr, beta1, beta2, eps, weight_decay, step, decoupled=True):
    """The fp32 scalars of one step (see the module docstring)."""
    return {
        "decay": f32(1.0 - lr * weight_decay) if decoupled else 1.0,
        "wd": 0.0 if decoupled else f32(weight_decay),
        "a1": f32(1.0 - beta1),
        "b2": f32(beta2),
        "a2": f32(1.0 - beta2),
        "bc2": f32(math.sqrt(1.0 - beta2 ** step)),
        "eps": f32(eps),
        "step_size": f32(lr / (1.0 - beta1 ** step)),
    }


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # IEEE fp32 division; float64 then one rounding is exact, and avoids torch's reciprocal
    # multiply for scalar divisors.
    return (a.double() / b.double()).float()


def _sqrt(a: torch.Tensor) -> torch.Tensor:
    # Correctly rounded fp32 square root: torch's vectorized CPU sqrt is not (it differs from
    # IEEE sqrt in the last bit for some inputs); float64 then one rounding is exact.
    return torch.sqrt(a.double()).float()


def adam_update(p, g, m, v, sc, maximize=False):
    """One fp32 Adam/AdamW update of (p, m, v) by g; returns new (p, m, v), all fp32."""
    p, g, m, v = (t.to(torch.float32) for t in (p, g, m, v))
    if maximize:
        g = -g
    if sc["decay"] != 1.0:
        p = p * _t(sc["decay"])
    if sc["wd"] != 0.0:
        g = g + _t(sc["wd"]) * p
    m = m + _t(sc["a1"]) * (g - m)
    v = v * _t(sc["b2"]) + _t(sc["a2"]) * (g * g)
    d = _div(_sqrt(v), _t(sc["bc2"]).expand_as(v)) + _t(sc["eps"])
    p = p - _t(sc["step_size"]) * _div(m, d)
    return p, m, v


def init_state(p: torch.Tensor, state_bits: int) -> dict:
    """Zero moments in the storage format of `state_bits` (32: fp32 tensors)."""
    if state_bits == 32:
        return {"exp_avg": torch.zeros_like(p, dtype=torch.float32),
                "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
    m_code, v_code, block = STATE_FORMATS[state_bits]
    zero = torch.zeros(p.numel(), dtype=torch.float32)
    state = {}
    for key, code in (("exp_avg", m_code), ("exp_avg_sq", v_code)):
        codes, absmax = quantize_blockwise(zero, codebooks.codebook(code), block)
        state[key + "_codes"], state[key + "_absmax"] = codes, absmax
    return state


def load_moments(state: dict, p: torch.Tensor, state_bits: int):
    """The fp32 moments (m, v) a state holds, in p's shape."""
    if state_bits == 32:
        return state["exp_avg"], state["exp_avg_sq"]
    m_code, v_code, block = STATE_FORMATS[state_bits]
    out = []
    for key, code in (("exp_avg", m_code), ("exp_avg_sq", v_code)):
        out.append(dequantize_blockwise(state[key + "_codes"], state[key + "_absmax"],
                                        codebooks.codebook(code), block, p.shape, torch.float32))
    return tuple(out)


def store_moments(state: dict, m: torch.Tensor, v: torch.Tensor, state_bits: int) -> None:
    if state_bits == 32:
        state["exp_avg"], state["exp_avg_sq"] = m, v
        return
    m_code, v_code, block = STATE_FORMATS[state_bits]
    for key, code, value in (("exp_avg", m_code, m), ("exp_avg_sq", v_code, v)):
        codes, absmax = quantize_blockwise(value.reshape(-1), codebooks.codebook(code), block)
        state[key + "_codes"], state[key + "_absmax"] = codes, absmax


def adam_step(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr, beta1, beta2, eps,
              weight_decay, step, state_bits=32, decoupled=True, maximize=False) -> torch.Tensor:
    """One step for one fp32 parameter: updates `state` in place, returns the new parameter."""
    m, v = load_moments(state, p, state_bits)
    sc = adam_scalars(lr, beta1, beta2, eps, weight_decay, step, decoupled)
    p_new, m_new, v_new = adam_update(p, g, m, v, sc, maximize)
    store_moments(state, m_new, v_new, state_bits)
    return p_new
