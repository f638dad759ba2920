"""Unfused references of lowbit's clipping policies, written from the papers (research/clipping.md
§1 SPAM, §2 Stable-SPAM, §3 AdaGC, §4 component-wise clipping, §5.1 torch's clip_grad_norm_,
§5.3 StableAdamW) the way a user writes them today: the policy applied to the gradients with
ordinary torch ops, then an AdamW step (m.lerp_, v.mul_().addcmul_(), sqrt(v) / bc2 + eps,
p.addcdiv_).

This is not the kernel spec (lowbit.reference.optim is, bit for bit): it is what lowbit's fused
step must agree with up to rounding. Where the papers leave a choice, these follow the one lowbit
documents (lowbit.clip.policies, lowbit.optim.spike): pytorch-optimizer 4.1.0's defaults, its
SPAM lr warmup factor and Stable-SPAM's global step in the scalar EMAs, SPAM's v floor eps^2 in
the spike test and decay after the update with eps not bias-corrected.

Low-bit states: with state_bits 8 or 4 every moment goes through lowbit's block quantization
(lowbit.reference.optim.quantize_state: 8-bit dynamic / udynamic in blocks of 256, 4-bit
dynamic4 / linear4_nozero in blocks of 128) and back after each step, so the next step reads the
values a low-bit optimizer stores; the step itself uses the unrounded new moments (as
bitsandbytes and lowbit do). The last codes are kept in `codes` for comparisons.

Every optimizer here takes a list of tensors (updated in place) and `step(grads)` takes the
gradients of one step (not modified). After a step, `info` holds per-tensor telemetry comparable
to lowbit's `last_clip_info`: "scale" (product of the scalar clip factors, float64), "clipped"
(elements an element-wise clip changed, int64) and policy extras.
"""
import math

import torch

from .optim import dequantize_state, quantize_state

TORCH_NORM_EPS = 1e-6  # the constant of torch.nn.utils.clip_grad_norm_


# --- gradient policies: (list of gradients, info) -> new list of gradients ------------------------

def _count(info, i, mask):
    info["clipped"][i] += int(mask.sum())


def _scale(info, i, coef):
    info["scale"][i] *= float(coef)


def _tensor_norm(g, norm_type):
    return g.abs().max() if norm_type == math.inf else torch.linalg.vector_norm(g, 2)


class ValueClip:
    """torch.nn.utils.clip_grad_value_: clamp every element to [-max_value, max_value]."""

    def __init__(self, max_value):
        self.max_value = max_value

    def __call__(self, grads, info):
        out = []
        for i, g in enumerate(grads):
            _count(info, i, g.abs() > self.max_value)
            out.append(g.clamp(-self.max_value, self.max_value))
        return out


class GlobalNormClip:
    """torch.nn.utils.clip_grad_norm_ (§5.1): total = the norm of the per-tensor norms,
    coef = min(1, max_norm / (total + 1e-6)), always multiplied. norm_type 2 or inf."""

    def __init__(self, max_norm, norm_type=2.0):
        self.max_norm, self.norm_type = max_norm, float(norm_type)

    def __call__(self, grads, info):
        norms = torch.stack([_tensor_norm(g, self.norm_type) for g in grads])
        total = norms.max() if self.norm_type == math.inf else torch.linalg.vector_norm(norms)
        coef = torch.clamp(self.max_norm / (total + TORCH_NORM_EPS), max=1.0)
        info["clip_norm"] = total
        for i in range(len(grads)):
            _scale(info, i, coef)
        return [g * coef for g in grads]


class TensorNormClip:
    """Component-wise clipping (Yang & Ma 2022, §4): clip_grad_norm_ on each tensor alone."""

    def __init__(self, max_norm, norm_type=2.0):
        self.max_norm, self.norm_type = max_norm, float(norm_type)

    def __call__(self, grads, info):
        out = []
        for i, g in enumerate(grads):
            coef = torch.clamp(self.max_norm / (_tensor_norm(g, self.norm_type) + TORCH_NORM_EPS),
                               max=1.0)
            _scale(info, i, coef)
            out.append(g * coef)
        return out


class AdaGCClip:
    """AdaGC (Wang et al. 2025, §3) with pytorch-optimizer's constants. Steps t < warmup_steps:
    global-norm clipping at lambda_abs and gamma_i = running minimum of the clipped norms. Then
    per tensor: h = min(1, lambda_rel * max(gamma_i, eps) / max(||g_i||, eps)), g_i *= h and
    gamma_i <- beta * gamma_i + (1 - beta) * ||h g_i|| (EMA of the clipped norm)."""

    def __init__(self, lambda_abs=1.0, lambda_rel=1.05, beta=0.98, warmup_steps=100, eps=1e-8):
        self.lambda_abs, self.lambda_rel, self.beta = lambda_abs, lambda_rel, beta
        self.warmup_steps, self.eps = warmup_steps, eps
        self.t, self.gamma = 0, None

    def __call__(self, grads, info):
        self.t += 1
        norms = [torch.linalg.vector_norm(g) for g in grads]
        if self.gamma is None:
            self.gamma = [math.inf] * len(grads)
        total = torch.linalg.vector_norm(torch.stack(norms))
        out = []
        for i, (g, n) in enumerate(zip(grads, norms)):
            n = float(n)
            if self.t < self.warmup_steps or self.gamma[i] == math.inf:  # warmup (or no gamma yet)
                h = min(1.0, self.lambda_abs / (float(total) + self.eps))
                self.gamma[i] = min(self.gamma[i], h * n)
            else:
                h = min(1.0, self.lambda_rel * max(self.gamma[i], self.eps) / max(n, self.eps))
                self.gamma[i] = self.beta * self.gamma[i] + (1.0 - self.beta) * h * n
            _scale(info, i, h)
            out.append(g * h)
        return out


# --- optimizers --------------------------------------------------------------------------------

class _Moments:
    """m and v of every parameter, fp32, optionally rounded through the low-bit state format."""

    def __init__(self, params, state_bits):
        if state_bits not in (32, 8, 4):
            raise ValueError(f"state_bits must be 32, 8 or 4, got {state_bits!r}")
        self.bits = state_bits
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.codes = [None] * len(params)  # (m codes, m absmax, v codes, v absmax) at 8/4 bits

    def reset(self):
        for x in self.m + self.v:
            x.zero_()

    def store(self):
        """The moments as a low-bit optimizer keeps them: quantize -> dequantize."""
        if self.bits == 32:
            return
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            mc, ma = quantize_state(m, 0, self.bits)
            vc, va = quantize_state(v, 1, self.bits)
            self.codes[i] = (mc, ma, vc, va)
            m.copy_(dequantize_state(mc, ma, 0, self.bits, m.shape))
            v.copy_(dequantize_state(vc, va, 1, self.bits, v.shape))


def _fresh_info(n):
    return {"scale": torch.ones(n, dtype=torch.float64),
            "clipped": torch.zeros(n, dtype=torch.int64)}


class AdamW:
    """torch.optim.AdamW preceded by gradient policies (ValueClip, GlobalNormClip,
    TensorNormClip, AdaGCClip; applied in the order given, which should be lowbit's canonical
    one: value clip, norm clip, AdaGC)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 policies=(), state_bits=32):
        self.params, self.policies = list(params), list(policies)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.moments = _Moments(self.params, state_bits)
        self.t, self.info = 0, {}

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        self.info = _fresh_info(len(grads))
        grads = [g.float() for g in grads]
        for policy in self.policies:
            grads = policy(grads, self.info)
        beta1, beta2 = self.betas
        bc1, bc2 = 1.0 - beta1 ** self.t, math.sqrt(1.0 - beta2 ** self.t)
        for p, g, m, v in zip(self.params, grads, self.moments.m, self.moments.v):
            p.mul_(1.0 - self.lr * self.wd)
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            p.addcdiv_(m, v.sqrt().div_(bc2).add_(self.eps), value=-self.lr / bc1)
        self.moments.store()


def spam_warmup_factor(t, interval, warmup_steps):
    """SPAM's post-reset lr factor phi at global step t (§1.1), pytorch-optimizer's form: the
    cosine from 0.01 to 1 over warmup_steps steps after each reset, shifted by one step (c + 1);
    1 before the first reset and once the warmup is over."""
    if interval == 0 or warmup_steps == 0 or t < interval:
        return 1.0
    c = t % interval  # steps since the last reset
    if c >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * (c + 1) / (warmup_steps + 1))) / 2.0


class SPAM:
    """SPAM (Huang et al., ICLR 2025, §1) at density 1: every step t (global, 1-based)
      1. momentum reset: m = v = 0 if t % update_proj_gap == 0 (the step count runs on);
      2. spike clip, from step grad_accu_steps on and grad_accu_steps steps after each reset:
         where g^2 > threshold * max(v_{t-1}, eps^2), g = sign(g) sqrt(threshold * max(v, eps^2))
         (the eps^2 floor is lowbit's: SPAM compares against v itself);
      3. Adam moments, p -= phi_t * lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps);
      4. decoupled decay after the update, p *= 1 - lr * wd (not warmed up).
    pytorch-optimizer's defaults. With grad_accu_steps > 0 the clip never runs at a reset step,
    so whether it reads v before or after the reset does not matter."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup_epoch=50,
                 threshold=5000.0, grad_accu_steps=20, update_proj_gap=500, eps=1e-6,
                 state_bits=32):
        self.params = list(params)
        self.lr, self.betas, self.wd, self.eps = lr, betas, weight_decay, eps
        self.warmup, self.threshold = warmup_epoch, threshold
        self.grace, self.interval = grad_accu_steps, update_proj_gap
        self.moments = _Moments(self.params, state_bits)
        self.t, self.info = 0, {}

    @torch.no_grad()
    def step(self, grads):
        self.t, t = self.t + 1, self.t + 1
        self.info = _fresh_info(len(grads))
        if self.interval and t % self.interval == 0:
            self.moments.reset()
        clip = (self.threshold != 0 and t >= self.grace and
                (self.interval == 0 or t % self.interval >= self.grace))
        self.info["spike_clip"] = clip
        beta1, beta2 = self.betas
        step_size = self.lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        phi = spam_warmup_factor(t, self.interval, self.warmup)
        for i, (p, g, m, v) in enumerate(zip(self.params, grads, self.moments.m,
                                             self.moments.v)):
            g = g.float()
            if clip:
                limit = self.threshold * v.clamp_min(self.eps ** 2)
                spike = g * g > limit
                g = torch.where(spike, g.sign() * limit.sqrt(), g)
                _count(self.info, i, spike)
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            p.addcdiv_(m, v.sqrt().add_(self.eps), value=-step_size * phi)
            p.mul_(1.0 - self.lr * self.wd)
        self.moments.store()


def beta1_cosine_factor(t, t_max, eta_min=0.5):
    """Stable-SPAM's beta1 schedule factor at global step t (§2.1), pytorch-optimizer's chained
    cosine, clamped at eta_min from t_max on."""
    if t >= t_max:
        return eta_min
    period = t_max + 1
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * (t + 1) / period)) / (
        1.0 + math.cos(math.pi / period))


class StableSPAM:
    """Stable-SPAM (Huang et al. 2025, §2), pytorch-optimizer semantics: with t the global step,
    s the step since the last reset (bias correction restarts), f = beta1_cosine_factor(t) (1
    without t_max), beta1' = f beta1 and gamma1' = f gamma1, per tensor:
      0. p *= 1 - lr * wd;
      1. AdaClip: a = max|g|, M <- theta M + (1 - theta) a, T = M / (1 - theta^t), and where
         |g| > T: g *= T / a;
      2. AdaGN: n = ||g||, mu <- gamma1' mu + (1 - gamma1') n, nu <- gamma2 nu + (1 - gamma2) n^2,
         c = (mu / (1 - gamma1'^t)) / (sqrt(nu / (1 - gamma2^t)) + eps), g *= c / n (n > 0);
      3. MoRet: m = v = 0 and s = 1 if t % update_proj_gap == 0;
      4. AdamW with beta1' and s:
         p -= lr / (1 - beta1'^s) * m / (sqrt(v) / sqrt(1 - beta2^s) + eps).
    adaclip / adagn False switch a stage off (to show the test data make it fire)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), gamma1=0.7, gamma2=0.9, theta=0.999,
                 t_max=None, eta_min=0.5, weight_decay=0.0, update_proj_gap=1000, eps=1e-8,
                 state_bits=32, adaclip=True, adagn=True):
        self.params = list(params)
        self.lr, self.betas, self.wd, self.eps = lr, betas, weight_decay, eps
        self.gamma1 = betas[0] if gamma1 == -1 else gamma1
        self.gamma2, self.theta, self.t_max, self.eta_min = gamma2, theta, t_max, eta_min
        self.interval, self.adaclip, self.adagn = update_proj_gap, adaclip, adagn
        self.moments = _Moments(self.params, state_bits)
        n = len(self.params)
        self.max_ema, self.norm_mu, self.norm_nu = [0.0] * n, [0.0] * n, [0.0] * n
        self.t, self.s, self.info = 0, 0, {}

    @torch.no_grad()
    def step(self, grads):
        self.t, t = self.t + 1, self.t + 1
        self.info = _fresh_info(len(grads))
        self.info["adagn_norm"] = torch.zeros(len(grads), dtype=torch.float64)
        f = 1.0 if self.t_max is None else beta1_cosine_factor(t, self.t_max, self.eta_min)
        beta1, beta2 = self.betas[0] * f, self.betas[1]
        gamma1 = self.gamma1 * f
        if self.interval and t % self.interval == 0:
            self.moments.reset()
            self.s = 0
        self.s += 1
        s = self.s
        bc1, bc2 = 1.0 - beta1 ** s, math.sqrt(1.0 - beta2 ** s)
        for i, (p, g, m, v) in enumerate(zip(self.params, grads, self.moments.m,
                                             self.moments.v)):
            g = g.float()
            p.mul_(1.0 - self.lr * self.wd)
            if self.adaclip:
                a = float(g.abs().max())
                self.max_ema[i] = self.theta * self.max_ema[i] + (1.0 - self.theta) * a
                threshold = self.max_ema[i] / (1.0 - self.theta ** t)
                over = g.abs() > threshold
                g = torch.where(over, g * (threshold / a), g)
                _count(self.info, i, over)
            if self.adagn:
                n = float(torch.linalg.vector_norm(g))
                self.info["adagn_norm"][i] = n
                if n > 0:
                    self.norm_mu[i] = gamma1 * self.norm_mu[i] + (1.0 - gamma1) * n
                    self.norm_nu[i] = self.gamma2 * self.norm_nu[i] + (1.0 - self.gamma2) * n * n
                    mu_hat = self.norm_mu[i] / (1.0 - gamma1 ** t)
                    nu_hat = self.norm_nu[i] / (1.0 - self.gamma2 ** t)
                    g = g * (mu_hat / (math.sqrt(nu_hat) + self.eps) / n)
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            p.addcdiv_(m, v.sqrt().div_(bc2).add_(self.eps), value=-self.lr / bc1)
        self.moments.store()


class StableAdamW:
    """StableAdamW (Wortsman et al. 2023, §5.3): AdamW whose step size is clipped per tensor by
    the RMS of g / sqrt(v_hat), with the new bias-corrected v_hat_t:
        RMS = sqrt(mean(g^2 / max(v_hat_t, eps^2))),  eta = lr / max(1, RMS / threshold),
        p *= 1 - wd * eta (decay="clipped", pytorch-optimizer) or 1 - wd * lr (decay="lr",
        Wortsman's gist), then p -= eta * m_hat / (sqrt(v_hat) + eps).
    (The gist and pytorch-optimizer keep debiased moments, beta_hat_t = beta (1 - beta^(t-1)) /
    (1 - beta^t); those equal m_hat and v_hat. The raw m, v are kept here, as lowbit stores
    them.) info["eta_ratio"]: eta / lr per tensor."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-8,
                 threshold=1.0, decay="clipped", state_bits=32):
        if decay not in ("clipped", "lr"):
            raise ValueError(f"decay must be 'clipped' or 'lr', got {decay!r}")
        self.params = list(params)
        self.lr, self.betas, self.wd, self.eps = lr, betas, weight_decay, eps
        self.threshold, self.decay = threshold, decay
        self.moments = _Moments(self.params, state_bits)
        self.t, self.info = 0, {}

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        self.info = _fresh_info(len(grads))
        ratios = []
        beta1, beta2 = self.betas
        bc1, bc2sq = 1.0 - beta1 ** self.t, 1.0 - beta2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.moments.m, self.moments.v):
            g = g.float()
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            v_hat = v / bc2sq
            rms = float((g * g / v_hat.clamp_min(self.eps ** 2)).mean().sqrt())
            eta = self.lr / max(1.0, rms / self.threshold)
            ratios.append(eta / self.lr)
            p.mul_(1.0 - self.wd * (eta if self.decay == "clipped" else self.lr))
            p.addcdiv_(m, v_hat.sqrt().add_(self.eps), value=-eta / bc1)
        self.info["eta_ratio"] = torch.tensor(ratios, dtype=torch.float64)
        self.moments.store()
