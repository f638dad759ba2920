"""Reference of the clipping machinery inside the fused step (csrc/include/lowbit/clip_math.h):
the per-element gradient transform and the per-tensor statistics pass.

Transform, each step rounded once in fp32, in the canonical order of research/clipping.md §7.2:

    g = clamp(g, -cv, cv)          if VALUE_CLIP   (group scalar cv)
    g = g * s_t                    if TENSOR_SCALE (per tensor: global / component-wise / AdaGC)
    g = g * r_t where |g| > thr_t  if ADA_CLIP     (per tensor: Stable-SPAM's AdaClip)
    g = g * k_t                    if NORM_SCALE   (per tensor: Stable-SPAM's AdaGN)

with the per-tensor row (s_t, thr_t, r_t, k_t) from an fp32 [ntensors, 4] table.

NaN passes through unchanged (torch.clamp and comparisons keep it).

Statistics (lowbit.ops.grad_stats), per tensor: [sum of squares of the finite elements (squares
exact in float64, added in float64), number of inf/NaN elements, largest finite |element|,
number of NaN elements]. The counts are of the raw gradient; the sum and the maximum are of its
finite elements after the transform (a finite value stays finite through it). Backends may add
in another order: sums agree to float64 rounding, the rest exactly.

Capture (optional, raw gradients only: flags 0): with per-tensor thresholds tau (fp32), the pass
also counts the finite elements with |g| > tau_t into over_count[t] and stores |g| of up to
`capacity` of them in over[t, :capacity] (the rest of the row untouched). When a tensor has at
most `capacity` such elements the stored set is exactly theirs, in a backend-dependent order;
beyond that, which ones are stored is unspecified. Stable-SPAM's AdaGN needs the norm of the
gradient after AdaClip, whose threshold is not known before the pass but is bounded below by a
tau known before it: the few elements above tau are all the norm needs besides the sum of
squares (lowbit.clip.AdaGN), so no second pass over the gradients is needed.
"""
import torch

# Bits above the optimizer's own flags (reference.optim); same values as clip_math.h.
VALUE_CLIP, TENSOR_SCALE, ADA_CLIP, NORM_SCALE = 64, 128, 256, 512
TRANSFORM_FLAGS = VALUE_CLIP | TENSOR_SCALE | ADA_CLIP | NORM_SCALE
NSTATS = 4
NCLIP = 4  # columns of the per-tensor table: s, thr, r, k


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def transform_grad(g: torch.Tensor, flags: int, cv: float, s: float = 1.0, thr: float = 0.0,
                   r: float = 1.0, k: float = 1.0, with_mask: bool = False):
    """The transform above, on fp32 values (the spec of clip_math.h's clip_transform). With
    with_mask, also the mask of the elements an element-wise step (value clip, AdaClip) changed."""
    g = g.float()
    changed = torch.zeros(g.shape, dtype=torch.bool)
    if flags & VALUE_CLIP:
        hi, lo = g > cv, g < -cv
        g = torch.where(hi, _t(cv), torch.where(lo, _t(-cv), g))
        changed = hi | lo
    if flags & TENSOR_SCALE:
        g = g * _t(s)
    if flags & ADA_CLIP:
        over = g.abs() > _t(thr)
        g = torch.where(over, g * _t(r), g)
        changed = changed | over
    if flags & NORM_SCALE:
        g = g * _t(k)
    return (g, changed) if with_mask else g


def grad_stats(grads, xform=None, cv: float = 0.0, flags: int = 0, tau=None, over=None,
               over_count=None) -> torch.Tensor:
    """[len(grads), 4] float64 statistics (module docstring). xform: [len(grads), 4] fp32 rows
    (s, thr, r, k), needed when flags has a per-tensor step. tau / over / over_count: the
    capture (module docstring), fp32 [n], fp32 [n, capacity] and int64 [n], written in place."""
    if tau is not None and flags:
        raise ValueError("grad_stats: the capture (tau) works on the raw gradients (flags 0)")
    out = torch.zeros((len(grads), NSTATS), dtype=torch.float64)
    for i, g in enumerate(grads):
        if tau is not None:
            a = g.detach().reshape(-1).cpu().float().abs()
            above = a[torch.isfinite(a) & (a > tau[i].cpu())]
            over_count[i] = above.numel()
            k = min(above.numel(), over.shape[1])
            over[i, :k] = above[:k].to(over.device)
        raw = g.detach().reshape(-1).cpu().float()
        x = raw
        if flags:
            row = xform[i].tolist() if xform is not None else (1.0, 0.0, 1.0, 1.0)
            x = transform_grad(raw, flags, cv, *row)
        finite = torch.isfinite(raw)
        a = torch.where(finite, x, 0.0).abs()
        out[i, 0] = a.double().square().sum()
        out[i, 1] = (~finite).sum()
        out[i, 2] = a.max() if a.numel() else 0.0
        out[i, 3] = torch.isnan(raw).sum()
    return out
