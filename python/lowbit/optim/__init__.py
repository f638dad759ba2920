"""Drop-in torch.optim replacements with fused 32/8/4-bit state updates (issue 3; so far the
Adam/AdamW family with fp32 parameters)."""
from .adam import Adam, Adam4bit, Adam8bit, AdamW, AdamW4bit, AdamW8bit

__all__ = ["Adam", "Adam8bit", "Adam4bit", "AdamW", "AdamW8bit", "AdamW4bit"]
