"""Plain, unfused implementations of the curvature optimizers' updates, written from the papers'
official code (research/hessian.md §2-3, §5), one parameter tensor at a time, in place, in the
tensors' own dtype: the oracle lowbit.optim.SophiaH / SophiaG / AdaHessian are tested against
step for step (the fused kernels fold scalars and order operations differently, so the
comparison is up to rounding; lowbit.reference.optim is the bit-exact spec of the kernels).
"""
import torch


def sophiah_step(p, g, m, h, est=None, *, lr, betas, weight_decay, clip, eps, maximize=False):
    """pytorch-optimizer 4.1.0's SophiaH: decoupled decay, m ← lerp(m, g, 1 − β1), on refresh
    steps h ← lerp(h, est, 1 − β2), update = clamp(m / max(h, eps), −clip, clip)."""
    beta1, beta2 = betas
    if maximize:
        g = -g
    p.mul_(1.0 - lr * weight_decay)
    m.lerp_(g, 1.0 - beta1)
    if est is not None:
        h.lerp_(est, 1.0 - beta2)
    p.add_((m / h.clamp_min(eps)).clamp(-clip, clip), alpha=-lr)


def sophia_paper_step(p, g, m, h, est=None, *, lr, betas, weight_decay, gamma, eps, clip=1.0):
    """The paper's Algorithm 3: θ ← θ − η λ θ; θ ← θ − η clip(m / max(γ h, ε), 1)."""
    beta1, beta2 = betas
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    if est is not None:
        h.mul_(beta2).add_(est, alpha=1.0 - beta2)
    p.mul_(1.0 - lr * weight_decay)
    p.sub_(lr * torch.clamp(m / torch.clamp_min(gamma * h, eps), -clip, clip))


def sophiag_update_hessian(h, g, beta2):
    """The official SophiaG.update_hessian(): h ← β2 h + (1 − β2) g ⊙ g."""
    h.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def sophiag_step(p, g, m, h, *, lr, betas, rho, weight_decay, bs, maximize=False):
    """The official SophiaG.step(bs=...): p ← p (1 − lr wd); m ← β1 m + (1 − β1) g;
    ratio = min(|m| / (rho·bs·h + 1e-15), 1); p ← p − lr sign(m) ratio."""
    beta1, _ = betas
    if maximize:
        g = -g
    p.mul_(1.0 - lr * weight_decay)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    ratio = (m.abs() / (rho * bs * h + 1e-15)).clamp(None, 1)
    p.addcmul_(m.sign(), ratio, value=-lr)


def adahessian_step(p, g, m, v, est, *, lr, betas, eps, weight_decay, hessian_power, step,
                    refreshes, maximize=False):
    """The official Adahessian update (amirgholami/adahessian), with v refreshed only when est
    is given and its bias correction counting `refreshes`: m ← β1 m + (1 − β1) g;
    v ← β2 v + (1 − β2) est²; denom = (sqrt(v)^k / sqrt(1 − β2^n)^k) + eps;
    p ← p − lr (m / (1 − β1^t) / denom + wd p). est is used as given (|·| and spatial averaging
    are the caller's)."""
    beta1, beta2 = betas
    if maximize:
        g = -g
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    if est is not None:
        v.mul_(beta2).addcmul_(est, est, value=1.0 - beta2)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** refreshes
    k = hessian_power
    denom = (v.sqrt() ** k) / (bc2 ** 0.5) ** k + eps
    p.copy_(p - lr * (m / bc1 / denom + weight_decay * p))
