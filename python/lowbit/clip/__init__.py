"""Gradient clipping on lowbit's multi-tensor statistics pass: drop-ins for torch's
clip_grad_norm_ family, and the clipping policies the fused optimizers apply inside their step
(`clip=` on any lowbit optimizer; lowbit.clip.policies documents the order and the state)."""
from .norm import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from .policies import (AdaClip, AdaGC, AdaGN, Beta1Cosine, ClipPolicy, MomentumReset, NormClip,
                       SpikeClip, UpdateClip, ValueClip)

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "get_total_norm", "ClipPolicy",
           "ValueClip", "NormClip", "AdaGC", "AdaClip", "AdaGN", "SpikeClip", "MomentumReset",
           "Beta1Cosine", "UpdateClip"]
