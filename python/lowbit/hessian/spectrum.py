"""Eigenvalues and spectral density of a symmetric operator from its products alone.

  power_iteration   top-k eigenpairs by |λ|, one at a time, each iterated on the operator
                    deflated by projection against the pairs already found (x ⟂ Q and
                    Hx − QQᵀHx); stops when the residual ‖Hx − λx‖ ≤ tol·|λ|. One product
                    per iteration; warm start from previous eigenvectors with init=.
  lanczos           k extreme eigenpairs ("LA" largest algebraic — the sharpness —, "SA"
                    smallest, "LM" largest magnitude) from a Krylov basis with full
                    reorthogonalisation (classical Gram-Schmidt, twice). One product per step;
                    stops when the wanted Ritz pairs' residuals |β_m s_{m,i}| ≤ tol·|θ_i|; on
                    breakdown (an invariant subspace) it continues from a fresh random vector
                    orthogonal to the basis. The basis costs (steps + 1) × n memory.
  spectral_density  stochastic Lanczos quadrature (Golub–Meurant; Ghorbani et al. 2019): per
                    run a normalised Rademacher start vector, m Lanczos steps, nodes θ_i = the
                    eigenvalues of T_m and weights w_i = (e₁ᵀ s_i)² (they sum to 1); the density
                    is the average over runs of Σ_i w_i N(x; θ_i, σ²), a unit-mass mixture of
                    Gaussians evaluated on a grid padded by 6σ beyond the extreme nodes, so it
                    integrates to 1 (up to < 1e-8 of Gaussian tail and the grid's trapezoid
                    error). Cost: runs × steps products.
Vectors are handled flat (one 1-D tensor) in the operator's dtype; the small tridiagonal
problems are solved in float64. Random start vectors come from the Philox probe stream
(lowbit.hessian.probes), so results are reproducible from `seed`.
"""
import math
from dataclasses import dataclass, field

import torch

from .operator import LinearOperator, as_operator
from .probes import probe

WHICH = ("LA", "SA", "LM")


@dataclass
class EigenResult:
    eigenvalues: torch.Tensor       # float64 [k]
    eigenvectors: list              # k vectors, each a list of tensors shaped like the params
    residuals: torch.Tensor         # float64 [k]: ‖Hx − λx‖ (Lanczos: its Ritz estimate)
    iterations: list                # power: iterations per pair; lanczos: [steps]
    num_matvecs: int
    converged: list = field(default_factory=list)


def _start(op, init, index, seed, basis=None):
    """A unit start vector: init (list or flat) if given, else Philox Gaussian probe `index`;
    orthogonalised against the rows of `basis`."""
    if init is not None:
        x = init.reshape(-1) if isinstance(init, torch.Tensor) else op.to_flat(init)
        if x.numel() != op.numel:
            raise ValueError(f"init has {x.numel()} elements, the operator's vectors {op.numel}")
        x = x.detach().to(op.device, op.dtype).clone()
    else:
        x = op.to_flat(probe(op.like, index, seed=seed, distribution="gaussian")).to(op.device)
    if basis is not None and len(basis):
        for _ in range(2):
            x = x - basis.T @ (basis @ x)
    nrm = x.norm()
    if not nrm > 0:
        return None
    return x / nrm


def _init_list(init, k):
    if init is None:
        return [None] * k
    if isinstance(init, torch.Tensor) or (isinstance(init, (list, tuple)) and init
                                          and isinstance(init[0], torch.Tensor)):
        init = [init]  # one vector (flat, or a list of tensors)
    init = list(init)
    return (init + [None] * k)[:k]


def power_iteration(op, k: int = 1, *, max_iter: int = 100, tol: float = 1e-3, init=None,
                    seed: int = 0) -> EigenResult:
    """The k eigenpairs of largest |λ| by power iteration with deflation (module docstring).
    init: a start vector, or a list of up to k (e.g. the previous call's eigenvectors)."""
    op = as_operator(op)
    if not isinstance(k, int) or not 1 <= k <= op.numel:
        raise ValueError(f"k must be an int in [1, {op.numel}], got {k!r}")
    start = op.num_matvecs
    inits = _init_list(init, k)
    Q = torch.empty(0, op.numel, dtype=op.dtype, device=op.device)
    vals, vecs, res, iters, conv = [], [], [], [], []
    for j in range(k):
        x = _start(op, inits[j], j, seed, Q)
        if x is None:
            x = _start(op, None, j, seed, Q)
        lam, r, it, ok = 0.0, float("inf"), 0, False
        for it in range(1, max_iter + 1):
            y = op.matvec_flat(x)
            if len(Q):
                y = y - Q.T @ (Q @ y)
            lam = float(torch.dot(x.double(), y.double()))
            r = float((y - lam * x).norm())
            if r <= tol * abs(lam) or r == 0.0:
                ok = True
                break
            ny = y.norm()
            if not ny > 0:
                break
            x = y / ny
            if len(Q):  # keep x ⟂ Q against rounding
                x = x - Q.T @ (Q @ x)
                x = x / x.norm()
        vals.append(lam), vecs.append(x), res.append(r), iters.append(it), conv.append(ok)
        Q = torch.cat([Q, x.unsqueeze(0)])
    order = sorted(range(k), key=lambda i: -abs(vals[i]))
    return EigenResult(torch.tensor([vals[i] for i in order], dtype=torch.float64),
                       [op.to_list(vecs[i]) for i in order],
                       torch.tensor([res[i] for i in order], dtype=torch.float64),
                       [iters[i] for i in order], op.num_matvecs - start,
                       [conv[i] for i in order])


def _select(theta, k, which):
    if which == "LA":
        return torch.argsort(theta, descending=True)[:k]
    if which == "SA":
        return torch.argsort(theta)[:k]
    return torch.argsort(theta.abs(), descending=True)[:k]


def _lanczos_basis(op: LinearOperator, q0, steps, seed, check=None):
    """Lanczos with full reorthogonalisation from unit q0 for up to `steps` steps. check(alpha,
    beta, m) -> True stops early. Returns (alpha [m], beta [m], basis [m+1?, n])."""
    n = op.numel
    steps = min(steps, n)
    Q = torch.empty(steps, n, dtype=op.dtype, device=op.device)
    alpha, beta = [], []
    q, restarts = q0, 0
    for m in range(steps):
        Q[m] = q
        w = op.matvec_flat(q)
        a = float(torch.dot(q.double(), w.double()))
        alpha.append(a)
        # the three-term recurrence, then full reorthogonalisation against the whole basis: one
        # classical Gram-Schmidt pass, and a second only when the first removed more than
        # 1 - 1/sqrt(2) of what was left (the DGKS test). After the recurrence w is already
        # nearly orthogonal, so one pass is the rule; each pass reads the whole basis twice
        # (~4 ms at 20 vectors of 0.5 M), a sizeable share of a step next to the product.
        w = w - a * q
        if m > 0 and beta[-1] != 0.0:
            w = w - beta[-1] * Q[m - 1]
        basis = Q[:m + 1]
        nrm = w.norm()
        for _ in range(2):
            before = nrm
            w = w - basis.T @ (basis @ w)
            nrm = w.norm()
            if nrm >= 0.7071067811865476 * before:
                break
        b = float(nrm)
        beta.append(b)
        if check is not None and check(alpha, beta, m + 1):
            return alpha, beta, Q[:m + 1]
        if m + 1 == steps:
            break
        scale = max(abs(a), max(abs(x) for x in alpha), 1e-300)
        if b <= 1e-10 * scale:
            # invariant subspace: continue from a fresh random vector orthogonal to the basis
            beta[-1] = 0.0
            restarts += 1
            q = _start(op, None, 10_000 + restarts, seed, basis)
            if q is None:
                return alpha, beta, Q[:m + 1]
        else:
            q = w / b
    return alpha, beta, Q[:len(alpha)]


def _tridiag_eigh(alpha, beta):
    m = len(alpha)
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(beta[:m - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(T)


def lanczos(op, k: int = 1, *, which: str = "LA", max_steps: int | None = None,
            tol: float = 1e-6, init=None, seed: int = 0, min_steps: int = 1,
            rtol: float | None = None) -> EigenResult:
    """k extreme eigenpairs by Lanczos with full reorthogonalisation (module docstring).
    max_steps defaults to min(n, max(2k + 20, 40)); init: a start vector (e.g. the previous
    leading eigenvector, a list of tensors or a flat tensor), else a Philox Gaussian one.

    Stops when every selected Ritz pair's residual is <= tol * |θ| (`converged` reports this
    test), or, with rtol, as soon as every selected Ritz value moved by <= rtol * |θ| since the
    previous step — the rule PyHessian's power iteration uses. Ritz values settle long before
    their residuals when the top of the spectrum has no gap (a network's Hessian, typically):
    rtol=1e-3 gives the eigenvalue to about that relative accuracy for far fewer products."""
    op = as_operator(op)
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    if not isinstance(k, int) or not 1 <= k <= op.numel:
        raise ValueError(f"k must be an int in [1, {op.numel}], got {k!r}")
    steps = min(op.numel, max_steps if max_steps is not None else max(2 * k + 20, 40))
    if steps < k:
        raise ValueError(f"max_steps={max_steps} is below k={k}")
    if rtol is not None and not rtol >= 0:
        raise ValueError(f"rtol must be None or >= 0, got {rtol!r}")
    start = op.num_matvecs
    if isinstance(init, (list, tuple)) and init and isinstance(init[0], list):
        init = init[0]  # a list of eigenvectors: start from the leading one
    q0 = _start(op, init, 0, seed) if init is not None else None
    if q0 is None:
        q0 = _start(op, None, 0, seed)

    previous = []  # the selected Ritz values of the last step (rtol)

    def converged(alpha, beta, m):
        if m < k:
            return False
        theta, S = _tridiag_eigh(alpha, beta)
        idx = _select(theta, k, which)
        scale = theta[idx].abs().clamp_min(1e-300)
        settled = False
        if rtol is not None:
            settled = len(previous) == k and bool(
                ((theta[idx] - torch.stack(previous)).abs() <= rtol * scale).all())
            previous[:] = list(theta[idx])
        if m < min_steps:
            return False
        resid = (beta[-1] * S[-1, idx]).abs()
        return settled or bool((resid <= tol * scale).all())

    alpha, beta, Q = _lanczos_basis(op, q0, steps, seed, converged)
    theta, S = _tridiag_eigh(alpha, beta)
    idx = _select(theta, k, which)
    resid = (beta[-1] * S[-1, idx]).abs()
    ok = (resid <= tol * theta[idx].abs().clamp_min(1e-300)).tolist()
    Y = S[:, idx].to(Q.dtype).T @ Q  # Ritz vectors as rows
    vecs = [op.to_list(y / y.norm()) for y in Y]
    return EigenResult(theta[idx].clone(), vecs, resid.clone(), [len(alpha)],
                       op.num_matvecs - start, ok)


@dataclass
class SpectralDensity:
    grid: torch.Tensor      # float64 [num_points]
    density: torch.Tensor   # float64 [num_points]; ∫ density = 1
    nodes: torch.Tensor     # float64 [num_runs, m]: Ritz values per run
    weights: torch.Tensor   # float64 [num_runs, m]: quadrature weights per run (rows sum to 1)
    sigma: float            # Gaussian broadening (standard deviation)
    num_matvecs: int

    def mass(self, lo: float = -math.inf, hi: float = math.inf) -> float:
        """∫ density over [lo, hi] (trapezoid rule on the grid)."""
        keep = (self.grid >= lo) & (self.grid <= hi)
        if int(keep.sum()) < 2:
            return 0.0
        return float(torch.trapezoid(self.density[keep], self.grid[keep]))


def spectral_density(op, *, num_runs: int = 10, num_steps: int = 80, sigma: float | None = None,
                     num_points: int = 1024, seed: int = 0) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (module docstring). sigma defaults to
    (spread of the nodes) / num_steps; the grid gets at least 2 points per sigma."""
    op = as_operator(op)
    if num_runs < 1 or num_steps < 1:
        raise ValueError("num_runs and num_steps must be positive")
    start = op.num_matvecs
    m = min(num_steps, op.numel)
    nodes = torch.zeros(num_runs, m, dtype=torch.float64)
    weights = torch.zeros(num_runs, m, dtype=torch.float64)
    for r in range(num_runs):
        z = op.to_flat(probe(op.like, r, seed=seed, distribution="rademacher")).to(op.device)
        alpha, beta, _ = _lanczos_basis(op, z / z.norm(), m, seed + 1 + r)
        theta, S = _tridiag_eigh(alpha, beta)
        nodes[r, :len(theta)] = theta
        weights[r, :len(theta)] = S[0] ** 2
    lo, hi = float(nodes[weights > 0].min()), float(nodes[weights > 0].max())
    spread = hi - lo
    if sigma is None:
        sigma = max(spread, 1e-3 * max(abs(lo), abs(hi)), 1e-12) / num_steps
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    pad = 6.0 * sigma
    points = max(num_points, min(200_000, int(math.ceil((spread + 2 * pad) / (sigma / 2))) + 1))
    grid = torch.linspace(lo - pad, hi + pad, points, dtype=torch.float64)
    density = torch.zeros_like(grid)
    norm = 1.0 / (num_runs * sigma * math.sqrt(2 * math.pi))
    for r in range(num_runs):
        d = (grid[:, None] - nodes[r][None, :]) / sigma
        density += (torch.exp(-0.5 * d * d) * weights[r][None, :]).sum(1) * norm
    return SpectralDensity(grid, density, nodes, weights, float(sigma), op.num_matvecs - start)
