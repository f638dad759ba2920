"""Sophia (Liu, Li, Hall, Liang, Ma 2023, "Sophia: A Scalable Stochastic Second-order Optimizer
for Language Model Pre-training"; research/hessian.md §2, §5) with fused 32/8/4-bit states: the
kernel's "sophia" rule (lowbit.reference.optim), per element

    x = x · (1 − lr·wd)                       decoupled weight decay
    m = m + (1 − β1)(g − m)
    h = β2·h + (1 − β2)·ĥ                     only on Hessian refresh steps (ĥ: the estimate)
    x = x − lr · clamp(m / d, −c, c)          d = max(γ·h, eps)  or  γ·h + eps (SophiaG)

States "exp_avg" (m) and "hessian" (h, signed: a Hutchinson estimate can be negative, then
d = eps and the coordinate takes a sign-momentum step lr·c·sign(m)); quantized states use the
signed first-state codebook for both. No bias correction (as the official code and
pytorch-optimizer): before the first estimate h = 0 and every step is lr·c·sign(m).

SophiaH — pytorch-optimizer 4.1.0's SophiaH (names, defaults, update rule): update =
clamp(m / max(h, eps), −p, p), i.e. the kernel with γ = 1 and clip threshold c = p (the same
operations in the same order; the paper's η = lr·p and γ = p give the same steps). Hutchinson
estimates from Philox probes (Gaussian by default) every update_period steps; protocol in
lowbit.optim._curvature: step(closure) with a closure that returns the loss without calling
backward, step(hessian=[...]), or plain step() on non-refresh steps.

SophiaG — the official code (Liuhong99/Sophia sophia.py, = PyPI sophia-opt 0.2.2): lr 1e-4, betas
(0.965, 0.99), rho 0.04, weight_decay 0.1, step(closure=None, bs=5120): ratio
clamp(|m| / (rho·bs·h + 1e-15), max=1), i.e. the kernel with SOPHIA_ADD_EPS, γ = rho·bs,
eps = 1e-15, c = 1. h is the EMA of ĝ ⊙ ĝ (the official unit: the squared gradient of the mean
CE on sampled labels; the paper's h is bs times it). Feed it with update_hessian() after a
backward of the sampled-label loss (the official protocol: it reads .grad), or
update_hessian(lowbit.hessian.gnb_estimate(logits_fn, params)), or step(hessian=[ĝ⊙ĝ, ...]).
step(closure) follows torch: the closure calls backward itself (no HVP is involved).
Deviation: the official update_hessian() updates h at once; here the estimate waits in the state
("hessian_update", saved by state_dict) and the next step() applies the EMA inside its fused
pass before using h — the same numbers, one pass less. An estimate of a parameter that has no
gradient at that next step is dropped (the official code would have folded it in), and calling
update_hessian() twice without a step in between raises.

win_rate(): the fraction of coordinates whose ratio m / d was not clipped at the last step (the
official training script's train/win_rate; README: tune rho so it stays in 0.1-0.5), computed
from the states on demand (one pass over them).
"""
import torch

from ..hessian.gnb import GNBEstimate
from ..reference import optim as ref
from ._curvature import CurvatureOptimizer
from .adam import _check_common
from .spike import _bits


class _Sophia(CurvatureOptimizer):
    _kind = "sophia"

    def _gamma_eps_clip(self, group) -> tuple:
        raise NotImplementedError

    def _scalars(self, group, step, extra=None):
        beta1, beta2 = group["betas"]
        gamma, eps, clip = self._gamma_eps_clip(group)
        sc = ref.sophia_scalars(float(group["lr"]), beta1, beta2, gamma, eps, clip,
                                group["weight_decay"])
        return sc, {"maximize": bool(group["maximize"])}

    @torch.no_grad()
    def win_rate(self) -> float:
        """Fraction of the coordinates (over every parameter with a state) whose ratio m / d lies
        strictly inside (−c, c), from the current states (fp32, as the kernel computes d)."""
        unclipped, total = 0, 0
        for group in self.param_groups:
            sc, _ = self._scalars(group, 1)
            gamma, eps, c = (torch.tensor(v, dtype=torch.float32) for v in (sc[1], sc[5], sc[7]))
            add = isinstance(self, SophiaG)
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "step" not in state:
                    continue
                fmt = self._format_for(p, group)
                m, h = self._moments_fp32(p, state, self._state_names(group), fmt)
                gh = gamma * h
                d = gh + eps if add else torch.where(gh > eps, gh, eps)
                u = m / d
                unclipped += int(((u > -c) & (u < c)).sum())
                total += u.numel()
        return unclipped / total if total else float("nan")


class SophiaH(_Sophia):
    """SophiaH with fused 32/8/4-bit states (module docstring): pytorch-optimizer 4.1.0's
    arguments and defaults. p: the clip threshold of m / max(h, eps). weight_decay is decoupled
    (x · (1 − lr·wd)); pytorch-optimizer's weight_decouple=False / fixed_decay are not offered.
    seed keys the Hutchinson probes (and stochastic rounding); state_bits, block_size,
    min_quant_numel, stochastic_rounding, kahan, backend, nonfinite: lowbit.optim._base."""

    def __init__(self, params, lr=6e-2, betas=(0.96, 0.99), weight_decay=0.0, p=1e-2,
                 update_period=10, num_samples=1, hessian_distribution="gaussian", eps=1e-12,
                 maximize=False, **kwargs):
        _check_common(lr, eps, betas, weight_decay)
        if not p > 0.0:
            raise ValueError(f"SophiaH: p (the clip threshold) must be > 0, got {p!r}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, p=p, eps=eps,
                        maximize=maximize)
        super().__init__(params, defaults, update_period=update_period,
                         num_samples=num_samples, hessian_distribution=hessian_distribution,
                         **kwargs)

    def _gamma_eps_clip(self, group):
        return 1.0, group["eps"], group["p"]

    def step(self, closure=None, hessian=None):
        """One step (lowbit.optim._curvature for the protocol); returns the closure's loss."""
        return self._curvature_step(closure, hessian)


class SophiaG(_Sophia):
    """SophiaG with fused 32/8/4-bit states: the official code's arguments, defaults and update
    (module docstring), fed by the Gauss-Newton-Bartlett estimator
    (lowbit.hessian.gnb_estimate). Other keyword arguments: lowbit.optim._base."""
    _hutchinson = False

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, *,
                 maximize=False, **kwargs):
        _check_common(lr, 0.0, betas, weight_decay)
        if not rho >= 0.0:
            raise ValueError(f"SophiaG: invalid rho value: {rho}")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay,
                        maximize=maximize)
        self._bs = 5120
        self._updates_pending = False
        super().__init__(params, defaults, **kwargs)

    def _gamma_eps_clip(self, group):
        return group["rho"] * self._bs, 1e-15, 1.0

    def _hess_flags(self, group):
        return ref.SOPHIA_ADD_EPS

    @torch.no_grad()
    def update_hessian(self, estimate=None):
        """Queue a Hessian estimate for the next step() (which applies h = β2·h + (1 − β2)·e):
        estimate=None: e = .grad ⊙ .grad for every parameter with a gradient (the official
        update_hessian(), called after the backward of the sampled-label loss); a GNBEstimate
        (lowbit.hessian.gnb_estimate over the optimizer's parameters, in order): e = ĝ ⊙ ĝ; or a
        list with one tensor (or None) per parameter, in the official unit ĝ ⊙ ĝ."""
        params = self._all_params()
        if self._updates_pending:
            raise RuntimeError("SophiaG.update_hessian: an estimate is already waiting for the "
                               "next step(); call step() between two update_hessian() calls")
        if estimate is None:
            est = {p: (p.grad.detach().float() * p.grad.detach().float()).contiguous()
                   for p in params if p.grad is not None}
        elif isinstance(estimate, GNBEstimate):
            est = self._check_estimates(estimate.squared_grads, "the GNB estimate's gradients")
        else:
            est = self._check_estimates(estimate)
        groups = self._group_of()
        for p, e in est.items():
            state = self.state[p]
            if len(state) == 0:  # the official code creates the state here too
                state.update(self._fresh_state(p, groups[p]))
            state["hessian_update"] = e
        self._updates_pending = bool(est)

    def step(self, closure=None, bs=5120, hessian=None):
        """One step: gradients from .grad (closure, if given, runs first as in torch: it calls
        backward itself); bs = predictions per step (tokens for a language model), the B of the
        estimates (lowbit.hessian.gnb); hessian=: as update_hessian(list) just before."""
        if not bs > 0:
            raise ValueError(f"SophiaG.step: bs must be > 0, got {bs!r}")
        if hessian is not None:
            self.update_hessian(hessian)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        queued = [p for p in self._all_params() if "hessian_update" in self.state.get(p, {})]
        pending = {p: self.state[p]["hessian_update"] for p in queued if p.grad is not None}
        self._bs = bs
        self._curvature_step(None, None, "update_hessian", pending)
        for p in queued:  # consumed (or, without a gradient, dropped) once the step succeeded
            del self.state[p]["hessian_update"]
        self._updates_pending = False
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["curvature"]["bs"] = self._bs
        return sd

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._bs = state_dict.get("curvature", {}).get("bs", self._bs)
        self._updates_pending = any("hessian_update" in st for st in self.state.values())


SophiaH8bit, SophiaH4bit = _bits(SophiaH, 8), _bits(SophiaH, 4)
SophiaG8bit, SophiaG4bit = _bits(SophiaG, 8), _bits(SophiaG, 4)
