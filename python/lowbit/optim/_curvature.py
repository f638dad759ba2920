"""What the curvature optimizers (SophiaH, SophiaG, AdaHessian) add to FusedOptimizer: where the
Hessian-diagonal estimate comes from, when it is refreshed, and how it reaches the fused step
(the kernel's HESS_EMA flag with one fp32 estimate per tensor; lowbit.reference.optim).

Step protocol of the Hutchinson optimizers (SophiaH, AdaHessian); t counts step() calls (1, 2,
...), and step t is a refresh step when (t - 1) % update_period == 0 (t = 1, k + 1, 2k + 1, ...:
the paper's "t mod k = 1", pytorch-optimizer 4.x's choice) or when an estimate is passed:

  opt.step(closure)           closure() returns the loss WITHOUT calling backward() (it may call
                              zero_grad; it must not backprop). On refresh steps the optimizer
                              computes g = autograd.grad(loss, params, create_graph=True), the
                              Hutchinson estimate ĥ = mean_s z_s ⊙ H z_s from num_samples Philox
                              probes by double backward (lowbit.hessian.hvp.second_backward),
                              writes the detached g to .grad and frees the graph; on other steps
                              one ordinary autograd.grad. Parameters the loss does not use get
                              .grad = None (not updated). Returns the loss, detached.
  opt.step(hessian=[...])     an external estimate: one tensor per parameter of param_groups, in
                              order (None for parameters without a gradient), shaped like it;
                              gradients from .grad (or from closure(), as above). The step
                              refreshes with it whatever t is.
  opt.step()                  on steps that do not refresh: gradients from .grad. On a refresh
                              step it needs a closure or hessian=, or gradients built with
                              loss.backward(create_graph=True) (pytorch-optimizer's protocol,
                              supported for compatibility: the HVP reads .grad's graph, then
                              .grad is detached so the parameter<->grad reference cycle goes).

Probes: probe number (t - 1) · num_samples + s of lowbit.hessian.probes' stream, over all the
trainable parameters of param_groups in order, keyed by a hash of param_groups[0]["seed"]
(separate from the stochastic-rounding keys): a resumed run (state_dict / load_state_dict, which
restore the seed and the step count) draws the same probes.

A non-finite estimate skips the whole step with nonfinite="skip" (every group's skipped_steps
grows; the step count does not advance, so the next step refreshes again) and raises
FloatingPointError with nonfinite="raise".
"""
import torch

from .. import ops
from ..hessian.probes import probe as _probe
from ..hessian._vectors import check_loss, require_graph
from ..hessian.hvp import second_backward
from ..reference import optim as ref
from ._base import FusedOptimizer

DISTRIBUTIONS = ("gaussian", "rademacher")


def probe_seed(seed: int) -> int:
    """The Philox key of the optimizer's Hutchinson probes: a hash of its seed, so that probes
    and stochastic rounding (reference.optim.sr_key) never share a stream."""
    return ref._mix64((seed + 0x243F6A8885A308D3) & 0xFFFFFFFFFFFFFFFF) >> 1


class CurvatureOptimizer(FusedOptimizer):
    """Base of SophiaH, SophiaG and AdaHessian (module docstring)."""

    _hutchinson = True  # SophiaG: estimates only from update_hessian / hessian=
    # Hessian-vector products of DTensor (FSDP2) parameters are not done yet (research/hessian.md
    # §1.4): the constructor raises NotImplementedError on them
    _shardable = False

    def __init__(self, params, defaults, *, update_period=1, num_samples=1,
                 hessian_distribution="rademacher", **kwargs):
        name = type(self).__name__
        if kwargs.get("clip") is not None:
            raise ValueError(f"{name}: clip= policies are not supported by the curvature "
                             "optimizers yet; clip the gradients before step()")
        if not isinstance(update_period, int) or isinstance(update_period, bool) \
                or update_period < 1:
            raise ValueError(f"{name}: update_period must be an int >= 1, got {update_period!r}")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"{name}: num_samples must be an int >= 1, got {num_samples!r}")
        if hessian_distribution not in DISTRIBUTIONS:
            raise ValueError(f"{name}: hessian_distribution must be 'gaussian' or 'rademacher', "
                             f"got {hessian_distribution!r}")
        self.update_period = update_period
        self.num_samples = num_samples
        self.hessian_distribution = hessian_distribution
        self._curv_step = 0     # completed step() calls: t of the next step is this + 1
        self._pending = None    # {param: fp32 estimate} of the step being taken
        # After each step: {"step": t, "refreshed": bool, "source": "closure" | "graph" |
        # "hessian" | "update_hessian" | None, "num_hvps": int, "nonfinite": bool}
        self.last_hessian_info = {}
        super().__init__(params, defaults, **kwargs)

    # --- bookkeeping ------------------------------------------------------------------------

    def state_dict(self):
        """FusedOptimizer's state dict plus "curvature": {"step": step() calls so far}."""
        sd = super().state_dict()
        sd["curvature"] = {"step": self._curv_step}
        return sd

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        saved = state_dict.get("curvature", {}).get("step")
        if saved is None:  # a state dict without it: the furthest parameter step count
            steps = [float(st["step"]) for st in self.state.values() if "step" in st]
            saved = int(max(steps)) if steps else 0
        self._curv_step = int(saved)

    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _trainable(self):
        return [p for p in self._all_params() if p.requires_grad]

    def _group_of(self):
        return {p: g for g in self.param_groups for p in g["params"]}

    def _refresh_due(self, t: int) -> bool:
        return self._hutchinson and (t - 1) % self.update_period == 0

    # --- estimates --------------------------------------------------------------------------

    def _check_estimates(self, hessian, where="hessian") -> dict:
        """{param: fp32 contiguous estimate} from one tensor (or None) per parameter."""
        if isinstance(hessian, torch.Tensor):
            hessian = [hessian]
        try:
            hessian = list(hessian)
        except TypeError:
            raise TypeError(f"{type(self).__name__}: {where} must be a list of tensors (one per "
                            f"parameter), got {type(hessian).__name__}") from None
        params = self._all_params()
        if len(hessian) != len(params):
            raise ValueError(f"{type(self).__name__}: {where} has {len(hessian)} tensors but the "
                             f"optimizer has {len(params)} parameters; pass one per parameter of "
                             "param_groups, in order (None for parameters without a gradient)")
        out = {}
        for i, (h, p) in enumerate(zip(hessian, params)):
            if h is None:
                continue
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"{type(self).__name__}: {where}[{i}] is a "
                                f"{type(h).__name__}, not a tensor")
            if tuple(h.shape) != tuple(p.shape):
                raise ValueError(f"{type(self).__name__}: {where}[{i}] has shape "
                                 f"{tuple(h.shape)} but parameter {i} has shape {tuple(p.shape)}")
            if not (h.is_floating_point()):
                raise TypeError(f"{type(self).__name__}: {where}[{i}] has dtype {h.dtype}; "
                                "estimates must be floating point")
            out[p] = h.detach().to(device=p.device, dtype=torch.float32).contiguous()
        return out

    def _snapshot(self, params):
        return [(p.grad, None if p.grad is None else p.grad._version) for p in params]

    def _call_closure(self, closure, params):
        """The closure's loss (with its graph), or a clear error."""
        before = self._snapshot(params)
        with torch.enable_grad():
            loss = closure()
        name = type(self).__name__
        loss = check_loss(loss, f"{name}.step's closure")
        require_graph(loss, f"the loss returned by {name}.step's closure")
        for p, (g, version) in zip(params, before):
            if p.grad is not None and (p.grad is not g or p.grad._version != version):
                raise RuntimeError(
                    f"{name}.step(closure): the closure changed .grad (it called backward()); "
                    "return the loss without calling backward(): the optimizer differentiates "
                    "it itself (with create_graph=True on Hessian refresh steps, then frees "
                    "the graph)")
        return loss

    @staticmethod
    def _set_grads(params, grads):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.detach()

    def _probe(self, params, t, s):
        return _probe(params, (t - 1) * self.num_samples + s,
                      seed=probe_seed(self.param_groups[0]["seed"]),
                      distribution=self.hessian_distribution)

    def _hutchinson_from(self, grads, params, t) -> dict:
        """mean over the step's probes of z ⊙ Hz (fp32) for the parameters with a gradient;
        frees the gradients' graph (the last product does not retain it)."""
        est = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        for s in range(self.num_samples):
            z = self._probe(params, t, s)
            hz = second_backward(grads, params, z, retain_graph=s < self.num_samples - 1)
            for e, zi, hi in zip(est, z, hz):
                e.add_(zi.float() * hi.float())
        if self.num_samples > 1:
            for e in est:
                e.div_(self.num_samples)
        return {p: e for p, e, g in zip(params, est, grads) if g is not None}

    def _gather(self, closure, hessian, t):
        """(loss, estimates or None, source) of step t; writes the gradients to .grad."""
        params = self._trainable()
        loss, source, est = None, None, None
        if hessian is not None:
            est, source = self._check_estimates(hessian), "hessian"
        due = est is None and self._refresh_due(t)
        if closure is not None:
            loss = self._call_closure(closure, params)
            with torch.enable_grad():
                grads = torch.autograd.grad(loss, params, create_graph=due, allow_unused=True)
                if due:
                    est, source = self._hutchinson_from(grads, params, t), "closure"
            self._set_grads(params, grads)
            del grads
            loss = loss.detach()
        elif due:
            graph = [p for p in params if p.grad is not None and p.grad.requires_grad]
            if not graph:
                raise RuntimeError(
                    f"{type(self).__name__}: step {t} refreshes the Hessian estimate "
                    f"(update_period={self.update_period}: steps 1, {1 + self.update_period}, "
                    f"{1 + 2 * self.update_period}, ...) and needs step(closure) with a closure "
                    "returning the loss (the optimizer computes the HVPs), or "
                    "step(hessian=[...]) with an estimate")
            with torch.enable_grad():
                # gradients without a graph (the loss is linear in them) get a zero estimate
                grads = [p.grad for p in params]
                est, source = self._hutchinson_from(grads, params, t), "graph"
            del grads
        for p in params:  # never keep a graph in .grad (pytorch-optimizer's leak)
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()
        return loss, est, source

    def _transform(self, p, group, h: torch.Tensor) -> torch.Tensor:
        """The rule's treatment of an estimate before the kernel's EMA (AdaHessian: |·| and
        spatial averaging); identity by default."""
        return h

    # --- the step ---------------------------------------------------------------------------

    def _pre_step_check(self, live, est):
        """Rule-specific checks before anything changes (AdaHessian: every parameter without an
        estimate this step has had one before)."""

    @torch.compiler.disable
    def _curvature_step(self, closure, hessian, extra_source=None, pending=None):
        t = self._curv_step + 1
        loss, est, source = self._gather(closure, hessian, t)
        if pending:
            if est is not None:
                raise RuntimeError(f"{type(self).__name__}: an estimate is pending from "
                                   "update_hessian(); do not also pass hessian= to step()")
            est, source = pending, extra_source
        live = [p for p in self._all_params() if p.grad is not None]
        if est is not None:
            groups = self._group_of()
            missing = [i for i, p in enumerate(self._all_params())
                       if p.grad is not None and p not in est]
            if missing and source == "hessian":
                raise ValueError(f"{type(self).__name__}: hessian= has no estimate (None) for "
                                 f"parameters {missing}, which have gradients")
            est = {p: self._transform(p, groups[p], h) for p, h in est.items()
                   if p.grad is not None}
        self._pre_step_check(live, est)
        info = {"step": t, "refreshed": bool(est), "source": source if est else None,
                "num_hvps": self.num_samples if source in ("closure", "graph") else 0,
                "nonfinite": False}
        if est:
            # (one multi-tensor statistics pass counts the non-finite elements of them all)
            hs = list(est.values())
            stats = ops.grad_stats_eager(hs, ops.resolve_backend(self.backend, hs[0].device))
            if bool((stats[:, 1] > 0).any()):
                info["nonfinite"] = True
                self.last_hessian_info = info
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        f"{type(self).__name__}: the Hessian-diagonal estimate of step {t} "
                        "contains inf or NaN (nonfinite='raise'); pass nonfinite='skip' to skip "
                        "such steps instead")
                for g in self.param_groups:
                    g["skipped_steps"] += 1
                self.last_step_info = [{"skipped": True, "nonfinite_tensors": 0,
                                        "grad_norm": float("nan"), "nonfinite_hessian": True}
                                       for _ in self.param_groups]
                return loss
        self._pending = est or None
        try:
            FusedOptimizer.step(self)
        finally:
            self._pending = None
        if not all(i["skipped"] for i in self.last_step_info) or not live:
            self._curv_step = t
        self.last_hessian_info = info
        return loss

    # --- the fused call's Hessian arguments -------------------------------------------------

    def _hess_flags(self, group) -> int:
        """The rule's Hessian flags besides HESS_EMA (every step)."""
        return 0

    def _bucket_extra(self, p, group):
        return self._pending is not None and p in self._pending

    def _hessian_args(self, group, params):
        flags = self._hess_flags(group)
        if self._pending is not None and params[0] in self._pending:
            return [self._pending[p] for p in params], flags | ref.HESS_EMA
        return [], flags
