"""Drop-in torch.optim replacements with fused 32/8/4-bit state updates: Adam/AdamW, Lion and SGD
with momentum, the spike-robust Adam variants, and the curvature optimizers SophiaH, SophiaG and
AdaHessian (lowbit.optim._curvature for their step protocol), for fp32 / bf16 / fp16 parameters
(lowbit.optim._base documents the state layout, non-finite handling and state-dict conversion)."""
from .adahessian import AdaHessian, AdaHessian4bit, AdaHessian8bit
from .adam import Adam, Adam4bit, Adam8bit, AdamW, AdamW4bit, AdamW8bit
from .lion import Lion, Lion4bit, Lion8bit
from .sophia import SophiaG, SophiaG4bit, SophiaG8bit, SophiaH, SophiaH4bit, SophiaH8bit
from .sgd import SGD, SGD4bit, SGD8bit
from .spike import (SPAM, AdaGC, AdaGC4bit, AdaGC8bit, SPAM4bit, SPAM8bit, StableAdamW,
                    StableAdamW4bit, StableAdamW8bit, StableSPAM, StableSPAM4bit, StableSPAM8bit)

__all__ = ["Adam", "Adam8bit", "Adam4bit", "AdamW", "AdamW8bit", "AdamW4bit", "Lion",
           "Lion8bit", "Lion4bit", "SGD", "SGD8bit", "SGD4bit", "SPAM", "SPAM8bit", "SPAM4bit",
           "StableSPAM", "StableSPAM8bit", "StableSPAM4bit", "AdaGC", "AdaGC8bit", "AdaGC4bit",
           "StableAdamW", "StableAdamW8bit", "StableAdamW4bit", "SophiaH", "SophiaH8bit",
           "SophiaH4bit", "SophiaG", "SophiaG8bit", "SophiaG4bit", "AdaHessian",
           "AdaHessian8bit", "AdaHessian4bit"]
