"""Hessian-vector products and the curvature tools built on them (pure PyTorch).

  hvp, hvp_from_loss, fd_step       H v by double backward / forward-over-reverse / finite
                                     differences, "auto" route choice with a warning (hvp.py)
  ggn_vp, loss_hessian_product      Gauss-Newton products Jᵀ H_ℓ J v for (outputs, targets)
                                     losses: cross-entropy, MSE, BCE (ggn.py)
  HessianOperator, GGNOperator,     operators counting their products; preconditioned =
  LinearOperator, preconditioned     P^{-1/2} H P^{-1/2} (operator.py)
  gnb_estimate, sample_labels,      Sophia-G's Gauss-Newton-Bartlett estimate B·ĝ⊙ĝ from labels
  GNBEstimate                        sampled from the model (gnb.py)
  probe, probes, rademacher,        Philox probe vectors, reproducible by seed (probes.py)
  gaussian
  hutchinson_trace / _diagonal      Hutchinson estimates with sample variance (estimators.py)
  power_iteration, lanczos,         top-k eigenpairs, extreme eigenpairs, SLQ spectral density
  spectral_density                   (spectrum.py)
  SharpnessMonitor,                 λ_max(H) or λ_max(P⁻¹H) every N steps against the
  stability_threshold                optimizer's stability threshold, CSV + plot (monitor.py)
  plot_density, plot_sharpness      PNG plots with matplotlib's Agg canvas (plot.py)
  across_ranks                      DDP: an operator's products averaged over the ranks
                                     (distributed.py)
"""
from .distributed import across_ranks
from .estimators import (DiagonalEstimate, TraceEstimate, hutchinson, hutchinson_diagonal,
                         hutchinson_trace)
from .ggn import ggn_vp, loss_hessian_product
from .gnb import GNBEstimate, gnb_estimate, sample_labels
from .hvp import fd_step, hvp, hvp_from_loss
from .operator import GGNOperator, HessianOperator, LinearOperator, preconditioned
from .monitor import SharpnessMonitor, adam_preconditioner, stability_threshold
from .plot import plot_density, plot_sharpness
from .probes import gaussian, probe, probes, rademacher
from .spectrum import EigenResult, SpectralDensity, lanczos, power_iteration, spectral_density

__all__ = ["hvp", "hvp_from_loss", "fd_step", "ggn_vp", "loss_hessian_product", "gnb_estimate",
           "GNBEstimate", "sample_labels",
           "HessianOperator", "GGNOperator", "LinearOperator", "preconditioned", "probe",
           "probes", "rademacher", "gaussian", "hutchinson", "hutchinson_trace",
           "hutchinson_diagonal", "TraceEstimate", "DiagonalEstimate", "power_iteration",
           "lanczos", "spectral_density", "EigenResult", "SpectralDensity", "SharpnessMonitor",
           "stability_threshold", "adam_preconditioner", "plot_density", "plot_sharpness",
           "across_ranks"]
