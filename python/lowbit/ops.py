"""The op table: one torch.library custom op per kernel (with a fake impl, so torch.compile and
DTensor see a single op), dispatching to a backend.

Backends: "cpu" (lowbit._C), "cuda" (lowbit._C_cuda), "triton" (lowbit.triton_kernels),
"reference" (pure PyTorch, the spec), and the test-only "cuda_sim" (the .cu kernels compiled for
the CPU). Default order: CUDA tensors -> cuda if its module is built and sees a device, else
triton, else reference; CPU tensors -> cpu if built, else reference. `backend=` on every public
entry point overrides the default; so does the LOWBIT_BACKEND environment variable.
"""
import functools
import importlib
import os
from typing import Optional

import torch

from . import _ext
from .backends import reference as _reference
from .reference import clip as _reference_clip
from .backends.native import NativeBackend

BACKENDS = ("cpu", "cuda", "triton", "reference", "cuda_sim")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _backend_impl(name: str):
    if name == "reference":
        return _reference
    if name == "cpu" and _ext.C is not None:
        return NativeBackend(_ext.C, needs_stream=False)
    if name == "cuda" and _ext.C_CUDA is not None:
        return NativeBackend(_ext.C_CUDA, needs_stream=True)
    if name == "cuda_sim" and _ext.C_SIM is not None:
        return NativeBackend(_ext.C_SIM, needs_stream=False)
    if name == "triton" and _triton_available():
        from .backends import triton as triton_backend
        return triton_backend
    return None


def available_backends() -> list[str]:
    return [b for b in BACKENDS if _backend_impl(b) is not None]


def default_backend(device: torch.device) -> str:
    env = os.environ.get("LOWBIT_BACKEND")
    if env:
        return env
    if device.type == "cuda":
        if _ext.cuda_device_count() > 0:
            return "cuda"
        return "triton" if _triton_available() else "reference"
    return "cpu" if _ext.C is not None else "reference"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    name = backend or default_backend(device)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {name!r}")
    if device.type == "meta":
        return name  # only the fake implementations run: shapes, no kernels
    if _backend_impl(name) is None:
        hint = {"cpu": "reinstall lowbit so that lowbit._C is built",
                "cuda": "install lowbit where nvcc is found (or LOWBIT_CUDA=1)",
                "cuda_sim": "build with LOWBIT_SIM=1 (make test does)",
                "triton": "pip install triton"}[name]
        raise RuntimeError(f"backend {name!r} is not available here: {hint}")
    if name in ("cpu", "cuda_sim") and device.type != "cpu":
        raise ValueError(f"backend {name!r} runs on CPU tensors, got a tensor on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got a tensor on {device}")
    return name


# --- custom ops ------------------------------------------------------------------------------

@torch.library.custom_op("lowbit::quantize_blockwise", mutates_args=())
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, mids: torch.Tensor, block_size: int,
                       stochastic: bool, seed: int, offset: int,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    nblocks = -(-n // block_size)
    if code.numel() == 16:
        codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    else:
        codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n:
        _backend_impl(backend).quantize_blockwise(x, code, mids, block_size, stochastic, seed,
                                                  offset, codes, absmax)
    return codes, absmax


@quantize_blockwise.register_fake
def _(x, code, mids, block_size, stochastic, seed, offset, backend):
    n = x.numel()
    shape = ((n + 1) // 2,) if code.numel() == 16 else x.shape
    return (x.new_empty(shape, dtype=torch.uint8),
            x.new_empty((-(-n // block_size),), dtype=torch.float32))


@torch.library.custom_op("lowbit::dequantize_blockwise", mutates_args=("out",))
def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         block_size: int, n: int, out: torch.Tensor, backend: str) -> None:
    if n:
        _backend_impl(backend).dequantize_blockwise(codes, absmax, code, block_size, n, out)


@dequantize_blockwise.register_fake
def _(codes, absmax, code, block_size, n, out, backend):
    return None


@torch.library.custom_op("lowbit::stochastic_round", mutates_args=("out",))
def stochastic_round(x: torch.Tensor, out: torch.Tensor, seed: int, offset: int,
                     backend: str) -> None:
    if x.numel():
        _backend_impl(backend).stochastic_round(x, out, seed, offset)


@stochastic_round.register_fake
def _(x, out, seed, offset, backend):
    return None


@torch.library.custom_op("lowbit::philox_words", mutates_args=("out",))
def philox_words(out: torch.Tensor, seed: int, counter0: int, backend: str) -> None:
    """out: int32 [words, n], words in 1..4: out[w, i] = the bits of word w of Philox4x32-10
    keyed by `seed` (its 64 bits as a signed int64) at counter counter0 + i."""
    if out.numel():
        _backend_impl(backend).philox_words(out, seed & (2**64 - 1), counter0)


@philox_words.register_fake
def _(out, seed, counter0, backend):
    return None


# --- fused optimizer steps (issue 3) -----------------------------------------------------------

@torch.library.custom_op(
    "lowbit::optim_step",
    mutates_args=("params", "state1", "absmax1", "state2", "absmax2", "comps", "v_colmax",
                  "clipped", "rms"))
def _optim_step_op(params: list[torch.Tensor], grads: list[torch.Tensor],
                   state1: list[torch.Tensor], absmax1: list[torch.Tensor],
                   state2: list[torch.Tensor], absmax2: list[torch.Tensor],
                   comps: list[torch.Tensor], keys: list[int], kind: str, state_bits: int,
                   block_size: int, scalars: list[float], flags: int, writeback: str,
                   backend: str, v_cols: list[int], v_colmax: list[torch.Tensor],
                   clip: Optional[torch.Tensor], clipped: Optional[torch.Tensor],
                   rms: Optional[torch.Tensor], hess: list[torch.Tensor]) -> None:
    if params:
        _backend_impl(backend).optim_step(params, grads, state1, absmax1, state2, absmax2, comps,
                                          keys, kind, state_bits, block_size, scalars, flags,
                                          writeback, v_cols, v_colmax, clip, clipped, rms, hess)


@_optim_step_op.register_fake
def _(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind, state_bits, block_size,
      scalars, flags, writeback, backend, v_cols, v_colmax, clip, clipped, rms, hess):
    return None


def optim_step(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind, state_bits,
               block_size, scalars, flags, writeback, backend, v_cols=(), v_colmax=(), clip=None,
               clipped=None, rms=None, hess=()) -> None:
    """One fused optimizer step over tensors sharing a rule, param dtype and state format (the
    custom op lowbit::optim_step, so torch.compile keeps it whole); the contract is
    lowbit.reference.optim.fused_step (kind "adam" | "lion" | "sgd" | "sophia"; writeback "f32"
    | "nearest" | "stochastic" | "kahan"; block_size 0 = the state format's default; scalars
    (reference.optim.NSCALARS) and flags from reference.optim). v_cols / v_colmax: per tensor,
    the column count of a rank-1 second moment (0: block-wise) and its column maxima; both empty
    when every tensor's second moment is block-wise. clip: fp32 [len(params), 6] rows (s, thr,
    r, k, step size, decay) on the params' device, needed with the per-tensor flags; clipped:
    int64 [len(params)] counters the step adds its clipped elements to. rms: float64
    [len(params)] (Adam only): the call writes nothing else and adds each tensor's
    update-clipping sum into it (StableAdamW's statistics pass, reference.optim). hess: per
    tensor, the fp32 Hessian-diagonal estimate (contiguous, shaped like the param) that
    HESS_EMA reads (Sophia, AdaHessian); empty otherwise."""
    _optim_step_op(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind, state_bits,
                   block_size, scalars, flags, writeback, backend, list(v_cols), list(v_colmax),
                   clip, clipped, rms, list(hess))


def optim_step_eager(params, grads, state1, absmax1, state2, absmax2, comps, keys, kind,
                     state_bits, block_size, scalars, flags, writeback, backend, v_cols=(),
                     v_colmax=(), clip=None, clipped=None, rms=None, hess=()) -> None:
    """optim_step called on the backend directly, for eager callers (lowbit.optim's step, which
    never runs under torch.compile): the custom-op dispatch costs a few microseconds per tensor in
    version and alias bookkeeping, milliseconds per step for hundreds of parameters. The caller
    bumps the version counters of whatever autograd may have saved (the parameters)."""
    if params:
        _backend_impl(backend).optim_step(params, grads, state1, absmax1, state2, absmax2, comps,
                                          keys, kind, state_bits, block_size, scalars, flags,
                                          writeback, list(v_cols), list(v_colmax), clip,
                                          clipped, rms, list(hess))


@torch.library.custom_op("lowbit::grad_stats", mutates_args=("over", "over_count"))
def grad_stats(grads: list[torch.Tensor], backend: str, xform: Optional[torch.Tensor] = None,
               value_clip: float = 0.0, flags: int = 0, tau: Optional[torch.Tensor] = None,
               over: Optional[torch.Tensor] = None,
               over_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[len(grads), 4] float64 per tensor: sum of squares of the finite elements, number of
    inf/NaN elements, largest finite |element|, number of NaN elements — the sum and the maximum
    optionally after the clip transform selected by `flags` (lowbit.reference.clip; xform:
    fp32 [len(grads), 4] rows (scale, threshold, ratio, k) on the grads' device; value_clip: the
    bound of VALUE_CLIP). One multi-tensor pass on the kernel backends (cpu, cuda, cuda_sim,
    triton: per-block partials combined in a fixed order, so repeated calls give the same bits);
    torch ops on "reference". Sums of squares are exact squares added in float64 (backends differ
    by float64 rounding only); the rest is exact. With tau (fp32 [n], flags 0), also the capture
    of lowbit.reference.clip: over_count (int64 [n], zeroed by the caller) counts the elements
    with |g| > tau and over (fp32 [n, capacity]) receives up to capacity of their |g|."""
    return grad_stats_eager(grads, backend, xform, value_clip, flags, tau, over, over_count)


def grad_stats_eager(grads, backend, xform=None, value_clip=0.0, flags=0, tau=None, over=None,
                     over_count=None) -> torch.Tensor:
    """grad_stats called on the backend directly, for eager callers (lowbit.optim's step): the
    custom op's dispatch costs microseconds per tensor of the list (see optim_step_eager)."""
    device = grads[0].device if grads else torch.device("cpu")
    out = torch.zeros((len(grads), _reference_clip.NSTATS), dtype=torch.float64, device=device)
    if tau is not None:
        if flags:
            raise ValueError("grad_stats: the capture (tau) works on the raw gradients: flags=0")
        if over is None or over_count is None or over.dim() != 2 or over.shape[0] != len(grads) \
                or over.dtype != torch.float32 or over_count.dtype != torch.int64 \
                or tau.dtype != torch.float32 or not over.is_contiguous():
            raise ValueError("grad_stats: tau needs over (contiguous fp32 [n, capacity]) and "
                             "over_count (int64 [n])")
    if grads:
        if tau is None:
            _backend_impl(backend).grad_stats(grads, out, xform, value_clip, flags)
        else:
            _backend_impl(backend).grad_stats(grads, out, xform, value_clip, flags, tau, over,
                                              over_count)
    return out


@grad_stats.register_fake
def _(grads, backend, xform=None, value_clip=0.0, flags=0, tau=None, over=None, over_count=None):
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((len(grads), _reference_clip.NSTATS), dtype=torch.float64, device=device)


# --- scaled low-precision quantizers and the block Hadamard rotation (issue 8) ------------------
# One kernel entry point per backend, `lowprec(x, fmt, scaling, block_size, e8m0, stochastic,
# seed, offset, had_block, codes, scales, out)`:
#   x       contiguous (R, C) fp32 / bf16 / fp16: the tensor seen as rows x last dimension
#   fmt     lowbit.reference.lowprec.FORMAT_IDS (int8 0, int4 1, e4m3 2, e5m2 3, e2m1 4), or -1:
#           no quantization, out = H(x)
#   scaling block 0, row 1, column 2, tensor 3 (block_size used by block scaling)
#   e8m0    scales stored as e8m0 codes (uint8) instead of fp32
#   stochastic, seed, offset: element i = offset + row-major index rounds with word i % 4 of
#           Philox counter i // 4 under key seed (the optimizer write-back's four-word stream)
#   had_block 0, or the block of a Hadamard rotation H applied to x (fp32) before quantizing
#   codes   None or uint8 (R, C): one code byte per element (lowprec.h lp_encode)
#   scales  stored scales (fp32 or uint8): (R, nb) block, (R, 1) row, (1, C) column, (1, 1) tensor
#   out     None or x.dtype (R, C): dequantized values in fp32, rotated back by H when had_block,
#           cast once to x.dtype (nearest-even)
# The spec is lowbit.backends.reference.lowprec (lowbit.reference.lowprec / .hadamard).
LOWPREC_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def lowprec_scales_shape(rows: int, cols: int, scaling: int, block_size: int) -> tuple:
    return [(rows, -(-cols // block_size)), (rows, 1), (1, cols), (1, 1)][scaling]


@torch.library.custom_op("lowbit::lowprec_quantize", mutates_args=())
def lowprec_quantize(x: torch.Tensor, fmt: int, scaling: int, block_size: int, e8m0: bool,
                     stochastic: bool, seed: int, offset: int, had_block: int,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (R, C), stored scales) of the (R, C) matrix x (the contract above)."""
    codes, scales = _lowprec_quantize_fake(x, fmt, scaling, block_size, e8m0, stochastic, seed,
                                           offset, had_block, backend)
    if x.numel():
        _backend_impl(backend).lowprec(x, fmt, scaling, block_size, e8m0, stochastic, seed,
                                       offset, had_block, codes, scales, None)
    else:
        scales.zero_()  # empty groups: absmax 0, so scale 0 (fp32) or e8m0 code 0 (2**-127)
    return codes, scales


@lowprec_quantize.register_fake
def _lowprec_quantize_fake(x, fmt, scaling, block_size, e8m0, stochastic, seed, offset,
                           had_block, backend):
    shape = lowprec_scales_shape(x.shape[0], x.shape[1], scaling, block_size)
    return (x.new_empty(x.shape, dtype=torch.uint8),
            x.new_empty(shape, dtype=torch.uint8 if e8m0 else torch.float32))


@torch.library.custom_op("lowbit::lowprec_fake_quant", mutates_args=())
def lowprec_fake_quant(x: torch.Tensor, fmt: int, scaling: int, block_size: int, e8m0: bool,
                       stochastic: bool, seed: int, offset: int, had_block: int,
                       backend: str) -> torch.Tensor:
    """The (R, C) matrix x quantized and dequantized in one pass (between two Hadamard rotations
    when had_block; fmt -1: the rotation alone), in x's dtype (the contract above)."""
    out = torch.empty_like(x)
    if x.numel():
        scales = None
        if fmt >= 0:
            shape = lowprec_scales_shape(x.shape[0], x.shape[1], scaling, block_size)
            scales = x.new_empty(shape, dtype=torch.uint8 if e8m0 else torch.float32)
        _backend_impl(backend).lowprec(x, fmt, scaling, block_size, e8m0, stochastic, seed,
                                       offset, had_block, None, scales, out)
    return out


@lowprec_fake_quant.register_fake
def _(x, fmt, scaling, block_size, e8m0, stochastic, seed, offset, had_block, backend):
    return torch.empty_like(x)
