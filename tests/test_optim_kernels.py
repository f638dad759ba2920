"""Fused multi-tensor Adam/AdamW step: the CPU kernel, the CUDA kernel (run by the simulator)
and the Triton kernel (run by the interpreter) equal the reference bit for bit (params, codes,
absmax, fp32 moments) on one call over tensors of awkward sizes. Issue 3 (fp32 params)."""
import pytest
import torch

import lowbit
from lowbit import ops
from lowbit.reference import optim as ref
from conftest import kernel_backend_params

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


def _step_both(backend, params, twins, states, ref_states, grads, state_bits, sc, maximize):
    """One fused step on `backend` and on the reference; then everything must be identical."""
    scalars = [sc[k] for k in ("decay", "wd", "a1", "b2", "a2", "bc2", "eps", "step_size")]
    ops.adam_step(params, grads, *states, state_bits, scalars, maximize, backend)
    ops.adam_step(twins, grads, *ref_states, state_bits, scalars, maximize, "reference")
    for a, b in zip(params, twins):
        assert torch.equal(a, b)
    for got, want in zip(states, ref_states):
        for a, b in zip(got, want):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("backend", kernel_backend_params())
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
        _step_both(backend, params, twins, states, ref_states, grads, state_bits, sc, maximize)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("state_bits", [32, 8, 4])
def test_many_tensors_in_one_call(backend, state_bits):
    # More tensors than one CUDA launch's parameter table holds (32), empty ones included.
    torch.manual_seed(1)
    sizes = [0, 1] + torch.randint(2, 700, (38,)).tolist()
    params = [torch.randn(n) for n in sizes]
    twins = [p.clone() for p in params]
    states, ref_states = _make_states(params, state_bits), _make_states(twins, state_bits)
    for step in (1, 2):
        grads = [torch.randn(n) for n in sizes]
        sc = ref.adam_scalars(1e-2, 0.9, 0.99, 1e-8, 0.1, step)
        _step_both(backend, params, twins, states, ref_states, grads, state_bits, sc, False)
