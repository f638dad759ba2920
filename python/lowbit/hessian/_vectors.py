"""Parameter-shaped vectors: validation of params / v, and the few list operations the
estimators need (dot, norm, flatten / unflatten). A "vector" is a list of tensors shaped like the
parameters; the solvers work on one flat 1-D tensor and convert at the operator boundary."""
from typing import Sequence

import torch


def as_param_list(params, where: str = "params") -> tuple[list, torch.nn.Module | None]:
    """(list of tensors, owning module or None). A module contributes its parameters that
    require grad (frozen layers are left out); an explicit list must hold tensors that all
    require grad."""
    if isinstance(params, torch.nn.Module):
        module = params
        plist = [p for p in module.parameters() if p.requires_grad]
        if not plist:
            raise ValueError(f"{where}: the module has no parameters that require grad")
        return plist, module
    if isinstance(params, torch.Tensor):
        params = [params]
    try:
        plist = list(params)
    except TypeError:
        raise TypeError(f"{where} must be an nn.Module or a sequence of tensors, got "
                        f"{type(params).__name__}") from None
    if not plist:
        raise ValueError(f"{where} is empty")
    for i, p in enumerate(plist):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}[{i}] is a {type(p).__name__}, not a tensor")
        if not p.requires_grad:
            raise ValueError(f"{where}[{i}] (shape {tuple(p.shape)}) does not require grad: a "
                             "Hessian with respect to it is undefined. Call "
                             "p.requires_grad_(True) or leave it out of params")
        if not p.is_floating_point():
            raise TypeError(f"{where}[{i}] has dtype {p.dtype}; Hessians need floating-point "
                            "parameters")
    return plist, None


def check_vector(v, params: Sequence[torch.Tensor], batched: bool = False,
                 where: str = "v") -> list:
    """v as a list shaped like params (with one leading probe dimension when batched), in each
    parameter's dtype and device. A single tensor is accepted for a single parameter."""
    if isinstance(v, torch.Tensor):
        v = [v]
    v = list(v)
    if len(v) != len(params):
        raise ValueError(f"{where} has {len(v)} tensors but there are {len(params)} params; "
                         "pass one tensor per parameter, shaped like it")
    out, k = [], None
    for i, (t, p) in enumerate(zip(v, params)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}[{i}] is a {type(t).__name__}, not a tensor")
        shape = tuple(t.shape[1:]) if batched else tuple(t.shape)
        if batched:
            if t.dim() == 0 or (k is not None and t.shape[0] != k):
                raise ValueError(f"{where}[{i}]: batched probes need the same leading probe "
                                 f"dimension on every tensor, got shape {tuple(t.shape)}")
            k = t.shape[0]
        if shape != tuple(p.shape):
            raise ValueError(f"{where}[{i}] has shape {shape} but params[{i}] has shape "
                             f"{tuple(p.shape)}" + (" (after the probe dimension)" if batched
                                                    else ""))
        out.append(t.detach().to(device=p.device, dtype=p.dtype))
    return out


def check_loss(loss, where: str = "the closure") -> torch.Tensor:
    """The loss as a 0-dim tensor, or a clear error."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{where} must return the loss as a scalar tensor, got "
                        f"{type(loss).__name__}" + (" (return only the loss, not a tuple)"
                                                    if isinstance(loss, (tuple, list)) else ""))
    if loss.numel() != 1:
        raise ValueError(f"{where} must return a scalar loss, got a tensor of shape "
                         f"{tuple(loss.shape)} (reduce it, e.g. with .mean())")
    if not loss.is_floating_point():
        raise TypeError(f"{where} returned a loss of dtype {loss.dtype}; it must be floating "
                        "point")
    return loss.reshape(())


def require_graph(loss: torch.Tensor, where: str = "the loss"):
    if not loss.requires_grad:
        raise ValueError(f"{where} does not require grad: it was computed under torch.no_grad"
                           "() / from detached tensors, or it does not depend on params, so "
                           "there is no graph to differentiate")


def zeros_if_none(ts, like) -> list:
    return [torch.zeros_like(p) if t is None else t for t, p in zip(ts, like)]


def dot(a, b) -> torch.Tensor:
    return sum((x.reshape(-1).to(torch.float64) * y.reshape(-1).to(torch.float64)).sum()
               for x, y in zip(a, b))


def common_dtype(tensors) -> torch.dtype:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def flatten(ts, dtype=None) -> torch.Tensor:
    dtype = dtype or common_dtype(ts)
    return torch.cat([t.reshape(-1).to(dtype) for t in ts])


def unflatten(x: torch.Tensor, like) -> list:
    """Split flat x into tensors shaped (and typed) like the tensors of `like` (or shapes with
    dtype taken from x when `like` holds torch.Size objects)."""
    out, i = [], 0
    for t in like:
        shape = t.shape if isinstance(t, torch.Tensor) else torch.Size(t)
        n = shape.numel()
        piece = x[i:i + n].reshape(shape)
        out.append(piece.to(t.dtype) if isinstance(t, torch.Tensor) else piece)
        i += n
    return out
