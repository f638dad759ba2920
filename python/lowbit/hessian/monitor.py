"""SharpnessMonitor: the top Hessian eigenvalue along training, against the optimizer's
stability threshold (research/hessian.md §6).

Quantities and thresholds (η = learning rate):
  rule "gd"           λ_max(H)                          2 / η                   (Cohen et al. 2021)
  rule "heavy_ball"   λ_max(H), momentum β              (2 + 2β) / η
  rule "nesterov"     λ_max(H), momentum β              (2 + 2β) / (η (1 + 2β))
  rule "adam"         λ_max(P⁻¹H), P = diag(sqrt(v̂) + ε)  (2 + 2β₁) / ((1 − β₁) η)  (= 38/η at
                                                          β₁ = 0.9; Cohen et al. 2022, AEoS)
λ_max(P⁻¹H) is computed as the top eigenvalue of the symmetric P^{-1/2} H P^{-1/2}. For rule
"adam" without a preconditioner the threshold is NaN (raw sharpness has no Adam threshold).

Each reading builds a HessianOperator on the user's closure (the loss on a fixed probe batch —
keep it deterministic: same batch, no dropout, BatchNorm as you intend it) and runs Lanczos
(which="LA": the largest algebraic eigenvalue, which is what sharpness means) warm-started
from the previous reading's eigenvector, or power iteration (largest |λ|) with method="power".

Cost per reading = the number of HVPs, reported in the "hvps" column: Lanczos stops when the top
Ritz pair's residual is below tol·λ, typically 10–30 HVPs from a cold start and 3–10 warm
(min_steps=3 when warm, so that an eigenvalue that overtook the previous one is still seen); at
most max_steps. With the default double_backward route one HVP costs ~2.5 gradients for the
first product of a reading (it builds ∇L with its graph) and ~1.6 for each further one (the
graph is reused); finite differences cost 2 gradients each. Measuring every N steps with c HVPs
costs about 1.6·c/N of the training compute on that batch size.
"""
import csv
import math
import os
import time

import torch

from .hvp import METHODS
from .distributed import across_ranks
from .operator import HessianOperator, preconditioned
from .spectrum import lanczos, power_iteration
from ._vectors import as_param_list

RULES = ("gd", "heavy_ball", "nesterov", "adam")
COLUMNS = ("step", "sharpness", "threshold", "ratio", "lr", "rule", "preconditioned", "hvps",
           "iterations", "converged", "residual", "hvp_method", "seconds")


def stability_threshold(lr: float, *, rule: str = "gd", momentum: float = 0.0,
                        beta1: float = 0.9) -> float:
    """The sharpness above which the optimizer's linearised dynamics on a quadratic diverge
    (module docstring)."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if rule == "gd":
        return 2.0 / lr
    if rule == "heavy_ball":
        return (2.0 + 2.0 * momentum) / lr
    if rule == "nesterov":
        return (2.0 + 2.0 * momentum) / (lr * (1.0 + 2.0 * momentum))
    if rule == "adam":
        return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
    raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")


def _is_adam_like(opt) -> bool:
    if getattr(opt, "_kind", None) == "adam":
        return True
    return isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))


def adam_preconditioner(optimizer, params) -> list:
    """P = sqrt(v̂) + eps (v̂ = exp_avg_sq / (1 − β₂^step)) for each of `params`, from an Adam-
    family optimizer's state: torch.optim.Adam/AdamW, or a lowbit optimizer, whose 8/4-bit
    second moments are dequantized through its export_state_dict() (the torch-AdamW export
    path)."""
    lowbit_opt = hasattr(optimizer, "export_state_dict")
    if lowbit_opt:
        exported = optimizer.export_state_dict()["state"]
    owners, pid = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            owners[id(p)] = (pid, p, group)
            pid += 1
    out = []
    for i, p in enumerate(params):
        if id(p) not in owners:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not optimized by the "
                             "optimizer, so it has no second moment to precondition with")
        pid, _, group = owners[id(p)]
        state = exported.get(pid, {}) if lowbit_opt else optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            raise RuntimeError(f"params[{i}]: the optimizer has no exp_avg_sq state yet (or is "
                               "not Adam-family); measure the preconditioned sharpness after "
                               "the first optimizer step")
        if "betas" not in group or "eps" not in group:
            raise RuntimeError("the optimizer's param group has no betas / eps; pass "
                               "preconditioner= tensors or a callable instead")
        step = float(state["step"])
        beta2 = group["betas"][1]
        v_hat = state["exp_avg_sq"].detach().double() / (1.0 - beta2 ** step)
        out.append((v_hat.sqrt() + group["eps"]).to(p.device).reshape(p.shape))
    return out


class SharpnessMonitor:
    """Measures λ_max of H (or of P⁻¹H) every `every` steps on a fixed probe batch.

    closure: returns the loss on the probe batch (a scalar tensor) at the current parameters.
    params: the parameters (a module, or tensors that require grad).
    every: measure when step % every == 0 (maybe_measure / calling the monitor).
    optimizer: optional; supplies lr (read at each reading, so schedules are followed) and the
        rule: Adam-family (torch or lowbit) -> "adam" with β₁ = betas[0] and, by default, P from
        its second moments; SGD (torch or lowbit) -> "gd" / "heavy_ball" / "nesterov" from its
        momentum and nesterov settings.
    lr, rule, momentum, beta1: explicit settings (override what the optimizer implies).
    preconditioner: None (the rule's default: "optimizer" for Adam with an optimizer, else
        none), "none", "optimizer" (adam_preconditioner), a list of positive tensors shaped like
        params (P's diagonal), or a callable returning such a list at each reading.
    method: "lanczos" (default; largest algebraic eigenvalue) or "power" (largest |λ|).
    hvp_method, module, fd_eps: the HVP route (lowbit.hessian.hvp).
    max_steps, tol: Lanczos / power-iteration budget and relative residual tolerance.
    warm_start: start each reading from the previous eigenvector.
    csv_path: append one row per reading (header written when the file is new or empty).
    plot_path: rewrite a PNG of sharpness and threshold against step after each reading.
    across_ranks, group: under DDP, average each product over the ranks of `group` (default the
    world; lowbit.hessian.across_ranks): the reading is then the global loss's, the same on every
    rank. The closure computes this rank's loss through the plain module (ddp_model.module).
    Readings are kept in `history` (dicts with the CSV columns); `last_eigenvector` holds the
    previous eigenvector (in the preconditioned coordinates when preconditioned)."""

    def __init__(self, closure, params, *, every: int = 100, optimizer=None,
                 lr: float | None = None, rule: str | None = None,
                 momentum: float | None = None, beta1: float | None = None,
                 preconditioner=None, method: str = "lanczos", hvp_method: str = "auto",
                 module=None, fd_eps: float | None = None, max_steps: int = 30,
                 tol: float = 1e-3, warm_start: bool = True, seed: int = 0,
                 csv_path: str | os.PathLike | None = None,
                 plot_path: str | os.PathLike | None = None, across_ranks: bool = False,
                 group=None):
        if not callable(closure):
            raise TypeError("closure must be a callable returning the loss on the probe batch")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if method not in ("lanczos", "power"):
            raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
        if hvp_method not in METHODS:
            raise ValueError(f"hvp_method must be one of {', '.join(METHODS)}, got "
                             f"{hvp_method!r}")
        if rule is not None and rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        if optimizer is None and lr is None:
            raise ValueError("pass lr= (or optimizer=) so the reading can be compared with the "
                             "stability threshold")
        self.params, owner = as_param_list(params)
        self.module = module if module is not None else owner
        self.closure = closure
        # DDP: each product averaged over the ranks of `group` (lowbit.hessian.across_ranks)
        self.across_ranks, self.group = across_ranks, group
        self.every = every
        self.optimizer = optimizer
        self._lr, self._rule, self._momentum, self._beta1 = lr, rule, momentum, beta1
        if isinstance(preconditioner, str) and preconditioner not in ("none", "optimizer"):
            raise ValueError("preconditioner must be None, 'none', 'optimizer', tensors or a "
                             f"callable, got {preconditioner!r}")
        if preconditioner == "optimizer" and (optimizer is None or not _is_adam_like(optimizer)):
            raise ValueError("preconditioner='optimizer' needs an Adam-family optimizer "
                             "(torch.optim.Adam/AdamW or a lowbit Adam-family optimizer)")
        self.preconditioner = preconditioner
        self.method, self.hvp_method, self.fd_eps = method, hvp_method, fd_eps
        self.max_steps, self.tol, self.warm_start, self.seed = max_steps, tol, warm_start, seed
        self.csv_path, self.plot_path = csv_path, plot_path
        self.history = []
        self.last_eigenvector = None

    # --- settings resolved at each reading (lr schedules, optimizer changes) ------------------

    def _settings(self):
        group = self.optimizer.param_groups[0] if self.optimizer is not None else {}
        lr = float(self._lr if self._lr is not None else group["lr"])
        rule, momentum, beta1 = self._rule, self._momentum, self._beta1
        if rule is None:
            if self.optimizer is not None and _is_adam_like(self.optimizer):
                rule = "adam"
            elif group.get("momentum", 0.0):
                rule = "nesterov" if group.get("nesterov") else "heavy_ball"
            else:
                rule = "gd"
        if momentum is None:
            momentum = float(group.get("momentum", 0.0))
        if beta1 is None:
            beta1 = float(group["betas"][0]) if "betas" in group else 0.9
        return lr, rule, momentum, beta1

    def _preconditioner(self, rule):
        pc = self.preconditioner
        if pc is None:
            pc = ("optimizer" if rule == "adam" and self.optimizer is not None
                  and _is_adam_like(self.optimizer) else "none")
        if isinstance(pc, str):
            return None if pc == "none" else adam_preconditioner(self.optimizer, self.params)
        return list(pc()) if callable(pc) else list(pc)

    # --- readings ------------------------------------------------------------------------------

    def maybe_measure(self, step: int):
        """measure(step) when step % every == 0, else None."""
        return self.measure(step) if step % self.every == 0 else None

    __call__ = maybe_measure

    def measure(self, step: int | None = None) -> dict:
        """One reading now; returns its row (also appended to history / the CSV / the plot)."""
        t0 = time.perf_counter()
        lr, rule, momentum, beta1 = self._settings()
        P = self._preconditioner(rule)
        hess = HessianOperator(self.closure, self.params, method=self.hvp_method,
                               module=self.module, fd_eps=self.fd_eps)
        avg = across_ranks(hess, self.group) if self.across_ranks else hess
        op = preconditioned(avg, P) if P is not None else avg
        init = self.last_eigenvector if self.warm_start else None
        seed = self.seed + len(self.history)
        try:
            if self.method == "lanczos":
                res = lanczos(op, 1, which="LA", max_steps=self.max_steps, tol=self.tol,
                              init=init, seed=seed, min_steps=3 if init is not None else 1)
            else:
                res = power_iteration(op, 1, max_iter=self.max_steps, tol=self.tol, init=init,
                                      seed=seed)
        finally:
            hess.release()
        self.last_eigenvector = res.eigenvectors[0]
        lam = float(res.eigenvalues[0])
        threshold = (float("nan") if rule == "adam" and P is None else
                     stability_threshold(lr, rule=rule, momentum=momentum, beta1=beta1))
        row = {"step": step if step is not None else len(self.history),
               "sharpness": lam, "threshold": threshold,
               "ratio": lam / threshold if threshold == threshold else float("nan"),
               "lr": lr, "rule": rule, "preconditioned": P is not None,
               "hvps": hess.num_matvecs, "iterations": res.iterations[0],
               "converged": bool(res.converged[0]), "residual": float(res.residuals[0]),
               "hvp_method": hess.method, "seconds": time.perf_counter() - t0}
        self.history.append(row)
        if self.csv_path is not None:
            self._write_csv(row)
        if self.plot_path is not None:
            self.plot(self.plot_path)
        return row

    def _write_csv(self, row):
        new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        with open(self.csv_path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.10g}" if isinstance(v, float) and math.isfinite(v) else v)
                        for k, v in row.items()})

    def plot(self, path):
        """Write a PNG of the readings so far (lowbit.hessian.plot.plot_sharpness)."""
        from .plot import plot_sharpness
        return plot_sharpness(self.history, path)
