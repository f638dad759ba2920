"""A small LLaMA-style decoder for the pretraining demo (pure PyTorch, written for lowbit).

Pre-norm blocks of RMSNorm -> causal self-attention with rotary position embeddings -> RMSNorm
-> SwiGLU feed-forward, then a final RMSNorm and an untied output head; byte-level (vocab 256).
No biases and no dropout (as LLaMA), so a training step is a deterministic function of the
parameters and the batch: resuming from a checkpoint continues the identical trajectory.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    vocab: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    # SwiGLU hidden width; 0 = LLaMA's rule: 2/3 of 4*dim rounded up to a multiple of 32
    ffn_hidden: int = 0
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab", "dim", "n_layers", "n_heads", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"DecoderConfig: dim ({self.dim}) must split into n_heads "
                             f"({self.n_heads}) heads of even width (rotary pairs channels)")

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 32 * -(-(2 * 4 * self.dim // 3) // 32)

    def as_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 whatever the parameter dtype (bf16 sums of squares lose digits)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rotary_tables(seq_len: int, head_dim: int, base: float):
    """cos/sin [seq_len, head_dim/2] of the rotary angles pos * base^(-2i/head_dim)."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (2i, 2i+1) of x [B, H, T, D] by the position's angle."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos[:T], sin[:T]), apply_rotary(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Decoder(nn.Module):
    """tokens [B, T] (int64 bytes) -> logits [B, T, vocab] (fp32)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        # rotary tables: computed on first use per device and kept out of the module's buffers,
        # so model.to(torch.bfloat16) does not round them (and the optimizer never sees them)
        self._rope = {}
        self.reset_parameters()

    def reset_parameters(self):
        # GPT-2 / LLaMA-style init: N(0, 0.02), residual output projections scaled by
        # 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.out.weight", "ffn.down.weight")):
                nn.init.normal_(p, std=0.02 / (2 * self.cfg.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=0.02)

    def _rotary(self, device):
        if device not in self._rope:
            cos, sin = rotary_tables(self.cfg.seq_len, self.cfg.dim // self.cfg.n_heads,
                                     self.cfg.rope_base)
            self._rope[device] = (cos.to(device), sin.to(device))
        return self._rope[device]

    def forward(self, tokens):
        if tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(f"Decoder: sequence of {tokens.shape[1]} tokens is longer than "
                             f"seq_len={self.cfg.seq_len}")
        x = self.embed(tokens)
        cos, sin = self._rotary(tokens.device)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x)).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits, targets):
    """Mean next-byte cross-entropy in nats."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
