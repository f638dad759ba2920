"""AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, AAAI 2021; research/hessian.md §3)
with fused 32/8/4-bit states: Adam whose second moment follows the Hessian diagonal instead of
g ⊙ g — the kernel's Adam rule with HESS_V (lowbit.reference.optim):

    D = |z ⊙ Hz|, spatially averaged           Hutchinson, Rademacher probes (official code)
    v = β2·v + (1 − β2)·D ⊙ D                  on Hessian refresh steps only (frozen otherwise)
    m = β1·m + (1 − β1)·g
    x = x·(1 − lr·wd) − lr/(1 − β1^t) · m / ((v / B)^{k/2} + eps)

with k = hessian_power and B = 1 − β2^n. Defaults of the official code
(amirgholami/adahessian image_classification/optim_adahessian.py): lr 0.15, betas (0.9, 0.999),
eps 1e-4, weight_decay 0 (decoupled: the official update subtracts lr·wd·x), hessian_power 1,
a new estimate every step (update_period=1), |·| of the estimate, spatial averaging of conv
kernels over their k×k window.

hessian_power: the kernel has two forms, so only k = 1 (d = sqrt(v) + eps') and k = 1/2
(d = sqrt(sqrt(v)) + eps', QUARTER) are supported. Both bias corrections are folded into the
scalars as lowbit's Adam does: with r = B^{k/2},
    (v/B)^{k/2} + eps = (v^{k/2} + eps·r) / r   ⇒   eps' = eps·r,  step size = lr·r / (1 − β1^t),
so one division per element (equal to the official form up to fp32 rounding).

Bias correction of v (update_period > 1). v's EMA advances only on refresh steps, so its
zero-initialisation bias after n refreshes is 1 − β2^n: hessian_bias_correction="refreshes"
(default) uses n (counted per parameter in the state "hessian_step"), making v/B an average of
the estimates seen. The official code refreshes every step, where n = t and both choices agree.
pytorch-optimizer's AdaHessian (and davda54/ada-hessian) divide by 1 − β2^t with t the step
count; "steps" reproduces that — it under-corrects by about n/t early on (denominators ~√k too
small for k = update_period and power 1: steps √k too large).

Spatial averaging (spatial_average_block_size, one entry per tensor rank 1-4; official
instruction/adahessian.py semantics): -1 averages over the "spatial" block of the rank (1-D: none;
2-D: the whole row; 3-D: the last dimension; 4-D: the last two, a conv kernel's k×k window); 1
means none; b > 1 averages contiguous blocks of b elements (the tensor's size must be a multiple
of b). Default (1, 1, 1, -1): the image_classification code (conv kernels only); (-1, -1, -1, -1)
is the instruction code's. Tensors of rank 0 or > 4 are never averaged. abs_estimate=True takes
|z ⊙ Hz| before averaging (the official |Hz|: equal for Rademacher probes); False keeps the
signed estimate (pytorch-optimizer, davda54) — after squaring only the averaging sees the sign.
Both apply to estimates passed with step(hessian=...) too.

Protocol (step(closure), step(hessian=...), step()) and probes: lowbit.optim._curvature. The
first step always refreshes (t = 1); a parameter that has never had an estimate cannot step on a
non-refresh step (its v is 0) and raises.
"""
import torch

from ..reference import optim as ref
from ._curvature import CurvatureOptimizer
from .adam import _check_common
from .spike import _bits

BIAS_CORRECTIONS = ("refreshes", "steps")


def _check_block_sizes(sizes):
    try:
        sizes = tuple(int(b) for b in sizes)
    except TypeError:
        raise TypeError("AdaHessian: spatial_average_block_size must be a tuple of 4 ints (one "
                        f"per tensor rank 1-4), got {sizes!r}") from None
    if len(sizes) != 4 or any(b != -1 and b < 1 for b in sizes):
        raise ValueError("AdaHessian: spatial_average_block_size must hold 4 ints, each -1 (the "
                         "rank's spatial block), 1 (none) or a block size > 1, got "
                         f"{sizes!r}")
    return sizes


def spatial_average(h: torch.Tensor, sizes) -> torch.Tensor:
    """h averaged over the blocks spatial_average_block_size gives its rank (module docstring)."""
    d = h.dim()
    if d == 0 or d > 4:
        return h
    b = sizes[d - 1]
    if b == 1 or (b == -1 and d == 1):
        return h
    if b == -1:
        dims = {2: (1,), 3: (2,), 4: (2, 3)}[d]
        return h.mean(dim=dims, keepdim=True).expand(h.shape).contiguous()
    return h.reshape(-1, b).mean(1).repeat_interleave(b).reshape(h.shape)


class AdaHessian(CurvatureOptimizer):
    """AdaHessian with fused 32/8/4-bit states (module docstring). Keyword arguments beyond the
    rule's: update_period, num_samples, hessian_distribution ('rademacher' default),
    spatial_average_block_size, abs_estimate, hessian_bias_correction, and lowbit.optim._base's
    (state_bits, block_size, min_quant_numel, stochastic_rounding, kahan, seed, backend,
    nonfinite). States "exp_avg", "exp_avg_sq" (the official exp_hessian_diag_sq) and
    "hessian_step" (refreshes seen)."""
    _kind = "adam"

    def __init__(self, params, lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0,
                 hessian_power=1, *, update_period=1, num_samples=1,
                 hessian_distribution="rademacher", spatial_average_block_size=(1, 1, 1, -1),
                 abs_estimate=True, hessian_bias_correction="refreshes", maximize=False,
                 **kwargs):
        _check_common(lr, eps, betas, weight_decay)
        if hessian_power not in (1, 0.5):
            raise ValueError(f"AdaHessian: hessian_power must be 1 or 0.5, got "
                             f"{hessian_power!r}: the fused kernel computes the denominator as "
                             "sqrt(v) (power 1) or sqrt(sqrt(v)) (power 1/2) only")
        if hessian_bias_correction not in BIAS_CORRECTIONS:
            raise ValueError("AdaHessian: hessian_bias_correction must be 'refreshes' or "
                             f"'steps', got {hessian_bias_correction!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        hessian_power=float(hessian_power), maximize=maximize,
                        spatial_average_block_size=_check_block_sizes(
                            spatial_average_block_size),
                        abs_estimate=bool(abs_estimate),
                        hessian_bias_correction=hessian_bias_correction)
        super().__init__(params, defaults, update_period=update_period,
                         num_samples=num_samples, hessian_distribution=hessian_distribution,
                         **kwargs)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["hessian_power"] not in (1.0, 0.5):
            raise ValueError(f"AdaHessian: hessian_power must be 1 or 0.5, got "
                             f"{group['hessian_power']!r}")
        sizes = group["spatial_average_block_size"] = _check_block_sizes(
            group["spatial_average_block_size"])
        for i, p in enumerate(group["params"]):
            b = sizes[p.dim() - 1] if 1 <= p.dim() <= 4 else 1
            if b > 1 and p.numel() % b:
                raise ValueError(f"AdaHessian: parameter {i} of the group (shape "
                                 f"{tuple(p.shape)}) has {p.numel()} elements, not a multiple "
                                 f"of its spatial averaging block {b}")

    # --- state ------------------------------------------------------------------------------

    def _fresh_state(self, p, group):
        state = super()._fresh_state(p, group)
        state["hessian_step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    def _adopt_state(self, p, state, group, saved_group, where):
        state = super()._adopt_state(p, state, group, saved_group, where)
        if state and "hessian_step" not in state:
            # e.g. an Adam / exported state dict: as if every step had refreshed
            state["hessian_step"] = state["step"].clone()
        elif state:
            state["hessian_step"] = torch.as_tensor(state["hessian_step"],
                                                    dtype=torch.float32).cpu()
        return state

    # --- the rule ---------------------------------------------------------------------------

    def _transform(self, p, group, h):
        if group["abs_estimate"]:
            h = h.abs()
        return spatial_average(h, group["spatial_average_block_size"]).contiguous()

    def _pre_step_check(self, live, est):
        for i, p in enumerate(self._all_params()):
            if p.grad is None or (est and p in est):
                continue
            st = self.state.get(p)
            if not st or float(st.get("hessian_step", 0.0)) == 0.0:
                raise RuntimeError(
                    f"AdaHessian: parameter {i} has a gradient but no Hessian estimate yet (it "
                    "had none on the refresh steps so far), so its second moment is 0; give it "
                    "a gradient on a refresh step (or step(hessian=...)), or use "
                    "update_period=1")

    def _bucket_extra(self, p, group):
        refresh = self._pending is not None and p in self._pending
        st = self.state[p]
        n = int(float(st["hessian_step"])) + (1 if refresh else 0)
        return refresh, n

    def _hessian_args(self, group, params):
        flags = ref.HESS_V | (ref.QUARTER if group["hessian_power"] == 0.5 else 0)
        if self._pending is not None and params[0] in self._pending:
            return [self._pending[p] for p in params], flags | ref.HESS_EMA
        return [], flags

    def _after_fused(self, group, params):
        if self._pending is not None and params[0] in self._pending:
            torch._foreach_add_([self.state[p]["hessian_step"] for p in params], 1.0)

    def _scalars(self, group, step, extra=None):
        beta1, beta2 = group["betas"]
        n = extra[1] if extra is not None else step
        if group["hessian_bias_correction"] == "steps":
            n = step
        power = group["hessian_power"]
        r = (1.0 - beta2 ** n) ** (power / 2.0)
        lr = float(group["lr"])
        sc = ref.with_clip_scalars([ref.f32(1.0 - lr * group["weight_decay"]), 0.0,
                                    ref.f32(1.0 - beta1), ref.f32(beta2), ref.f32(1.0 - beta2),
                                    ref.f32(group["eps"] * r),
                                    ref.f32(lr * r / (1.0 - beta1 ** step)), 0.0])
        return sc, {"maximize": bool(group["maximize"])}

    def step(self, closure=None, hessian=None):
        """One step (lowbit.optim._curvature for the protocol); returns the closure's loss."""
        return self._curvature_step(closure, hessian)


AdaHessian8bit, AdaHessian4bit = _bits(AdaHessian, 8), _bits(AdaHessian, 4)
