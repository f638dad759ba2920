"""Hessian-vector products Hv of a scalar loss with respect to a list of parameters.

Routes (research/hessian.md §1.2-1.4); each returns a list of tensors shaped like params:

  "double_backward"       reverse-over-reverse: g = grad(L, θ, create_graph=True), then
                          Hv = grad(g, θ, grad_outputs=v). One forward, one backward that builds
                          a graph, one backward of that backward (~2.5 gradients). Needs a
                          double-backward formula for every op (fails through SDPA flash /
                          memory-efficient attention, cuDNN RNNs, torch.compile'd modules,
                          custom autograd.Functions marked once_differentiable).
  "forward_over_reverse"  torch.func.jvp(torch.func.grad(L), (θ,), (v,)): forward-mode AD
                          through the backward pass. The parameters are rebound with
                          torch.func.functional_call, so it needs the module that owns them
                          (pass params=model or module=model) and a closure that reaches them
                          through that module (model(x)), not through references it captured.
                          Needs forward-AD formulas for every op and its backward.
  "finite_difference"     central differences of two ordinary gradients,
                          Hv ≈ ‖v‖ (∇L(θ + h u) − ∇L(θ − h u)) / 2h with u = v/‖v‖. Works
                          through anything that has a first derivative (fused attention,
                          compile, FSDP); ~2 gradients, ~no extra memory; approximate (below).
  "auto"                  double_backward, then forward_over_reverse (when a module is known),
                          each tried on the real computation: the first that does not raise is
                          used. If an exact route raised, a warning names the route used and
                          the error that ruled the others out. When no exact route works it
                          falls back to `fallback` ("finite_difference" by default; None
                          raises a RuntimeError naming every route's error instead).

Known gaps (torch 2.13, CPU): forward_over_reverse through F.mse_loss with a target raises
"ZeroTensors are immutable" (write the mean square out, or let "auto" use double backward); a
custom autograd.Function with a @once_differentiable backward does not make double backward
fail, PyTorch just drops the dependency: if then no gradient carries a graph, "auto" treats
double_backward as failed and moves on, and an explicit double_backward warns and returns zeros
(the right answer only for a loss linear in every parameter). A partially broken graph (such a
Function in the middle of a network) cannot be detected: compare with finite_difference once.

The closure `f()` evaluates the loss (a scalar tensor) from the current parameters; it is
called once per HVP by the exact routes and twice by finite differences. Keep it deterministic
(fixed batch, no dropout; BatchNorm in eval mode or an explicit choice), otherwise Hv is the
product with a random matrix.

Finite-difference step. With u a unit vector, the central difference has
    truncation error  (h²/6)·‖∇⁴L[u,u,u]‖        (the next Taylor term of the gradient)
    round-off error   ≈ ε_mach·‖∇L‖ / h           (cancellation in the difference)
times ‖v‖; the sum is smallest at h* = (3 ε_mach ‖∇L‖ / ‖∇⁴L[u,u,u]‖)^{1/3}. Without the
derivative magnitudes we take the curvature scale of the parameters as the unit:
    h = ε_mach^{1/3} · max(1, rms(θ))
(6.1e-6 for float64, 4.9e-3 for float32, 0.2 for bfloat16 at unit scale), see fd_step(). Pass
fd_eps= to choose h yourself. The parameters are perturbed in place and restored bit for bit
from a copy (also when the closure raises).
"""
import math
import warnings

import torch

from ._vectors import (as_param_list, check_loss, check_vector, dot, require_graph,
                       zeros_if_none)

METHODS = ("auto", "double_backward", "forward_over_reverse", "finite_difference")
EXACT_METHODS = ("double_backward", "forward_over_reverse")
FALLBACKS = ("finite_difference", None)
# errors that mean "this route is not supported by an op of the model" (as opposed to misuse,
# which raises TypeError / ValueError before any route runs)
_ROUTE_ERRORS = (RuntimeError, NotImplementedError)


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got "
                         f"{method!r}")


def fd_step(params, dtype: torch.dtype | None = None) -> float:
    """The finite-difference step h along the unit direction v/‖v‖:
    ε_mach(dtype)^{1/3} · max(1, rms(θ)), dtype defaulting to the parameters' widest."""
    plist = [params] if isinstance(params, torch.Tensor) else list(params)
    if dtype is None:
        dtype = plist[0].dtype
        for p in plist[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
    n = sum(p.numel() for p in plist)
    sq = float(sum(p.detach().double().square().sum() for p in plist))
    rms = math.sqrt(sq / n) if n else 0.0
    return torch.finfo(dtype).eps ** (1.0 / 3.0) * max(1.0, rms)


def _loss(f):
    loss = check_loss(f())
    require_graph(loss, "the loss returned by the closure")
    return loss


def gradient(f, params) -> list:
    """∇L as a list shaped like params (zeros for params the loss does not use)."""
    loss = _loss(f)
    return zeros_if_none(torch.autograd.grad(loss, params, allow_unused=True), params)


def _zeros_out(params, v, batched):
    return [torch.zeros((t.shape[0],) + p.shape if batched else p.shape, dtype=p.dtype,
                        device=p.device) for t, p in zip(v, params)]


_NO_GRAPH = ("the gradient has no graph after backward(create_graph=True): either the loss is "
             "linear in every parameter (H = 0), or an op's backward is not differentiable and "
             "PyTorch dropped the dependency silently (e.g. a custom autograd.Function whose "
             "backward is @once_differentiable or runs under no_grad)")


def second_backward(grads, params, v, *, batched=False, retain_graph=False,
                    no_graph="warn") -> list:
    """Hv = grad(g, θ, grad_outputs=v) for gradients g built with create_graph=True. Gradients
    without a graph (the loss is linear in that parameter) contribute a zero block. When no
    gradient has a graph, no_graph="warn" returns zeros with a warning, "raise" raises
    RuntimeError (so that "auto" tries another route)."""
    out = _zeros_out(params, v, batched)
    idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not idx:
        if no_graph == "raise":
            raise RuntimeError(_NO_GRAPH)
        warnings.warn(_NO_GRAPH + "; returning zeros", stacklevel=3)
        return out
    res = torch.autograd.grad([grads[i] for i in idx], params,
                              grad_outputs=[v[i] for i in idx], retain_graph=retain_graph,
                              allow_unused=True, is_grads_batched=batched)
    for i, r in enumerate(res):
        if r is not None:
            out[i] = r.detach()
    return out


def _double_backward(f, params, v, batched=False, no_graph="warn", **_):
    loss = _loss(f)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return second_backward(grads, params, v, batched=batched, no_graph=no_graph)


class _Closure(torch.nn.Module):
    """Lets torch.func.functional_call rebind `module`'s parameters while the user's closure
    runs (the closure reaches them through the module)."""

    def __init__(self, module, f):
        super().__init__()
        self.module = module
        self._closure = f

    def forward(self):
        return self._closure()


def param_names(module, params) -> list:
    lookup = {id(p): n for n, p in module.named_parameters()}
    names = []
    for i, p in enumerate(params):
        if id(p) not in lookup:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the "
                             "module; forward_over_reverse rebinds parameters by name with "
                             "torch.func.functional_call, so every param must belong to it")
        names.append(lookup[id(p)])
    return names


def functional_loss(f, params, module):
    """L as a function of a tuple of parameter tensors (torch.func style)."""
    if module is None:
        raise ValueError("forward_over_reverse needs the module that owns params (pass "
                         "params=model or module=model): it rebinds them with "
                         "torch.func.functional_call")
    wrapper = _Closure(module, f)
    keys = ["module." + n for n in param_names(module, params)]

    def loss_of(ps):
        return check_loss(torch.func.functional_call(wrapper, dict(zip(keys, ps)), ()))
    return loss_of


def _forward_over_reverse(f, params, v, batched=False, module=None, **_):
    loss_of = functional_loss(f, params, module)
    grad_fn = torch.func.grad(loss_of)
    primals = (tuple(p.detach() for p in params),)

    def one(*vs):
        return torch.func.jvp(grad_fn, primals, (tuple(vs),))[1]
    if not batched:
        return [t.detach() for t in one(*v)]
    try:
        res = torch.func.vmap(one)(*v)
    except _ROUTE_ERRORS as e:
        warnings.warn(f"forward_over_reverse: torch.func.vmap over the probes failed ({e}); "
                      "computing them one at a time", stacklevel=3)
        return _loop(lambda vs: [t.detach() for t in one(*vs)], params, v)
    return [t.detach() for t in res]


def _finite_difference(f, params, v, batched=False, fd_eps=None, **_):
    if batched:
        return _loop(lambda vs: _finite_difference(f, params, vs, fd_eps=fd_eps), params, v)
    vnorm = float(dot(v, v)) ** 0.5
    if vnorm == 0.0:
        return _zeros_out(params, v, False)
    h = fd_step(params) if fd_eps is None else float(fd_eps)
    if not h > 0:
        raise ValueError(f"fd_eps must be positive, got {fd_eps!r}")
    u = [t / vnorm for t in v]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, u):
                p.add_(d, alpha=h)
        g_plus = gradient(f, params)
        with torch.no_grad():
            for p, s, d in zip(params, saved, u):
                p.copy_(s).add_(d, alpha=-h)
        g_minus = gradient(f, params)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    scale = vnorm / (2.0 * h)
    return [(a - b) * scale for a, b in zip(g_plus, g_minus)]


def _loop(one, params, v):
    """Batched probes one at a time: v[i][j] is probe j of parameter i."""
    k = v[0].shape[0]
    rows = [one([t[j] for t in v]) for j in range(k)]
    return [torch.stack([r[i] for r in rows]) for i in range(len(params))]


_ROUTES = {"double_backward": _double_backward,
           "forward_over_reverse": _forward_over_reverse,
           "finite_difference": _finite_difference}


def run_route(method, f, params, v, *, batched=False, module=None, fd_eps=None,
              no_graph="warn"):
    """One route on validated params / v (batched: leading probe dimension)."""
    if method == "double_backward" and batched:
        try:
            return _double_backward(f, params, v, batched=True, no_graph=no_graph)
        except _ROUTE_ERRORS as e:
            if str(e) == _NO_GRAPH or ("vmap" not in str(e) and "batch" not in str(e).lower()):
                raise
            warnings.warn(f"double_backward: batched probes (is_grads_batched, vmap) failed "
                          f"({e}); computing them one at a time", stacklevel=3)
            return _loop(lambda vs: _double_backward(f, params, vs, no_graph=no_graph),
                         params, v)
    return _ROUTES[method](f, params, v, batched=batched, module=module, fd_eps=fd_eps,
                           no_graph=no_graph)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}"


def auto_hvp(f, params, v, *, batched=False, module=None, fallback="finite_difference",
             fd_eps=None, errors=None, stacklevel=2):
    """(Hv, method used): the first exact route that works, else `fallback` with a warning.
    `errors` maps routes already known to fail to their exception (they are not retried)."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be 'finite_difference' or None, got {fallback!r}")
    errors = dict(errors or {})
    for method in EXACT_METHODS:
        if method in errors:
            continue
        if method == "forward_over_reverse" and module is None:
            errors[method] = "not tried: no module given (pass params=model or module=model)"
            continue
        try:
            out = run_route(method, f, params, v, batched=batched, module=module,
                            no_graph="raise")
        except _ROUTE_ERRORS as e:
            errors[method] = e
            continue
        if errors:
            warnings.warn(f"hvp(method='auto'): using {method!r}; "
                          + "; ".join(f"{m} failed ({_describe(e)})" for m, e in errors.items()),
                          stacklevel=stacklevel + 1)
        return out, method
    why = "; ".join(f"{m}: {_describe(e)}" for m, e in errors.items())
    if fallback is None:
        raise RuntimeError(f"hvp(method='auto'): no exact Hessian-vector route works for this "
                           f"model ({why}). Use method='finite_difference' (central "
                           "differences of two gradients, needs first derivatives only), "
                           "lowbit.hessian.ggn_vp (Gauss-Newton products), or make the "
                           "offending op differentiable twice (e.g. SDPA's MATH backend)")
    warnings.warn(f"hvp(method='auto'): no exact route works for this model ({why}); falling "
                  f"back to {fallback!r} (central differences of two gradients, O(h²) "
                  "truncation error, see lowbit.hessian.hvp)", stacklevel=stacklevel + 1)
    return run_route(fallback, f, params, v, batched=batched, fd_eps=fd_eps), fallback


def _describe(e):
    return e if isinstance(e, str) else _short(e)


def hvp(f, params, v, *, method: str = "auto", batched: bool = False, module=None,
        fallback: str | None = "finite_difference", fd_eps: float | None = None) -> list:
    """Hessian-vector product H v of the scalar loss `f()` with respect to `params`.

    f: closure returning the loss (scalar tensor) at the current parameters.
    params: a sequence of tensors that require grad, or an nn.Module (its parameters that
        require grad, in .parameters() order; the module also enables forward_over_reverse).
    v: tensors shaped like params (a single tensor for a single parameter); with batched=True
        each has a leading probe dimension k and the result does too (one pass with vmap /
        is_grads_batched where the route and the model allow it, else a loop, with a warning).
    method: "auto" | "double_backward" | "forward_over_reverse" | "finite_difference" (module
        docstring: cost, requirements, the finite-difference step).
    module: the module owning params, when params is a list (for forward_over_reverse).
    fallback: what "auto" does when no exact route works: "finite_difference" (warns) or None
        (raises RuntimeError).
    fd_eps: finite-difference step h along v/‖v‖ (default fd_step(params)).
    Returns a list of tensors shaped like params (detached)."""
    _check_method(method)
    plist, owner = as_param_list(params)
    module = module if module is not None else owner
    v = check_vector(v, plist, batched)
    if method == "auto":
        return auto_hvp(f, plist, v, batched=batched, module=module, fallback=fallback,
                        fd_eps=fd_eps)[0]
    return run_route(method, f, plist, v, batched=batched, module=module, fd_eps=fd_eps)


def hvp_from_loss(loss, params, v, *, batched: bool = False,
                  retain_graph: bool = False) -> list:
    """H v from a loss that was already computed with its graph (double backward; the only
    route that needs no re-evaluation). retain_graph=True keeps the graph for further calls
    (or a later loss.backward()). For many products at one point, HessianOperator reuses the
    gradient's graph instead of rebuilding it."""
    loss = check_loss(loss, "loss")
    require_graph(loss)
    plist, _ = as_param_list(params)
    v = check_vector(v, plist, batched)
    try:
        grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True,
                                    retain_graph=True)
        return second_backward(grads, plist, v, batched=batched, retain_graph=retain_graph)
    except _ROUTE_ERRORS as e:
        raise RuntimeError(f"hvp_from_loss: double backward through the loss's graph failed "
                           f"({_short(e)}). A computed loss only supports this route; pass a "
                           "closure to lowbit.hessian.hvp (method='auto' tries "
                           "forward_over_reverse and finite differences)") from e
