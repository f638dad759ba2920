"""Symmetric linear operators on parameter-shaped vectors, the input of every estimator.

LinearOperator wraps a matvec (list of tensors -> list of tensors) and counts the products it
performs (`num_matvecs`), which is the cost unit the estimators report. Build one with:
  HessianOperator(f, params, method=...)      H of the loss closure f (lowbit.hessian.hvp routes)
  GGNOperator(outputs_fn, params, ...)         the Gauss-Newton matrix (lowbit.hessian.ggn_vp)
  LinearOperator.from_matrix(A)               a dense symmetric matrix (tests, small problems)
  preconditioned(op, p_diag)                   P^{-1/2} op P^{-1/2}, P diagonal and positive
"""
import warnings

import torch

from ._vectors import as_param_list, check_vector, flatten, unflatten
from .ggn import ggn_vp
from .hvp import (_ROUTE_ERRORS, _check_method, auto_hvp, run_route, second_backward)


def _meta_like(tensors):
    return [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors]


class LinearOperator:
    """A symmetric linear map on lists of tensors shaped like `like`; callable on such a list,
    `matvec_flat` on one flat vector. `num_matvecs` counts the products computed so far."""

    def __init__(self, matvec, like, *, device=None, name: str = "operator"):
        like = list(like)
        self._matvec = matvec
        self.like = _meta_like(like)
        self.device = device if device is not None else like[0].device
        self.dtype = like[0].dtype
        for t in like[1:]:
            self.dtype = torch.promote_types(self.dtype, t.dtype)
        self.numel = sum(t.numel() for t in like)
        self.num_matvecs = 0
        self.name = name

    @classmethod
    def from_matrix(cls, A: torch.Tensor) -> "LinearOperator":
        """x -> A x for a square matrix A (assumed symmetric); vectors are [tensor of shape
        (n,)]."""
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}")
        return cls(lambda v: [A @ v[0]], [A[0]], name="matrix")

    def __call__(self, v) -> list:
        self.num_matvecs += 1
        return self._matvec(v)

    def matmat(self, V) -> list:
        """Products with k probes at once: V[i] has shape (k, *like[i].shape)."""
        k = V[0].shape[0]
        rows = [self([t[j] for t in V]) for j in range(k)]
        return [torch.stack([r[i] for r in rows]) for i in range(len(self.like))]

    def to_list(self, x: torch.Tensor) -> list:
        return unflatten(x, self.like)

    def to_flat(self, v) -> torch.Tensor:
        return flatten(v, self.dtype)

    def matvec_flat(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_flat(self(self.to_list(x.to(self.dtype))))

    def release(self):
        """Free anything the operator caches (a retained graph); a no-op here."""


class HessianOperator(LinearOperator):
    """H of the loss closure f at the current parameters (route as lowbit.hessian.hvp).

    With reuse_graph=True (default) the double_backward route builds ∇L with create_graph=True
    once and keeps its graph, so each further product is one backward of that backward (~1.6
    gradients instead of ~2.5); the graph is rebuilt when a parameter changes in place (its
    version counter moves) and freed by release(). "auto" settles the route on the first
    product (warning once if it had to fall back) and keeps it: `method` tells which."""

    def __init__(self, f, params, *, method: str = "auto", module=None,
                 fallback: str | None = "finite_difference", fd_eps: float | None = None,
                 reuse_graph: bool = True):
        _check_method(method)
        plist, owner = as_param_list(params)
        super().__init__(None, plist, name="hessian")
        self.params = plist
        self.f = f
        self.module = module if module is not None else owner
        self.requested = method
        self.method = None if method == "auto" else method
        self.fallback = fallback
        self.fd_eps = fd_eps
        self.reuse_graph = reuse_graph
        self._grads = None
        self._versions = None

    def release(self):
        self._grads = None
        self._versions = None

    def _cached_grads(self):
        versions = [p._version for p in self.params]
        if self._grads is None or versions != self._versions:
            from .hvp import _loss
            loss = _loss(self.f)
            self._grads = torch.autograd.grad(loss, self.params, create_graph=True,
                                              allow_unused=True)
            self._versions = versions
        return self._grads

    def _product(self, v, batched):
        if self.method == "double_backward" and self.reuse_graph:
            return second_backward(self._cached_grads(), self.params, v, batched=batched,
                                   retain_graph=True)
        if self.method is not None:
            return run_route(self.method, self.f, self.params, v, batched=batched,
                             module=self.module, fd_eps=self.fd_eps)
        errors = {}
        if self.reuse_graph:
            try:
                out = second_backward(self._cached_grads(), self.params, v, batched=batched,
                                      retain_graph=True, no_graph="raise")
                self.method = "double_backward"
                return out
            except _ROUTE_ERRORS as e:
                self.release()
                errors["double_backward"] = e
        out, self.method = auto_hvp(self.f, self.params, v, batched=batched,
                                    module=self.module, fallback=self.fallback,
                                    fd_eps=self.fd_eps, errors=errors, stacklevel=4)
        return out

    def __call__(self, v) -> list:
        v = check_vector(v, self.params)
        self.num_matvecs += 1
        return self._product(v, batched=False)

    def matmat(self, V) -> list:
        V = check_vector(V, self.params, batched=True)
        self.num_matvecs += V[0].shape[0]
        try:
            return self._product(V, batched=True)
        except _ROUTE_ERRORS as e:
            if self.method is None:
                raise
            warnings.warn(f"HessianOperator.matmat: batched products failed ({e}); computing "
                          "them one at a time", stacklevel=2)
            self.num_matvecs -= V[0].shape[0]
            return super().matmat(V)


class GGNOperator(LinearOperator):
    """The generalised Gauss-Newton matrix G = Jᵀ H_ℓ J (lowbit.hessian.ggn_vp); PSD."""

    def __init__(self, outputs_fn, params, targets=None, *, loss: str = "cross_entropy",
                 reduction: str = "mean", ignore_index: int = -100, jvp: str = "auto",
                 module=None, fd_eps=None):
        plist, owner = as_param_list(params)
        module = module if module is not None else owner
        self.params = plist

        def mv(v):
            return ggn_vp(outputs_fn, plist, v, targets, loss=loss, reduction=reduction,
                          ignore_index=ignore_index, jvp=jvp, module=module, fd_eps=fd_eps)
        super().__init__(mv, plist, name="ggn")


def preconditioned(op: LinearOperator, p_diag) -> LinearOperator:
    """The symmetric P^{-1/2} op P^{-1/2} for a positive diagonal P given shaped like op's
    vectors; its eigenvalues are those of P⁻¹ op (a vector y of it maps to x = P^{-1/2} y)."""
    p_diag = [p_diag] if isinstance(p_diag, torch.Tensor) else list(p_diag)
    if len(p_diag) != len(op.like):
        raise ValueError(f"the preconditioner has {len(p_diag)} tensors, the operator's "
                         f"vectors {len(op.like)}")
    scale = []
    for i, (d, t) in enumerate(zip(p_diag, op.like)):
        if tuple(d.shape) != tuple(t.shape):
            raise ValueError(f"preconditioner[{i}] has shape {tuple(d.shape)}, expected "
                             f"{tuple(t.shape)}")
        d = d.detach().to(op.device, torch.float64)
        if not bool((d > 0).all()) or not bool(torch.isfinite(d).all()):
            raise ValueError(f"preconditioner[{i}] must be finite and positive (P = diag(sqrt(v̂)"
                             " + eps) is, for eps > 0)")
        scale.append(d.rsqrt())

    def mv(v):
        x = [(a * s).to(t.dtype) for a, s, t in zip(v, scale, op.like)]
        return [(a * s).to(t.dtype) for a, s, t in zip(op(x), scale, op.like)]
    out = LinearOperator(mv, op.like, device=op.device, name=f"preconditioned {op.name}")
    out.inner = op
    return out


def as_operator(op) -> LinearOperator:
    """An estimator's input: a LinearOperator (HessianOperator, GGNOperator, ...) or a square
    matrix."""
    if isinstance(op, LinearOperator):
        return op
    if isinstance(op, torch.Tensor):
        return LinearOperator.from_matrix(op)
    raise TypeError("expected a LinearOperator (e.g. lowbit.hessian.HessianOperator(f, params)) "
                    f"or a square matrix, got {type(op).__name__}; a loss closure must be "
                    "wrapped in HessianOperator first")
