"""Gradient clipping on lowbit's multi-tensor statistics pass: drop-ins for torch's
clip_grad_norm_ family, and (issue 4) the clipping policies the fused optimizers apply inside
their step."""
from .norm import clip_grad_norm_, clip_grads_with_norm_, get_total_norm

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "get_total_norm"]
