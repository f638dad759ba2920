"""Fused multi-tensor Adam/AdamW step: the CPU kernel, the CUDA kernel (run by the simulator)
and the Triton kernel (run by the interpreter) equal the reference bit for bit (params, codes,
absmax, fp32 moments) on one call over tensors of awkward sizes. Issue 3 (fp32 params)."""
import pytest
import torch

import lowbit
from lowbit import ops
from lowbit.reference import optim as ref

SIZES = (1, 255, 257, 4097, 33 * 65)


def _make_states(params, state_bits):
    m, m_abs, v, v_abs = [], [], [], []
    for p in params:
        st = ref.init_state(p, state_bits)
        if state_bits == 32:
            m.append(st["exp_avg"]), v.append(st["exp_avg_sq"])
        else:
            m.append(st["exp_avg_codes"]), m_abs.append(st["exp_avg_absmax"])
            v.append(st["exp_avg_sq_codes"]), v_abs.append(st["exp_avg_sq_absmax"])
    return m, m_abs, v, v_abs


def _backend_params():
    # conftest.kernel_backend_params(), spelled out: every kernel backend implements adam_step.
    available = lowbit.available_backends()
    return [pytest.param(name, id=name, marks=() if name in available else pytest.mark.skip(
        reason=f"backend {name!r} is not built in this install"))
        for name in ("cpu", "cuda_sim", "triton")]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("state_bits", [32, 8, 4])
@pytest.mark.parametrize("variant", ["adamw", "adam_l2", "maximize"])
def test_fused_adam_matches_reference(backend, state_bits, variant):
    torch.manual_seed(state_bits)
    params = [torch.randn(n) * 0.1 for n in SIZES]
    twins = [p.clone() for p in params]
    states = _make_states(params, state_bits)
    ref_states = _make_states(twins, state_bits)
    decoupled, maximize = variant != "adam_l2", variant == "maximize"
    for step in range(1, 6):
        grads = [torch.randn(n) * (10.0 ** (step - 3)) for n in SIZES]
        sc = ref.adam_scalars(1e-3, 0.9, 0.999, 1e-8, 1e-2, step, decoupled)
        scalars = [sc[k] for k in ("decay", "wd", "a1", "b2", "a2", "bc2", "eps", "step_size")]
        ops.adam_step(params, grads, *states, state_bits, scalars, maximize, backend)
        ops.adam_step(twins, grads, *ref_states, state_bits, scalars, maximize, "reference")
        for a, b in zip(params, twins):
            assert torch.equal(a, b)
        for got, want in zip(states, ref_states):
            for a, b in zip(got, want):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
