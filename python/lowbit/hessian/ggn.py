"""Generalised Gauss-Newton products G v = Jᵀ H_ℓ J v for a loss given as (outputs, targets).

J is the Jacobian of the network outputs (logits) with respect to the parameters and H_ℓ the
Hessian of the loss with respect to the outputs, in closed form (research/hessian.md §1.1, §1.5):
  "cross_entropy"          F.cross_entropy(logits, targets): per position p = softmax(z),
                           H_ℓ u = p⊙u − p (p·u); divided by the number of counted positions
                           for reduction="mean" (positions whose target is ignore_index are
                           left out, as F.cross_entropy does). Classes on dim 1 for inputs of
                           2+ dims (torch's convention), on dim 0 for a 1-D input.
  "mse"                    F.mse_loss(out, targets): H_ℓ = 2 I / numel (mean) or 2 I (sum).
  "binary_cross_entropy"   F.binary_cross_entropy_with_logits: H_ℓ = σ(z)(1 − σ(z)) (/ numel
                           for mean).
These losses are convex in the outputs, so G is positive semi-definite, and G = H when the
outputs are linear in the parameters. G needs no second derivative of the network: it works
where double backward does not (only the loss' own Hessian is needed, in closed form here).

Jv is computed by `jvp=`:
  "forward"            torch.func.jvp through torch.func.functional_call (needs the module).
  "reverse"            the transpose trick: Jv = ∂/∂u (Jᵀu)·v, two reverse passes; needs the
                       network's backward to be differentiable in its incoming gradient.
  "finite_difference"  (out(θ + h u) − out(θ − h u)) ‖v‖ / 2h with u = v/‖v‖ (two no-grad
                       forwards; step as lowbit.hessian.fd_step).
  "auto"               forward if a module is known, else reverse; on an unsupported op it falls
                       back to finite_difference with a warning naming the error.
Then Jᵀ(H_ℓ Jv) is one ordinary backward. Cost: about one forward-mode pass (or two
reverse passes, or two forwards) plus one forward and one backward.
"""
import warnings

import torch

from ._vectors import as_param_list, check_vector, dot, zeros_if_none
from .hvp import _ROUTE_ERRORS, _short, fd_step, param_names, _Closure

LOSSES = ("cross_entropy", "mse", "binary_cross_entropy")
JVP_METHODS = ("auto", "forward", "reverse", "finite_difference")


def _check_outputs(out):
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError("outputs_fn must return the network outputs (logits) as a floating-point "
                        f"tensor, got {type(out).__name__}")
    return out


def loss_hessian_product(out: torch.Tensor, u: torch.Tensor, *, loss: str = "cross_entropy",
                         targets=None, reduction: str = "mean",
                         ignore_index: int = -100) -> torch.Tensor:
    """H_ℓ u for the output-space Hessian of `loss` at outputs `out` (module docstring)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    out = out.detach()
    if loss == "mse":
        return u * (2.0 / out.numel() if reduction == "mean" else 2.0)
    if loss == "binary_cross_entropy":
        s = torch.sigmoid(out)
        return u * s * (1 - s) / (out.numel() if reduction == "mean" else 1.0)
    if loss != "cross_entropy":
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    cdim = 0 if out.dim() == 1 else 1
    p = torch.softmax(out, dim=cdim)
    hu = p * u - p * (p * u).sum(dim=cdim, keepdim=True)
    if targets is not None and not targets.is_floating_point():  # class indices
        keep = targets != ignore_index
        hu = hu * keep.unsqueeze(cdim).to(hu.dtype)
        count = int(keep.sum())
    else:
        count = out.numel() // out.shape[cdim]
    if reduction == "mean":
        hu = hu / max(count, 1)
    return hu


def _graph_outputs(outputs_fn):
    out = _check_outputs(outputs_fn())
    if not out.requires_grad:
        raise ValueError("outputs_fn returned outputs that do not require grad (computed under "
                         "no_grad, or independent of params)")
    return out


def _jvp_forward(outputs_fn, params, v, module):
    if module is None:
        raise ValueError("jvp='forward' needs the module owning params (pass params=model or "
                         "module=model)")
    wrapper = _Closure(module, outputs_fn)
    keys = ["module." + n for n in param_names(module, params)]

    def out_of(*ps):
        return _check_outputs(torch.func.functional_call(wrapper, dict(zip(keys, ps)), ()))
    return torch.func.jvp(out_of, tuple(p.detach() for p in params), tuple(v))[1].detach()


def _jvp_reverse(out, params, v):
    u = torch.zeros_like(out, requires_grad=True)
    jtu = torch.autograd.grad(out, params, grad_outputs=u, create_graph=True,
                              retain_graph=True, allow_unused=True)
    idx = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
    if not idx:
        return torch.zeros_like(out)
    jv, = torch.autograd.grad([jtu[i] for i in idx], u, grad_outputs=[v[i] for i in idx],
                              allow_unused=True)
    return torch.zeros_like(out) if jv is None else jv.detach()


def _jvp_fd(outputs_fn, params, v, fd_eps):
    vnorm = float(dot(v, v)) ** 0.5
    h = fd_step(params) if fd_eps is None else float(fd_eps)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            if vnorm == 0.0:
                return torch.zeros_like(_check_outputs(outputs_fn()))
            for p, t in zip(params, v):
                p.add_(t, alpha=h / vnorm)
            plus = _check_outputs(outputs_fn())
            for p, s, t in zip(params, saved, v):
                p.copy_(s).add_(t, alpha=-h / vnorm)
            minus = _check_outputs(outputs_fn())
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return (plus - minus) * (vnorm / (2.0 * h))


def ggn_vp(outputs_fn, params, v, targets=None, *, loss: str = "cross_entropy",
           reduction: str = "mean", ignore_index: int = -100, jvp: str = "auto", module=None,
           fd_eps: float | None = None) -> list:
    """G v = Jᵀ H_ℓ J v (module docstring). outputs_fn() returns the network outputs on a fixed
    batch; targets are the labels the loss would use (class indices for cross_entropy, where
    only ignore_index matters since H_ℓ does not depend on them; values for mse). params and v
    as in lowbit.hessian.hvp. Returns a list shaped like params."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if jvp not in JVP_METHODS:
        raise ValueError(f"jvp must be one of {', '.join(JVP_METHODS)}, got {jvp!r}")
    plist, owner = as_param_list(params)
    module = module if module is not None else owner
    v = check_vector(v, plist)
    method = jvp if jvp != "auto" else ("forward" if module is not None else "reverse")
    out = None
    try:
        if method == "forward":
            jv = _jvp_forward(outputs_fn, plist, v, module)
        elif method == "reverse":
            out = _graph_outputs(outputs_fn)
            jv = _jvp_reverse(out, plist, v)
        else:
            jv = _jvp_fd(outputs_fn, plist, v, fd_eps)
    except _ROUTE_ERRORS as e:
        if jvp != "auto":
            raise
        warnings.warn(f"ggn_vp: the Jacobian-vector product by {method!r} failed "
                      f"({_short(e)}); falling back to 'finite_difference'", stacklevel=2)
        out = None
        jv = _jvp_fd(outputs_fn, plist, v, fd_eps)
    if out is None:  # after any in-place perturbation of the parameters
        out = _graph_outputs(outputs_fn)
    hjv = loss_hessian_product(out, jv.to(out.dtype), loss=loss, targets=targets,
                               reduction=reduction, ignore_index=ignore_index)
    res = torch.autograd.grad(out, plist, grad_outputs=hjv, allow_unused=True)
    return [t.detach() for t in zeros_if_none(res, plist)]
