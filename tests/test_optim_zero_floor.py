"""The zero floor of 8-bit second moments (lowbit.reference.optim.zero_floor): a positive v never
takes the unsigned map's zero code. Without it, gradients spanning more than ~2500x inside one
block of 256 store the small elements' v as 0 while their m survives, and the next step with a
zero gradient (a rare embedding row) moves them by lr * m / eps, hundreds of lr."""
import pytest
import torch

from lowbit import ops
from lowbit.codebooks import codebook
from lowbit.reference import optim as ref
from conftest import kernel_backend_params

LR = 1e-3


def _wide_grads(n, seed):
    """Gradient magnitudes log-uniform over 1e-7 .. 1 with random signs (a few exact zeros)."""
    g = torch.Generator().manual_seed(seed)
    mag = 10 ** (-7 * torch.rand(n, generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    out = mag * sign
    out[:: 97] = 0.0
    return out


def _states(n):
    lists = [[], [], [], []]
    for j in range(2):
        codes, absmax = ref.quantize_state(torch.zeros(n), j, 8)
        lists[2 * j].append(codes)
        lists[2 * j + 1].append(absmax)
    return lists


def _two_steps(backend, n=1000):
    p = [torch.zeros(n)]
    states = _states(n)
    deltas = []
    for step, g in ((1, _wide_grads(n, 0)), (2, torch.zeros(n))):
        sc = ref.adam_scalars(LR, 0.9, 0.999, 1e-8, 0.0, step)
        before = p[0].clone()
        ops.optim_step(p, [g], *states, [], [], "adam", 8, 0, sc,
                       ref.step_flags("adam", sc, first_step=step == 1), "f32", backend, [], [])
        deltas.append(p[0] - before)
        if step == 1:
            v_codes, g1 = states[2][0].clone(), g
    return p[0], states, deltas, v_codes, g1


def test_reference_never_stores_a_positive_v_as_zero():
    _, _, deltas, v_codes, g = _two_steps("reference")
    zero = int((codebook("udynamic") == 0).nonzero())
    assert zero == 0
    assert not ((v_codes == zero) & (g != 0)).any()
    assert (v_codes[g == 0] == zero).all()  # v = 0 stays 0
    # the second step (zero gradient) moves every element by less than 30 lr; with v stored as 0
    # the smallest-gradient elements would move by lr * m / eps ~ 1e3 lr and more
    assert deltas[1].abs().max() < 30 * LR
    # and the floor changed codes: elements whose nearest v code is 0 exist in this input
    name, block = ref.state_codebook(1, 8)
    v = (1 - 0.999) * g * g
    nearest, _ = ref.quantize_blockwise(v, codebook(name), block)
    assert ((nearest == zero) & (g != 0)).sum() > 10


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_backends_apply_the_same_floor(backend):
    got = _two_steps(backend)
    want = _two_steps("reference")
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a[0], b[0])
