"""The spike-robust Adam variants users search for, as presets of lowbit's clip policies on the
fused AdamW step, each with 32/8/4-bit states: SPAM, StableSPAM, AdaGC and StableAdamW. Names,
arguments and defaults follow pytorch-optimizer 4.1.0 (research/clipping.md §8); further
lowbit.clip policies can be added with clip=.
"""
from ._base import FusedOptimizer
from .adam import _check_common
from ..clip import policies as cp
from ..reference import optim as ref


def _with(extra, clip):
    return list(extra) + cp.as_policies(clip)


def _adamw_scalars(group, step, beta1_scale):
    """AdamW's step scalars (decoupled decay), beta1 times the schedule factor."""
    beta1, beta2 = group["betas"]
    sc = ref.adam_scalars(float(group["lr"]), beta1 * beta1_scale, beta2, group["eps"],
                          group["weight_decay"], step)
    return sc, {"maximize": bool(group["maximize"])}


class SPAM(FusedOptimizer):
    """SPAM (Huang et al., ICLR 2025): Adam with spike-aware clipping against v (threshold),
    momentum reset every update_proj_gap steps (bias correction not restarted) and a cosine lr
    warmup over warmup_epoch steps after each reset (pytorch-optimizer's phi), decoupled weight
    decay after the update, and eps added to sqrt(v) without bias correction — pytorch-optimizer's
    SPAM. density < 1 (sparse momentum) is not implemented. The spike test's v has a floor of
    eps^2 (lowbit.clip.SpikeClip: a v quantized to 0 must not zero the gradient)."""
    _kind = "adam"
    _decay_after = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), density=1.0, weight_decay=0.0,
                 warmup_epoch=50, threshold=5000, grad_accu_steps=20, update_proj_gap=500,
                 eps=1e-6, maximize=False, *, clip=None, warmup_compat="pto", **kwargs):
        _check_common(lr, eps, betas, weight_decay)
        if density != 1.0:
            raise ValueError("SPAM: density < 1 (sparse momentum masks) is not implemented; "
                             "use density=1.0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        policies = [cp.SpikeClip(threshold, grad_accu_steps, update_proj_gap),
                    cp.MomentumReset(update_proj_gap, warmup_epoch, "keep", warmup_compat)]
        super().__init__(params, defaults, clip=_with(policies, clip), **kwargs)

    def _scalars(self, group, step, beta1_scale=1.0):
        sc, kw = _adamw_scalars(group, step, beta1_scale)
        sc[5] = ref.f32(group["eps"])  # sqrt(v) + eps, the bias correction on the step size only
        return sc, kw


class StableSPAM(FusedOptimizer):
    """Stable-SPAM (Huang et al. 2025): AdaClip (theta) and AdaGN (gamma1, gamma2) on the
    gradient, momentum reset every update_proj_gap steps with a bias-correction restart, and an
    optional cosine schedule of beta1 over t_max steps — pytorch-optimizer's StableSPAM
    (its global step for the scalar EMAs; gamma1=-1 means beta1). Decoupled weight decay first."""
    _kind = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), gamma1=0.7, gamma2=0.9, theta=0.999,
                 t_max=None, eta_min=0.5, weight_decay=0.0, update_proj_gap=1000, eps=1e-8,
                 maximize=False, *, clip=None, **kwargs):
        _check_common(lr, eps, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        gamma1 = betas[0] if gamma1 == -1 else gamma1
        policies = [cp.AdaClip(theta), cp.AdaGN(gamma1, gamma2, eps),
                    cp.MomentumReset(update_proj_gap, 0, "restart")]
        if t_max is not None:
            policies.append(cp.Beta1Cosine(t_max, eta_min))
        super().__init__(params, defaults, clip=_with(policies, clip), **kwargs)

    def _scalars(self, group, step, beta1_scale=1.0):
        return _adamw_scalars(group, step, beta1_scale)


class AdaGC(FusedOptimizer):
    """AdamW with AdaGC's adaptive per-tensor gradient clipping (lowbit.clip.AdaGC) —
    pytorch-optimizer's AdaGC optimizer (decoupled weight decay, default 0.1)."""
    _kind = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), beta=0.98, lambda_abs=1.0,
                 lambda_rel=1.05, warmup_steps=100, weight_decay=0.1, eps=1e-8, maximize=False,
                 *, clip=None, **kwargs):
        _check_common(lr, eps, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        policies = [cp.AdaGC(lambda_abs, lambda_rel, beta, warmup_steps, eps)]
        super().__init__(params, defaults, clip=_with(policies, clip), **kwargs)

    def _scalars(self, group, step, beta1_scale=1.0):
        return _adamw_scalars(group, step, beta1_scale)


class StableAdamW(FusedOptimizer):
    """StableAdamW (Wortsman et al. 2023): AdamW whose step size is divided per tensor by
    max(1, RMS(g / sqrt(v_hat))) (lowbit.clip.UpdateClip), the decoupled weight decay scaled the
    same way — pytorch-optimizer's StableAdamW (its debiased betas are Adam's bias corrections,
    so the trajectory is the same). weight_decouple=False adds the decay to the gradient (Adam's
    L2) instead. kahan_sum (default on, as there) keeps bf16/fp16 parameters with lowbit's Kahan
    compensation; it gives way to stochastic_rounding=True when that is asked for."""
    _kind = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), kahan_sum=True, weight_decay=1e-2,
                 weight_decouple=True, eps=1e-8, maximize=False, *, clip=None,
                 update_clip_decay="clipped", **kwargs):
        _check_common(lr, eps, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        maximize=maximize, weight_decouple=bool(weight_decouple))
        if "kahan" not in kwargs:
            kwargs["kahan"] = bool(kahan_sum) and not kwargs.get("stochastic_rounding")
        policies = [cp.UpdateClip(1.0, update_clip_decay)]
        super().__init__(params, defaults, clip=_with(policies, clip), **kwargs)

    def _scalars(self, group, step, beta1_scale=1.0):
        beta1, beta2 = group["betas"]
        sc = ref.adam_scalars(float(group["lr"]), beta1 * beta1_scale, beta2, group["eps"],
                              group["weight_decay"], step, group["weight_decouple"])
        return sc, {"maximize": bool(group["maximize"])}


def _bits(cls, bits):
    class Variant(cls):
        def __init__(self, params, *args, **kwargs):
            kwargs.setdefault("state_bits", bits)
            super().__init__(params, *args, **kwargs)
    Variant.__name__ = Variant.__qualname__ = f"{cls.__name__}{bits}bit"
    Variant.__doc__ = f"{cls.__name__} with {bits}-bit states."
    return Variant


SPAM8bit, SPAM4bit = _bits(SPAM, 8), _bits(SPAM, 4)
StableSPAM8bit, StableSPAM4bit = _bits(StableSPAM, 8), _bits(StableSPAM, 4)
AdaGC8bit, AdaGC4bit = _bits(AdaGC, 8), _bits(AdaGC, 4)
StableAdamW8bit, StableAdamW4bit = _bits(StableAdamW, 8), _bits(StableAdamW, 4)
