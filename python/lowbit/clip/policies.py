"""Clipping policies that a lowbit optimizer applies inside its fused step (`clip=` argument).

Every policy turns per-tensor statistics of the gradients (lowbit.ops.grad_stats: one
multi-tensor pass, already taken for the non-finite check) into a handful of scalars — all on the
gradients' device, no host synchronisation — which the fused update kernel reads: the clip
transform of lowbit.reference.clip (value clip, per-tensor scale, AdaClip, AdaGN scale) and the
rule-level flags of lowbit.reference.optim (SPAM's spike clip, momentum reset, decay after the
update). Policies run once per optimizer step over the live tensors of every parameter group, in
the canonical order of research/clipping.md §7.2 (their `order`), whatever order the user lists
them in:

     5 Beta1Cosine      Stable-SPAM: cosine schedule of beta1 (and AdaGN's gamma1)
    10 ValueClip        clamp(g, -max_value, max_value)                      element-wise
    20 NormClip         torch clip_grad_norm_ (scope="global") or per tensor  scalar per tensor
    30 AdaGC            per-tensor EMA threshold, global-norm warmup          scalar per tensor
    40 AdaClip          Stable-SPAM: rescale |g| > EMA of max|g|              element-wise
    50 AdaGN            Stable-SPAM: norm stabiliser (norm after AdaClip)     scalar per tensor
    60 SpikeClip        SPAM: clamp g^2 > theta * v_{t-1}                     element-wise, in-kernel
    70 MomentumReset    SPAM / Stable-SPAM: zero m, v every `interval` steps  flag (+ lr warmup)
    90 UpdateClip       StableAdamW: lr / max(1, RMS(g / sqrt(v_t)))          lr per tensor

Norm-based statistics of later policies see the earlier ones exactly where that is algebra
(a scale s multiplies norms and maxima by s; a clamp at c caps the maximum at c) and through one
more statistics pass where it is not (the sum of squares after a value clip or after AdaClip).
UpdateClip's statistic needs the new second moment, so it is a pass of the fused kernel itself
over grads and states that writes nothing (lowbit.ops.optim_step with rms=), run per fused call
just before the update.

Per-tensor policy state (AdaGC's gamma, AdaClip's max EMA, AdaGN's moments) lives in the
optimizer's per-parameter state as fp32 0-dim tensors, so it is saved, loaded and resumed with
the moments; the policy clock (optimizer steps taken) is in `optimizer.state_dict()["clip"]`.
"""
import math

import torch

from .. import ops
from ..reference import clip as clip_ref
from ..reference import optim as optim_ref

TORCH_EPS = 1e-6  # torch's clip_grad_norm_ constant


class ClipContext:
    """What the policies of one optimizer step read and set. `raw` are the statistics of the
    gradients (one row per live tensor, float64, on `device`); `table` the per-tensor clip rows
    (s, thr, r, k) the kernel reads; `state[name]` the per-tensor policy states ([n] float32,
    written back to the optimizer after the policies ran)."""

    def __init__(self, grads, raw_stats, step: int, backend: str, device):
        n = len(grads)
        self.grads, self.raw, self.step = grads, raw_stats, step
        self.backend, self.device = backend, device
        self.flags = 0
        self.value_clip = 0.0
        self.spike_threshold = 0.0
        self.spike_floor = 0.0
        self.scale = torch.ones(n, dtype=torch.float64, device=device)  # s, kept in float64
        self.table = torch.tensor(optim_ref.NO_CLIP, dtype=torch.float32,
                                  device=device).repeat(n, 1)
        self.lr_scale = 1.0        # multiplies the step size (SPAM's post-reset warmup)
        self.beta1_scale = 1.0     # multiplies beta1 (Stable-SPAM's cosine schedule)
        self.restart_bias_correction = False
        self.update_clip = None    # the UpdateClip policy, run inside each fused call
        self.capture = None        # (over, over_count) of the statistics pass, or None
        # FSDP2: reduces the statistics of sharded gradients over their shards (lowbit.optim.
        # _sharding.ShardReducer); `raw` arrives with its sums reduced, its maxima on first read
        self.reducer = None
        self._raw_max_reduced = False
        self.state = {}
        self.telemetry = {}
        self._value_stats = None

    # --- statistics as seen by the current policy -------------------------------------------

    def _after_value_clip(self):
        """Statistics after the value clip (the raw ones without it): one more pass if needed."""
        if not self.flags & clip_ref.VALUE_CLIP:
            return self.raw
        if self._value_stats is None:
            self._value_stats = self.transformed_stats(clip_ref.VALUE_CLIP)
        return self._value_stats

    def norms(self) -> torch.Tensor:
        """[n] float64 L2 norms of the gradients after the value clip and the scales so far."""
        return self._after_value_clip()[:, 0].sqrt() * self.scale

    def absmax(self) -> torch.Tensor:
        """[n] float64 largest |g| after the value clip and the scales so far."""
        stats = self._after_value_clip()
        if stats is self.raw and self.reducer is not None and not self._raw_max_reduced:
            self.raw = stats = self.reducer.maxima(self.raw)
            self._raw_max_reduced = True
        return stats[:, 2] * self.scale

    def norms_after_adaclip(self):
        """[n] float64 norms of the gradients after the scales and AdaClip, from the elements
        the statistics pass captured above AdaClip's lower threshold, or None where that cannot
        be used (no capture, a value clip, a tensor with more elements above it than captured:
        one host read per step decides). Elements at or below the bound are below T, so only the
        captured ones can change: with s the fp32 scale, T and r AdaClip's threshold and ratio,
        x = fp32(|g| s) per captured element and hit = x > T,
            norm^2 = s^2 (Q - sum_hit |g|^2) + sum_hit fp32(x r)^2
        (Q: the raw sum of squares). Exact where s = 1 (Stable-SPAM's preset); otherwise the
        unclipped part is s^2 times the raw sum instead of the sum of the fp32-rounded products
        (a relative difference of ~1e-8). Each row is sorted before it is summed, so the order
        the kernel captured in does not matter."""
        if self.capture is None or self.flags & clip_ref.VALUE_CLIP:
            return None
        over, count = self.capture
        kmax = int(count.max()) if count.numel() else 0
        if kmax > over.shape[1]:
            return None
        over = over[:, :kmax]  # (rows fill from slot 0; usually a few elements each)
        self._sync_table()
        s, thr, r = (self.table[:, k:k + 1] for k in range(3))
        valid = torch.arange(kmax, device=over.device) < count.unsqueeze(1)
        g = torch.where(valid, over, 0.0).sort(dim=1).values  # (zeros add nothing)
        x = g * s
        hit = (x > thr) & (g > 0)
        y = torch.where(hit, x * r, 0.0).double()
        removed = torch.where(hit, g, 0.0).double().square().sum(dim=1)
        s64 = s.squeeze(1).double()
        sumsq = s64 * s64 * (self.raw[:, 0] - removed) + y.square().sum(dim=1)
        return sumsq.clamp_min(0.0).sqrt()

    def transformed_stats(self, flags=None) -> torch.Tensor:
        """Statistics after the transform selected so far (or `flags`): a statistics pass."""
        flags = self.flags & clip_ref.TRANSFORM_FLAGS if flags is None else flags
        self._sync_table()
        xform = self.table[:, :clip_ref.NCLIP].contiguous()  # the transform's columns
        stats = ops.grad_stats_eager(self.grads, self.backend, xform, self.value_clip, flags)
        if self.reducer is not None:
            stats = self.reducer.maxima(self.reducer.sums(stats))
        return stats

    def multiply_scale(self, coef: torch.Tensor):
        """Scale every tensor's gradient by coef ([n] or scalar, float64)."""
        self.scale = self.scale * coef
        self.flags |= clip_ref.TENSOR_SCALE

    def _sync_table(self):
        self.table[:, 0] = self.scale.float()

    def finish(self):
        self._sync_table()
        return self.table


class ClipPolicy:
    """Base of the clipping policies. `order` places the policy in the canonical order;
    `tensor_state` maps the names of its per-tensor states to their initial values; `kinds`
    lists the rules it works with."""
    order = 0
    tensor_state: dict = {}
    kinds = ("adam", "lion", "sgd")

    def apply(self, ctx: ClipContext) -> None:
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Beta1Cosine(ClipPolicy):
    """Stable-SPAM's beta1 schedule: beta1 (and AdaGN's gamma1) times a cosine factor going from
    1 to eta_min over t_max optimizer steps, then eta_min. pytorch-optimizer's chained cosine:
    eta + (1 - eta) (1 + cos(pi (t + 1) / (t_max + 1))) / (1 + cos(pi / (t_max + 1)))."""
    order = 5
    kinds = ("adam",)

    def __init__(self, t_max: int, eta_min: float = 0.5):
        if t_max <= 0:
            raise ValueError(f"Beta1Cosine: t_max must be > 0, got {t_max!r}")
        self.t_max, self.eta_min = int(t_max), float(eta_min)

    def factor(self, t: int) -> float:
        if t >= self.t_max:
            return self.eta_min
        period = self.t_max + 1
        return self.eta_min + (1.0 - self.eta_min) * (
            (1.0 + math.cos(math.pi * (t + 1) / period)) / (1.0 + math.cos(math.pi / period)))

    def apply(self, ctx):
        ctx.beta1_scale = self.factor(ctx.step)


class ValueClip(ClipPolicy):
    """torch.nn.utils.clip_grad_value_: clamp every gradient element to [-max_value, max_value]."""
    order = 10

    def __init__(self, max_value: float):
        if not max_value >= 0:
            raise ValueError(f"ValueClip: max_value must be >= 0, got {max_value!r}")
        self.max_value = float(max_value)

    def apply(self, ctx):
        ctx.flags |= clip_ref.VALUE_CLIP
        ctx.value_clip = self.max_value


class NormClip(ClipPolicy):
    """torch.nn.utils.clip_grad_norm_ inside the step: scale = min(1, max_norm / (norm + 1e-6))
    with the norm over every gradient of the optimizer (scope="global", torch's semantics) or
    over each tensor alone (scope="tensor", component-wise clipping, Yang & Ma 2022).
    norm_type 2 or inf."""
    order = 20

    def __init__(self, max_norm: float, norm_type: float = 2.0, scope: str = "global"):
        if not max_norm > 0:
            raise ValueError(f"NormClip: max_norm must be > 0, got {max_norm!r}")
        if float(norm_type) not in (2.0, math.inf):
            raise ValueError(f"NormClip: norm_type must be 2 or inf, got {norm_type!r}")
        if scope not in ("global", "tensor"):
            raise ValueError(f"NormClip: scope must be 'global' or 'tensor', got {scope!r}")
        self.max_norm, self.norm_type, self.scope = float(max_norm), float(norm_type), scope

    def apply(self, ctx):
        per = ctx.norms() if self.norm_type == 2.0 else ctx.absmax()
        if self.scope == "global":
            total = per.square().sum().sqrt() if self.norm_type == 2.0 else per.max()
            ctx.telemetry["clip_norm"] = total
            coef = torch.clamp(self.max_norm / (total + TORCH_EPS), max=1.0)
        else:
            coef = torch.clamp(self.max_norm / (per + TORCH_EPS), max=1.0)
        ctx.multiply_scale(coef)


class AdaGC(ClipPolicy):
    """AdaGC (Wang et al. 2025): per-tensor adaptive clipping against an EMA of each tensor's
    clipped norm, after a warmup of global-norm clipping. pytorch-optimizer's rule and defaults:
    during steps t < warmup_steps, scale = min(1, lambda_abs / (global norm + eps)) and
    gamma = min(gamma, clipped norm); afterwards h = min(1, lambda_rel * max(gamma, eps) /
    max(norm, eps)) and gamma <- beta * gamma + (1 - beta) * h * norm. (The official Megatron
    patch uses lambda_rel 1.04, beta 0.99, eps 1e-6.)"""
    order = 30
    tensor_state = {"adagc_gamma": math.inf}  # inf: not yet observed

    def __init__(self, lambda_abs: float = 1.0, lambda_rel: float = 1.05, beta: float = 0.98,
                 warmup_steps: int = 100, eps: float = 1e-8):
        if not (lambda_abs > 0 and lambda_rel > 0 and 0 <= beta < 1 and warmup_steps >= 0):
            raise ValueError("AdaGC: needs lambda_abs > 0, lambda_rel > 0, 0 <= beta < 1, "
                             "warmup_steps >= 0")
        self.lambda_abs, self.lambda_rel, self.beta = float(lambda_abs), float(lambda_rel), beta
        self.warmup_steps, self.eps = int(warmup_steps), float(eps)

    def apply(self, ctx):
        norm = ctx.norms()
        gamma = ctx.state["adagc_gamma"].double()
        total = norm.square().sum().sqrt()
        warm_scale = torch.clamp(self.lambda_abs / (total + self.eps), max=1.0)
        warm = torch.isinf(gamma) | (ctx.step < self.warmup_steps)
        h = torch.clamp(self.lambda_rel * gamma.clamp_min(self.eps) / norm.clamp_min(self.eps),
                        max=1.0)
        scale = torch.where(warm, warm_scale, h)
        clipped = scale * norm
        new_gamma = torch.where(warm, torch.minimum(gamma, clipped),
                                gamma + (1.0 - self.beta) * (clipped - gamma))
        ctx.state["adagc_gamma"] = new_gamma.float()
        ctx.multiply_scale(scale)


class AdaClip(ClipPolicy):
    """Stable-SPAM's adaptive spike clip: M <- theta * M + (1 - theta) * max|g|, T = M / (1 -
    theta^t), and elements with |g| > T are rescaled by T / max|g| (proportional, not a clamp).
    t is the optimizer step (pytorch-optimizer's semantics: never reset)."""
    order = 40
    tensor_state = {"adaclip_max": 0.0}

    def __init__(self, theta: float = 0.999):
        if not 0 <= theta < 1:
            raise ValueError(f"AdaClip: theta must be in [0, 1), got {theta!r}")
        self.theta = float(theta)

    def lower_threshold(self, m: torch.Tensor, step: int) -> torch.Tensor:
        """fp32 per tensor: a bound below this step's T in raw gradient units, known before the
        statistics pass from the previous max EMA m: T = (theta m + (1 - theta) max|g|) / (1 -
        theta^t) >= theta m / (1 - theta^t), and the scales before AdaClip are <= 1. Lowered by
        1e-6 relative, well above the float64 and fp32 roundings between the two."""
        return (m.double() * self.theta / (1.0 - self.theta ** step) * (1.0 - 1e-6)).float()

    def apply(self, ctx):
        a = ctx.absmax()
        m = ctx.state["adaclip_max"].double()
        m = m + (1.0 - self.theta) * (a - m)
        ctx.state["adaclip_max"] = m.float()
        thr = m / (1.0 - self.theta ** ctx.step)
        ratio = torch.where(a > 0, thr / a.clamp_min(1e-300), 1.0)
        ctx._sync_table()
        ctx.table[:, 1] = thr.float()
        ctx.table[:, 2] = ratio.float()
        ctx.flags |= clip_ref.ADA_CLIP


class AdaGN(ClipPolicy):
    """Stable-SPAM's adaptive gradient-norm stabiliser: with n = ||g|| after the clips before it,
    mu <- lerp(mu, n, 1 - gamma1'), nu <- lerp(nu, n^2, 1 - gamma2), c = mu_hat / (sqrt(nu_hat) +
    eps), g <- g * c / n (tensors with n = 0 are left alone); gamma1' = gamma1 times the beta1
    schedule factor, bias corrections with the optimizer step t. One more statistics pass when
    an element-wise clip precedes it."""
    order = 50
    tensor_state = {"adagn_mu": 0.0, "adagn_nu": 0.0}

    def __init__(self, gamma1: float = 0.7, gamma2: float = 0.9, eps: float = 1e-8):
        if not (0 <= gamma1 < 1 and 0 <= gamma2 < 1):
            raise ValueError("AdaGN: gamma1 and gamma2 must be in [0, 1)")
        self.gamma1, self.gamma2, self.eps = float(gamma1), float(gamma2), float(eps)

    def apply(self, ctx):
        elementwise = ctx.flags & (clip_ref.VALUE_CLIP | clip_ref.ADA_CLIP)
        n = None
        if elementwise:
            n = ctx.norms_after_adaclip()
            if n is None:
                n = ctx.transformed_stats()[:, 0].sqrt()
        else:
            n = ctx.norms()
        g1 = self.gamma1 * ctx.beta1_scale
        mu, nu = ctx.state["adagn_mu"].double(), ctx.state["adagn_nu"].double()
        active = n > 0
        mu = torch.where(active, mu + (1.0 - g1) * (n - mu), mu)
        nu = torch.where(active, nu + (1.0 - self.gamma2) * (n * n - nu), nu)
        ctx.state["adagn_mu"], ctx.state["adagn_nu"] = mu.float(), nu.float()
        mu_hat = mu / (1.0 - g1 ** ctx.step)
        nu_hat = nu / (1.0 - self.gamma2 ** ctx.step)
        c = mu_hat / (nu_hat.sqrt() + self.eps)
        k = torch.where(active, c / n.clamp_min(1e-300), 1.0)
        ctx.table[:, 3] = k.float()
        ctx.flags |= clip_ref.NORM_SCALE
        ctx.telemetry["adagn_norm"] = n


class SpikeClip(ClipPolicy):
    """SPAM's spike-aware clip (Huang et al. 2025), inside the kernel against the loaded v:
    where g^2 > threshold * max(v, floor), g = sign(g) * sqrt(threshold * max(v, floor)). Active
    from step grace on and, with a reset interval, from `grace` steps after each reset (t %
    reset_interval >= grace). floor = eps_floor^2 (default: the optimizer's eps): SPAM compares
    against v itself, which clamps every gradient to 0 where v is 0 — a fresh state, or a low-bit
    v quantized to zero — and then v stays 0 (research/clipping.md §1.3); the floor bounds the
    clamp away from 0 instead. Adam-family only."""
    order = 60
    kinds = ("adam",)

    def __init__(self, threshold: float = 5000.0, grace: int = 20, reset_interval: int = 500,
                 eps_floor: float | None = None):
        if not threshold >= 0 or grace < 0 or reset_interval < 0:
            raise ValueError("SpikeClip: needs threshold >= 0, grace >= 0, reset_interval >= 0")
        self.threshold, self.grace = float(threshold), int(grace)
        self.reset_interval, self.eps_floor = int(reset_interval), eps_floor

    def active(self, t: int) -> bool:
        return (self.threshold != 0 and t >= self.grace and
                (self.reset_interval == 0 or t % self.reset_interval >= self.grace))

    def apply(self, ctx):
        if self.active(ctx.step):
            ctx.flags |= optim_ref.SPIKE_CLIP
            ctx.spike_threshold = self.threshold
            ctx.spike_floor = None if self.eps_floor is None else self.eps_floor ** 2


class MomentumReset(ClipPolicy):
    """Momentum reset every `interval` optimizer steps (t % interval == 0): the step starts from
    zero moments. bias_correction="keep" (SPAM: the parameter's step count runs on, and the step
    size is warmed up again over `warmup_steps` steps by the cosine factor phi) or "restart"
    (Stable-SPAM: the step count restarts at 1, no warmup). warmup_compat: "pto" is
    pytorch-optimizer's phi (its chained cosine, shifted by one step: the first post-reset phi is
    1 - 0.99 (1 + cos(pi / (N + 1))) / 2), "reference" the SPAM code's (phi = 0.01 at the reset)."""
    order = 70

    def __init__(self, interval: int, warmup_steps: int = 0, bias_correction: str = "keep",
                 warmup_compat: str = "pto"):
        if interval < 0 or warmup_steps < 0:
            raise ValueError("MomentumReset: interval and warmup_steps must be >= 0")
        if bias_correction not in ("keep", "restart"):
            raise ValueError("MomentumReset: bias_correction must be 'keep' or 'restart'")
        if warmup_compat not in ("pto", "reference"):
            raise ValueError("MomentumReset: warmup_compat must be 'pto' or 'reference'")
        self.interval, self.warmup_steps = int(interval), int(warmup_steps)
        self.bias_correction, self.warmup_compat = bias_correction, warmup_compat

    def warmup_factor(self, t: int) -> float:
        """phi at optimizer step t: 1 before the first reset and from warmup_steps steps after
        the last one."""
        n = self.warmup_steps
        if self.interval == 0 or n == 0 or t < self.interval:
            return 1.0
        c = t % self.interval  # steps since the last reset
        if c >= n:
            return 1.0
        shift = 1 if self.warmup_compat == "pto" else 0
        return 1.0 - 0.99 * (1.0 + math.cos(math.pi * (c + shift) / (n + 1))) / 2.0

    def apply(self, ctx):
        t = ctx.step
        if self.interval and t % self.interval == 0:
            ctx.flags |= optim_ref.RESET
            ctx.restart_bias_correction = self.bias_correction == "restart"
        ctx.lr_scale *= self.warmup_factor(t)


class UpdateClip(ClipPolicy):
    """StableAdamW's update clipping (Wortsman et al. 2023): per tensor, RMS = sqrt(mean(g^2 /
    max(v_hat, eps^2))) with the gradient and the new bias-corrected second moment of this step,
    and the step size lr / max(1, RMS / threshold). decay="clipped" scales the decoupled weight
    decay by the same factor (pytorch-optimizer's StableAdamW); decay="lr" keeps the group's
    (Wortsman's reference code). The statistic needs the new v: the fused kernel computes it in a
    pass over grads and states that writes nothing, then the update reads each tensor's step size
    and decay from its clip row. Adam-family only; per-tensor RMS in last_clip_info["update_rms"].
    """
    order = 90
    kinds = ("adam",)

    def __init__(self, threshold: float = 1.0, decay: str = "clipped"):
        if not threshold > 0:
            raise ValueError(f"UpdateClip: threshold must be > 0, got {threshold!r}")
        if decay not in ("clipped", "lr"):
            raise ValueError(f"UpdateClip: decay must be 'clipped' or 'lr', got {decay!r}")
        self.threshold, self.decay = float(threshold), decay

    def apply(self, ctx):
        ctx.update_clip = self
        ctx.telemetry["update_rms"] = torch.zeros(len(ctx.grads), dtype=torch.float64,
                                                  device=ctx.device)

    def factors(self, sums, numel, beta2: float, step: int):
        """(RMS, step-size factor 1 / max(1, RMS / threshold)) per tensor from the kernel's sums
        of g^2 / max(v, eps_t^2): v_hat = v / (1 - beta2^step) and eps_t = eps sqrt(1 - beta2^step)
        turn them into the mean of g^2 / max(v_hat, eps^2)."""
        rms = (sums * (1.0 - beta2 ** step) / numel).sqrt()
        return rms, 1.0 / torch.clamp(rms / self.threshold, min=1.0)


def as_policies(clip) -> list:
    """`clip=` as given (None, one policy, or a list) -> the policies in canonical order."""
    if clip is None:
        return []
    policies = [clip] if isinstance(clip, ClipPolicy) else list(clip)
    for p in policies:
        if not isinstance(p, ClipPolicy):
            raise TypeError(f"clip= takes lowbit.clip policies (ValueClip, NormClip, AdaGC, "
                            f"AdaClip, AdaGN, SpikeClip, MomentumReset, UpdateClip), got {p!r}")
    kinds = [type(p) for p in policies]
    if len(set(kinds)) != len(kinds):
        raise ValueError("clip= lists the same policy twice")
    return sorted(policies, key=lambda p: p.order)
