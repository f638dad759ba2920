"""The reshardable state-dict form of the states of DTensor (FSDP2) parameters, for
torch.distributed.checkpoint (DCP) and full (unsharded) state-dict exports.

Under FSDP2 a quantized state is this rank's shard quantized in blocks counted from the shard's
first element (lowbit.optim._sharding). Codes and absmax of such blocks cannot be resharded by
DCP: they are flat per-rank tensors whose split follows the shard boundaries, not a DTensor
layout. So state_dict() presents each of the rule's states as torch.optim.AdamW keeps it under
FSDP2: an fp32 DTensor with the parameter's mesh, placements and global shape, built from the
dequantized local shard. DCP reshards those like any optimizer state (N ranks -> M ranks), and
get_optimizer_state_dict(..., full_state_dict=True) gathers whole fp32 tensors that a
single-process lowbit optimizer or torch.optim.AdamW loads. load_state_dict() takes the local
shard of such a DTensor and quantizes it into this rank's own blocks (the 32-bit -> quantized
conversion of _adopt_state).

Why a resumed run is bit-identical when the blocks coincide (every shard start, on the saving
and on the loading side, a multiple of the block size): dequantize-then-requantize of a block is
exact, with one correction (carry_absmax). Every value is code * absmax, and dividing it by the
same absmax lands within an ulp of its code, whose nearest code is itself (codebook entries are
far more than an ulp apart). The absmax itself is recovered when the block's largest |value| is
+absmax exactly: so when a value had the code +1.0. But the signed maps have no -1.0 (8-bit
"dynamic": -0.99297, 4-bit "dynamic4": -0.8875): a block whose largest |x| was negative stores it
as -0.99297 * absmax, and plain dequantization would lose the absmax (a requantized block then
gets a 0.7% (4-bit: 11%) smaller absmax and other codes). carry_absmax writes the first element
holding the most negative code of such a block as -absmax, which is that block's largest |x|
exactly (x / absmax = -1 rounds to the most negative code): requantization gives back the same
absmax and the same codes. That one element per such block is at most one code step from its
stored code's value (and is the block's true absmax element when one element holds that code).
Where blocks do not coincide (a shard start inside a block on either side), the loading rank
quantizes values that came from differently cut blocks: the states then differ from the saved
ones by up to one quantization step (the error of quantizing already quantized values with a
new absmax).

Cost: the form holds fp32 states, 4 bytes per element per state, like torch.optim.AdamW's FSDP2
checkpoint: 4x the 8-bit states (8x the 4-bit ones) on disk, and state_dict() materialises the
dequantized fp32 states of every quantized parameter of the rank at once (the rank's shard of
the model's fp32 optimizer states) until the state dict is dropped. 32-bit states are wrapped
without a copy.

Other entries stay plain tensors, identical on every rank: "step" and the clip policies'
per-tensor states (computed from statistics reduced over the shards). A Kahan compensation
buffer (the parameter's dtype, laid out like it) becomes a DTensor like the moments.
"""
import torch

from .. import codebooks
from ..reference import optim as ref
from ..reference.quant import unpack_nibbles
from . import _sharding as shard


def carry_absmax(values, codes, absmax, j, fmt, kind="adam"):
    """values (fp32, dequantized from codes / absmax of state j in block-wise format fmt), with
    the first element holding the codebook's most negative entry written as -absmax in every
    block whose absmax is positive and where no element holds the entry +1.0 (module doc). In
    place; values returned. A no-op for codebooks with -1.0 or without negative entries."""
    bits, block = fmt[0], fmt[1]
    name, block = ref.state_codebook(j, bits, block, kind)
    code = codebooks.codebook(name)
    low, top = int(code.argmin()), int(code.argmax())
    if float(code[low]) <= -1.0 or float(code[low]) >= 0.0 or float(code[top]) != 1.0:
        return values
    n, blocks = values.numel(), absmax.numel()
    idx = (unpack_nibbles(codes.reshape(-1), n) if code.numel() == 16
           else codes.reshape(-1).to(torch.int64))
    idx = torch.nn.functional.pad(idx.cpu(), (0, blocks * block - n), value=-1).view(blocks, block)
    is_low = idx == low
    scale = absmax.cpu()
    need = ~(idx == top).any(1) & is_low.any(1) & (scale > 0)
    if need.any():
        where = torch.arange(blocks) * block + is_low.to(torch.int8).argmax(1)
        flat = values.view(-1)
        flat[where[need].to(flat.device)] = -scale[need].to(flat.device)
    return values


def _scale_and_code_keys(name: str) -> tuple:
    return tuple(name + suffix for suffix in ("_codes", "_absmax", "_row_max", "_col_max"))


def reshardable_state(opt, p, group, state: dict, where: str) -> dict:
    """A DTensor parameter's state (of optimizer `opt`) in the reshardable form (module doc).
    New dict; the optimizer's state is untouched (fp32 32-bit states are shared, not copied)."""
    names = opt._state_names(group)
    fmt = opt._format_for(p, group)  # the full parameter's
    lp = shard.local(p)
    opt._check_state(lp, state, names, fmt, where)
    dropped = {"kahan_comp", *names}
    for name in names:
        dropped.update(_scale_and_code_keys(name))
    out = {k: v for k, v in state.items() if k not in dropped}
    for name, value in zip(names, exact_fp32(opt, lp, state, names, fmt)):
        out[name] = shard.like_param(value, p)
    if "kahan_comp" in state:
        out["kahan_comp"] = shard.like_param(state["kahan_comp"], p)
    return out


def exact_fp32(opt, p, state, names, fmt) -> list:
    """The rule's states of p as fp32 tensors shaped like p, from which quantization gives back
    the same codes and absmax (block-wise states: carry_absmax; 32-bit states as they are)."""
    out = []
    for j, (name, value) in enumerate(zip(names, opt._moments_fp32(p, state, names, fmt))):
        bits, block, cols = opt._state_format(fmt, j)
        if bits != 32 and not cols:
            value = carry_absmax(value, state[name + "_codes"], state[name + "_absmax"], j,
                                 (bits, block), opt._kind)
        out.append(value)
    return out
