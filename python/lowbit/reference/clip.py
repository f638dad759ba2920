"""Reference of the clipping machinery inside the fused step (csrc/include/lowbit/clip_math.h):
the per-element gradient transform and the per-tensor statistics pass.

Transform, each step rounded once in fp32, in the canonical order of research/clipping.md §7.2:

    g = clamp(g, -cv, cv)          if VALUE_CLIP   (group scalar cv)
    g = g * s_t                    if TENSOR_SCALE (per tensor: global / component-wise / AdaGC)
    g = g * r_t where |g| > thr_t  if ADA_CLIP     (per tensor: Stable-SPAM's AdaClip)

NaN passes through unchanged (torch.clamp and comparisons keep it).

Statistics (lowbit.ops.grad_stats), per tensor: [sum of squares of the finite elements (squares
exact in float64, added in float64), number of inf/NaN elements, largest finite |element|,
number of NaN elements]. The counts are of the raw gradient; the sum and the maximum are of its
finite elements after the transform (a finite value stays finite through it). Backends may add
in another order: sums agree to float64 rounding, the rest exactly.
"""
import torch

# Bits above the optimizer's own flags (reference.optim); same values as clip_math.h.
VALUE_CLIP, TENSOR_SCALE, ADA_CLIP = 64, 128, 256
TRANSFORM_FLAGS = VALUE_CLIP | TENSOR_SCALE | ADA_CLIP
NSTATS = 4


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def transform_grad(g: torch.Tensor, flags: int, cv: float, s: float, thr: float,
                   r: float) -> torch.Tensor:
    """The transform above, on fp32 values (the spec of clip_math.h's clip_transform)."""
    g = g.float()
    if flags & VALUE_CLIP:
        g = torch.where(g > cv, _t(cv), torch.where(g < -cv, _t(-cv), g))
    if flags & TENSOR_SCALE:
        g = g * _t(s)
    if flags & ADA_CLIP:
        g = torch.where(g.abs() > _t(thr), g * _t(r), g)
    return g


def grad_stats(grads, xform=None, cv: float = 0.0, flags: int = 0) -> torch.Tensor:
    """[len(grads), 4] float64 statistics (module docstring). xform: [len(grads), 3] fp32 rows
    (s, thr, r), needed when flags has TENSOR_SCALE or ADA_CLIP."""
    out = torch.zeros((len(grads), NSTATS), dtype=torch.float64)
    for i, g in enumerate(grads):
        raw = g.detach().reshape(-1).cpu().float()
        x = raw
        if flags:
            s, thr, r = xform[i].tolist() if xform is not None else (1.0, 0.0, 1.0)
            x = transform_grad(raw, flags, cv, s, thr, r)
        finite = torch.isfinite(raw)
        a = torch.where(finite, x, 0.0).abs()
        out[i, 0] = a.double().square().sum()
        out[i, 1] = (~finite).sum()
        out[i, 2] = a.max() if a.numel() else 0.0
        out[i, 3] = torch.isnan(raw).sum()
    return out
