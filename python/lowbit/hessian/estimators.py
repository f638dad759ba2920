"""Hutchinson estimators of diag(H) and tr(H), with their sampling variance.

For probes z with E[z zᵀ] = I (Rademacher or Gaussian, lowbit.hessian.probes):
  trace     t = zᵀHz is unbiased for tr(H);
            Var t = 2 Σ_{i≠j} H_ij²  (Rademacher)      Var t = 2 ‖H‖_F²  (Gaussian)
  diagonal  d = z ⊙ Hz is unbiased for diag(H);
            Var d_i = Σ_{j≠i} H_ij²  (Rademacher)      Var d_i = Σ_{j≠i} H_ij² + 2 H_ii²  (Gaussian)
so Rademacher probes are never worse, and exact (zero variance) for a diagonal H.
The estimators average M probes and report the sample variance of one probe's estimate
(unbiased, M − 1 in the denominator) and the standard error sqrt(variance / M) of the mean.
Cost: M operator products (HVPs for a HessianOperator), in chunks of batch_size through the
operator's batched product when batch_size > 1.
"""
from dataclasses import dataclass

import torch

from .operator import as_operator
from .probes import probes as _probes


@dataclass
class TraceEstimate:
    mean: float             # the estimate of tr(H)
    variance: float         # sample variance of one probe's zᵀHz
    stderr: float           # standard error of the mean, sqrt(variance / num_probes)
    samples: torch.Tensor   # float64 [num_probes]: zᵀHz per probe
    num_probes: int
    num_matvecs: int


@dataclass
class DiagonalEstimate:
    mean: list              # the estimate of diag(H), shaped like the parameters (float64)
    variance: list          # per-element sample variance of one probe's z ⊙ Hz
    stderr: list            # per-element standard error of the mean
    num_probes: int
    num_matvecs: int


def _run(op, num_probes, distribution, seed, offset, batch_size, want_diag):
    op = as_operator(op)
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    start = op.num_matvecs
    samples = []
    # running mean / sum of squared deviations per element, in float64
    mean = [torch.zeros(t.shape, dtype=torch.float64, device=op.device) for t in op.like]
    m2 = [torch.zeros_like(m) for m in mean]
    count = 0
    for first in range(0, num_probes, batch_size):
        k = min(batch_size, num_probes - first)
        Z = _probes(op.like, k, seed=seed, distribution=distribution, offset=offset,
                    first=first)
        Z = [z.to(op.device) for z in Z]
        HZ = op.matmat(Z) if k > 1 else [t.unsqueeze(0) for t in op([z[0] for z in Z])]
        prods = [z.double() * hz.double() for z, hz in zip(Z, HZ)]  # (k, *shape) each
        samples.extend(sum(p.reshape(k, -1).sum(1) for p in prods).tolist())
        if want_diag:  # Chan et al.'s pairwise update of the running mean and M2
            total = count + k
            for mu, s, p in zip(mean, m2, prods):
                pm = p.mean(0)
                delta = pm - mu
                mu.add_(delta * (k / total))
                s.add_((p - pm).square().sum(0) + delta.square() * (count * k / total))
            count = total
    t = torch.tensor(samples, dtype=torch.float64)
    tvar = float(t.var(unbiased=True)) if num_probes > 1 else float("nan")
    trace = TraceEstimate(float(t.mean()), tvar, (tvar / num_probes) ** 0.5, t, num_probes,
                          op.num_matvecs - start)
    if not want_diag:
        return trace, None
    var = [s / (num_probes - 1) if num_probes > 1 else torch.full_like(s, float("nan"))
           for s in m2]
    diag = DiagonalEstimate(mean, var, [(v / num_probes).sqrt() for v in var], num_probes,
                            op.num_matvecs - start)
    return trace, diag


def hutchinson_trace(op, num_probes: int = 100, *, distribution: str = "rademacher",
                     seed: int = 0, offset: int = 0, batch_size: int = 1) -> TraceEstimate:
    """tr(H) ≈ mean of zᵀHz over num_probes Philox probes (module docstring for the
    variance). op: a LinearOperator (HessianOperator(f, params), ...) or a square matrix."""
    return _run(op, num_probes, distribution, seed, offset, batch_size, False)[0]


def hutchinson_diagonal(op, num_probes: int = 100, *, distribution: str = "rademacher",
                        seed: int = 0, offset: int = 0,
                        batch_size: int = 1) -> DiagonalEstimate:
    """diag(H) ≈ mean of z ⊙ Hz over num_probes Philox probes, shaped like the parameters."""
    return _run(op, num_probes, distribution, seed, offset, batch_size, True)[1]


def hutchinson(op, num_probes: int = 100, *, distribution: str = "rademacher", seed: int = 0,
               offset: int = 0, batch_size: int = 1):
    """(TraceEstimate, DiagonalEstimate) from the same probes and products."""
    return _run(op, num_probes, distribution, seed, offset, batch_size, True)
