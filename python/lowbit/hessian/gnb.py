"""The Gauss-Newton-Bartlett estimator of the Gauss-Newton diagonal (Sophia-G; Liu et al. 2023,
Alg. 2; research/hessian.md §2.1-2.3): no second derivatives, one ordinary backward.

For a softmax cross-entropy model with B predictions (rows of the logits: tokens for a language
model, examples for a classifier), sample labels ŷ_b ~ softmax(logits_b), take the gradient ĝ of
the MEAN cross-entropy on the sampled labels, and return

    ĥ = B · ĝ ⊙ ĝ,

which is unbiased for the diagonal of the Gauss-Newton matrix G = (1/B) Σ_b J_bᵀ (diag(p_b) −
p_b p_bᵀ) J_b of the mean loss: E[ĝ ĝᵀ] = (1/B²) Σ_b J_bᵀ Cov(e_ŷ) J_b = G / B. The official
SophiaG code keeps the EMA of ĝ ⊙ ĝ and multiplies by bs = B in the step (rho · bs · h); lowbit's
SophiaG does the same (update_hessian takes this estimate and uses ĝ ⊙ ĝ), so bs must be the B of
the estimate: the number of predictions the mean runs over, summed over gradient-accumulation
micro-batches (the official GPT-2 script: total batch · block size).

Labels come from lowbit's Philox stream, so an estimate is reproducible from (seed, offset): row b
(flattened leading dimensions of the logits) uses counter offset + b, and its uniform
u = (w0 + w1 · 2⁻³²) · 2⁻³² in float64 (53 significant bits) picks the first class whose
cumulative probability (float64 softmax) exceeds u · total (inverse-CDF sampling).
"""
from dataclasses import dataclass

import torch

from ..reference.philox import philox4
from ._vectors import as_param_list, zeros_if_none


@dataclass
class GNBEstimate:
    grads: list             # ĝ: gradient of the mean CE on the sampled labels, shaped like params
    num_predictions: int    # B: rows of the logits the mean ran over
    labels: torch.Tensor    # the sampled labels, shaped like the logits without the class dim
    loss: torch.Tensor      # the mean CE on the sampled labels (detached)

    @property
    def diag(self) -> list:
        """The paper's ĥ = B · ĝ ⊙ ĝ (fp32), the Gauss-Newton diagonal estimate."""
        return [self.num_predictions * g.float() * g.float() for g in self.grads]

    @property
    def squared_grads(self) -> list:
        """ĝ ⊙ ĝ (fp32): what the official SophiaG's update_hessian averages (= ĥ / B)."""
        return [g.float() * g.float() for g in self.grads]


def sample_labels(logits: torch.Tensor, *, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """One label per row of `logits` (last dimension = classes) drawn from softmax(logits) with
    the Philox stream (module docstring); int64, shaped logits.shape[:-1]."""
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a class dimension, got shape {tuple(logits.shape)}")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    flat = logits.detach().reshape(-1, logits.shape[-1]).to(torch.float64)
    probs = torch.softmax(flat, dim=-1)
    cdf = probs.cumsum(-1)
    counters = offset + torch.arange(flat.shape[0], dtype=torch.int64, device=flat.device)
    w0, w1, _, _ = philox4(seed, counters)
    u = (w0.to(torch.float64) + w1.to(torch.float64) * 2.0**-32) * 2.0**-32
    target = (u * cdf[:, -1]).unsqueeze(-1)
    labels = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    labels = labels.clamp_(max=flat.shape[1] - 1)  # u * total rounding up to the total
    return labels.reshape(logits.shape[:-1])


def gnb_estimate(logits_fn, params, *, seed: int = 0, offset: int = 0) -> GNBEstimate:
    """Sophia-G's Gauss-Newton-Bartlett estimate (module docstring).

    logits_fn: closure returning the model's logits [..., num_classes] on a batch (with their
        graph: not under torch.no_grad); every row is one prediction.
    params: the parameters (a module or a list of tensors that require grad).
    seed, offset: the Philox stream of the sampled labels (use a new offset per estimate, e.g.
        the step count times the number of rows, for independent labels).
    Returns GNBEstimate: .diag = B·ĝ⊙ĝ (the paper's estimate), .squared_grads = ĝ⊙ĝ (the
    official code's unit), .grads, .num_predictions = B, .labels, .loss. Parameters the logits do
    not depend on get zeros. The graph is freed before returning."""
    plist, _ = as_param_list(params)
    with torch.enable_grad():
        logits = logits_fn()
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits_fn must return the logits as a tensor, got "
                            f"{type(logits).__name__}")
        if logits.dim() < 2:
            raise ValueError(f"logits_fn must return logits shaped [..., num_classes] with at "
                             f"least one prediction dimension, got shape {tuple(logits.shape)}")
        if not logits.requires_grad:
            raise ValueError("the logits do not require grad (computed under torch.no_grad() or "
                             "from detached tensors): there is nothing to differentiate")
        labels = sample_labels(logits, seed=seed, offset=offset)
        flat = logits.reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(flat.float(), labels.reshape(-1))
        grads = torch.autograd.grad(loss, plist, allow_unused=True)
    grads = [g.detach() for g in zeros_if_none(grads, plist)]
    return GNBEstimate(grads, flat.shape[0], labels, loss.detach())
