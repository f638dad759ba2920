"""The fp32 form of quantized states (lowbit.optim._checkpoint: export_state_dict, and the
reshardable state dicts of FSDP2 parameters) quantizes back to the very same codes and absmax:
the single-process half of the claim that a DCP resume continues bit for bit."""
import pytest
import torch

import lowbit.optim as lo
from lowbit.optim._checkpoint import carry_absmax
from lowbit.reference import optim as ref

# block-aligned, a short last block, an odd element count (4-bit: a half-used last byte)
SHAPES = [(64, 256), (33, 100), (33, 101)]


def _trained(cls, shape, steps=3):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = cls([p], lr=1e-2, min_quant_numel=0)
    for i in range(steps):
        p.grad = torch.randn(shape) * (10.0 if i == 1 else 1.0)  # a spike: blocks change scale
        opt.step()
    return p, opt


@pytest.mark.parametrize("cls", [lo.AdamW8bit, lo.AdamW4bit, lo.StableSPAM8bit])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_form_requantizes_to_the_same_codes_and_absmax(cls, shape):
    p, opt = _trained(cls, shape)
    again = cls([p], lr=1e-2, min_quant_numel=0)
    again.load_state_dict(opt.export_state_dict())
    state = opt.state[p]
    assert state["exp_avg_codes"].dtype == torch.uint8
    for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
        assert torch.equal(again.state[p][k], state[k]), k


@pytest.mark.parametrize("bits", [8, 4])
def test_carry_absmax_needs_the_correction_and_changes_one_element_per_block(bits):
    """Without carry_absmax, blocks whose largest |m| is negative lose their absmax (the signed
    maps stop at -0.99297 / -0.8875); with it, one element of each such block reads -absmax,
    within one code step of the plain dequantized value."""
    cls = lo.AdamW8bit if bits == 8 else lo.AdamW4bit
    p, opt = _trained(cls, (64, 256))
    st, block = opt.state[p], ref.STATE_FORMATS[bits][2]
    codes, absmax = st["exp_avg_codes"], st["exp_avg_absmax"]
    plain = ref.dequantize_state(codes, absmax, 0, bits, p.shape, block)
    requant = ref.quantize_state(plain, 0, bits, block)[1]
    lost = requant != absmax
    assert lost.any()  # the plain round trip is not exact for some blocks
    carried = carry_absmax(plain.clone(), codes, absmax, 0, (bits, block))
    changed = (carried != plain).view(-1, block)
    assert torch.equal(changed.sum(1), lost.long())  # exactly one element in those blocks
    assert torch.equal(carried.view(-1, block)[changed], -absmax[lost])
    step = 0.13 if bits == 4 else 0.01  # -1 to the most negative entry, relative to absmax
    assert ((carried - plain).abs().view(-1, block).amax(1) <= step * absmax).all()
    assert torch.equal(ref.quantize_state(carried, 0, bits, block)[1], absmax)


def test_a_state_in_both_forms_raises():
    # what DCP's full-state-dict load makes of a plain model's compact state dict given to an
    # FSDP2 model (its fp32 template states plus the codes): refused, not silently resolved
    p, opt = _trained(lo.AdamW8bit, (64, 256))
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(64, 256)
    with pytest.raises(ValueError, match="both 'exp_avg' .fp32. and 'exp_avg_codes'"):
        lo.AdamW8bit([p], lr=1e-2, min_quant_numel=0).load_state_dict(sd)
