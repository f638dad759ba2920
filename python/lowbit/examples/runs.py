"""Which optimizers the pretraining demo compares, and how each is built.

A run is "<optimizer>@<precision>": optimizer names are `torch-adamw`, `torch-adamw-fused`,
`torch-adam` or `lowbit-<class>` for any class of lowbit.optim (lower case, e.g.
`lowbit-adamw8bit`, `lowbit-stablespam4bit`, `lowbit-sophiag`; `lowbit-adamw4bit-rank1` is
AdamW4bit with the rank-1 second moment); precision is `fp32` or `bf16`
(the model's parameters, gradients and the torch optimizers' states in that dtype), or `fp8`,
`int4` or `fp4`: fp32 parameters with the model's linear layers (all but the output head)
converted to lowbit.nn's preset of that name — weights and activations (and, for fp8 / fp4,
output gradients) fake-quantized, simulated low-precision training as in the SPAM / Stable-SPAM
4-bit runs. lowbit optimizers write bf16 parameters back with stochastic rounding (their
default); torch's round to nearest — the comparison the demo exists to show.

Hyperparameters shared by every run (lr, betas, weight decay, warmup + cosine schedule) come
from the command line; the few optimizer-specific ones follow the optimizers' papers: Sophia
takes lr/2 (its README: "slightly below AdamW's"), twice the weight decay, and the official 125M
GPT-2 recipe's betas (0.965, 0.99) and rho 0.05, refreshing its Gauss-Newton-Bartlett estimate
every 10 steps as that recipe (research/hessian.md §2).
(In a run of a few hundred steps Sophia trails AdamW: its Hessian EMA starts at zero without
bias correction, so most coordinates take clipped sign steps — win rate ~3% at step 120 of the
default preset, where its authors tune rho for 10-50% over 100k steps; rho 0.005-0.5 and lr
x0.2-2 did not close the gap in 120-step trials here.) Lion takes lr/3 and
decoupled weight decay x3 (the Lion paper: 3-10x smaller lr, same lr*wd); SGD takes momentum 0.9
and lr x10, no weight decay (untuned: shown for completeness, not competitive on transformers).
"""
from dataclasses import dataclass

import torch

import lowbit.optim as lowbit_optim

PRECISIONS = ("fp32", "bf16", "fp8", "int4", "fp4")
# precisions that are lowbit.nn layer presets (fp32 parameters, quantized linear layers)
LAYER_PRECISIONS = ("fp8", "int4", "fp4")
TORCH_OPTIMIZERS = {
    "torch-adamw": lambda params, kw: torch.optim.AdamW(params, **kw),
    "torch-adamw-fused": lambda params, kw: torch.optim.AdamW(params, fused=True, **kw),
    "torch-adam": lambda params, kw: torch.optim.Adam(
        params, **{k: v for k, v in kw.items() if k != "weight_decay"}),
}
# Variants of lowbit classes with non-default options, by name.
LOWBIT_VARIANTS = {
    # the 4-bit optimizer paper's Rank-1/Linear second moment (block-wise v is the default)
    "lowbit-adamw4bit-rank1": ("AdamW4bit", {"second_moment_norm": "rank1"}),
}
SOPHIA_LR_SCALE = 0.5
SOPHIA_EVERY = 10

# The default comparison: fits the ~5 minute budget of the default preset on 2 CPU cores.
DEFAULT_RUNS = ("torch-adamw@fp32", "torch-adamw-fused@fp32", "lowbit-adamw@fp32",
                "lowbit-adamw8bit@fp32", "lowbit-adamw4bit@fp32", "lowbit-adamw4bit-rank1@fp32",
                "lowbit-stablespam8bit@fp32",
                "lowbit-sophiag8bit@fp32", "torch-adamw@bf16", "lowbit-adamw8bit@bf16")


def lowbit_names() -> dict:
    return {f"lowbit-{name.lower()}": name for name in lowbit_optim.__all__}


def known_optimizers() -> list:
    return sorted(TORCH_OPTIMIZERS) + sorted(list(lowbit_names()) + list(LOWBIT_VARIANTS))


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.optimizer}@{self.precision}"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def layers(self):
        """The lowbit.nn preset name the model's linear layers take, or None."""
        return self.precision if self.precision in LAYER_PRECISIONS else None

    @property
    def is_sophia_g(self) -> bool:
        return self.optimizer.startswith("lowbit-sophiag")

    @property
    def needs_hvp(self) -> bool:
        return self.optimizer.startswith(("lowbit-sophiah", "lowbit-adahessian"))


def parse_runs(text: str, default_precision: str = "fp32") -> list:
    """"a@fp32,b@bf16,c" (default_precision when omitted) -> [RunSpec], or a ValueError naming
    the bad entry and the valid choices — raised before any training starts."""
    specs, known = [], set(known_optimizers())
    if default_precision not in PRECISIONS:
        raise ValueError(f"--precision: unknown precision {default_precision!r}; choose from "
                         f"{', '.join(PRECISIONS)}")
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        opt, _, prec = item.partition("@")
        opt, prec = opt.strip().lower(), (prec.strip().lower() or default_precision)
        if opt not in known:
            raise ValueError(f"--runs: unknown optimizer {opt!r}; choose from "
                             f"{', '.join(known_optimizers())}")
        if prec not in PRECISIONS:
            raise ValueError(f"--runs: unknown precision {prec!r} in {item!r}; choose from "
                             f"{', '.join(PRECISIONS)}")
        spec = RunSpec(opt, prec)
        if spec.needs_hvp:
            raise ValueError(f"--runs: {opt} needs Hessian-vector products every refresh, which "
                             f"the demo does not run (too slow for its budget); use "
                             f"lowbit-sophiag (Gauss-Newton-Bartlett, no second derivatives)")
        if spec in specs:
            raise ValueError(f"--runs: {spec.name} is listed twice")
        specs.append(spec)
    if not specs:
        raise ValueError("--runs: no runs given")
    return specs


def build_optimizer(spec: RunSpec, params, *, lr: float, betas, weight_decay: float, seed: int):
    """The optimizer of one run over `params` (a list of tensors)."""
    kw = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if spec.optimizer in TORCH_OPTIMIZERS:
        return TORCH_OPTIMIZERS[spec.optimizer](params, kw)
    cls_name, options = LOWBIT_VARIANTS.get(spec.optimizer,
                                            (lowbit_names().get(spec.optimizer), {}))
    cls = getattr(lowbit_optim, cls_name)
    if spec.is_sophia_g:
        kw.update(lr=lr * SOPHIA_LR_SCALE, rho=0.05, betas=(0.965, 0.99),
                  weight_decay=2 * weight_decay)
    elif spec.optimizer.startswith("lowbit-lion"):
        kw.update(lr=lr / 3, weight_decay=weight_decay * 3, betas=(0.9, 0.99))
    elif spec.optimizer.startswith("lowbit-sgd"):
        kw = dict(lr=lr * 10, momentum=0.9)  # (torch SGD decay is coupled L2: left off)
    return cls(params, seed=seed, **options, **kw)


def state_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (codes, absmax, fp32 states,
    Kahan buffers; not the step counters' scalars)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total
