"""Drop-ins for torch.nn.utils.get_total_norm / clip_grad_norm_ / clip_grads_with_norm_ on
lowbit's multi-tensor statistics pass (lowbit.ops.grad_stats): one pass over the gradients per
device instead of one norm kernel per tensor, and no host synchronisation unless
error_if_nonfinite asks for one.

Same semantics as torch: parameters without .grad are skipped; an empty list gives tensor(0.);
the total is the norm of the per-tensor norms; a NaN anywhere makes it NaN, an inf (and no NaN)
makes it inf; coef = max_norm / (total + 1e-6) clamped to at most 1 and always multiplied in.
Differences, on purpose: norm types 2 and inf come from the statistics pass, where squares are
added in float64, and the total is fp32 whatever the gradients' dtype (torch returns a bf16/fp16
norm for bf16/fp16 gradients, accumulated in that precision); other norm types fall back to
torch.linalg.vector_norm per tensor, in fp32.
"""
import math

import torch

from .. import ops

_EPS = 1e-6  # torch's clip_grad_norm_ constant


def _as_list(tensors):
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _group_by_device(tensors):
    groups = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def _stats_norm(tensors, norm_type: float, backend) -> torch.Tensor:
    """fp32 total norm (2 or inf) of tensors on any devices, on the first tensor's device."""
    first = tensors[0].device
    parts = []
    for device, ts in _group_by_device(tensors).items():
        st = ops.grad_stats([t.detach().contiguous() for t in ts],
                            ops.resolve_backend(backend, device)).to(first)
        value = st[:, 0].sum() if norm_type == 2.0 else st[:, 2].max()
        parts.append(torch.stack([value, st[:, 1].sum(), st[:, 3].sum()]))
    value, bad, nan = torch.stack(parts).T
    value = value.sum().sqrt() if norm_type == 2.0 else value.max()
    total = torch.where(nan.sum() > 0, math.nan, torch.where(bad.sum() > 0, math.inf, value))
    return total.float()


@torch.no_grad()
def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach=None, backend: str | None = None) -> torch.Tensor:
    """torch.nn.utils.get_total_norm on the statistics pass (module docstring). `foreach` is
    accepted for signature compatibility and has no effect."""
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    if norm_type in (2.0, math.inf):
        total = _stats_norm(tensors, norm_type, backend)
    else:
        first = tensors[0].device
        norms = [torch.linalg.vector_norm(t.detach().float(), norm_type).to(first)
                 for t in tensors]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`")
    return total


@torch.no_grad()
def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor,
                          foreach=None) -> None:
    """torch.nn.utils.clip_grads_with_norm_: scale every .grad by min(1, max_norm / (total_norm
    + 1e-6)), computed on the norm's device (no host sync)."""
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    if not grads:
        return
    coef = torch.clamp(float(max_norm) / (total_norm + _EPS), max=1.0)
    for device, gs in _group_by_device(grads).items():
        torch._foreach_mul_(gs, coef.to(device))


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach=None,
                    backend: str | None = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ with the norm from lowbit's statistics pass; returns the
    total norm of the gradients before clipping (fp32, on the first gradient's device)."""
    parameters = _as_list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = get_total_norm(grads, norm_type, error_if_nonfinite, backend=backend)
    clip_grads_with_norm_(parameters, max_norm, total)
    return total
