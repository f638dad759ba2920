"""What a QuantLinear quantizes: one TensorQuant per tensor role, and the published presets.

Roles: `weight` and `activation` (the forward operands; their Hadamard settings must agree,
because a rotation only cancels when both operands of a matmul get it), `grad_output` (the
gradient of the layer output, quantized once before both backward matmuls) and
`saved_activation` (the activation kept for the weight gradient, stored as codes + scales between
forward and backward instead of a full-precision tensor). None = that role stays in the operand
precision.
"""
from dataclasses import dataclass, field

from ..reference.hadamard import check_block
from ..reference.lowprec import QuantSpec

ROLES = ("weight", "activation", "grad_output", "saved_activation")
DEFAULT_EXCLUDE = ("lm_head", "head", "output", "*embed*")


@dataclass(frozen=True)
class TensorQuant(QuantSpec):
    """QuantSpec (format, scaling, block_size, scale_format, rounding) plus an optional block
    Hadamard rotation of the inner dimension applied before quantizing (and undone after)."""
    hadamard: bool = False
    hadamard_block: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.hadamard:
            check_block(self.hadamard_block)


@dataclass(frozen=True)
class LinearQuantConfig:
    """Per-role quantization of QuantLinear layers. `seed` keys the Philox streams of the
    stochastic roles; `exclude` are fnmatch patterns that convert() matches against each Linear's
    qualified name and its last component (default: the output head and embeddings)."""
    weight: TensorQuant | None = None
    activation: TensorQuant | None = None
    grad_output: TensorQuant | None = None
    saved_activation: TensorQuant | None = None
    seed: int = 0
    exclude: tuple = field(default=DEFAULT_EXCLUDE)

    def __post_init__(self):
        for role in ROLES:
            spec = getattr(self, role)
            if spec is not None and not isinstance(spec, TensorQuant):
                raise TypeError(f"{role} must be a TensorQuant or None, got "
                                f"{type(spec).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        s = self.saved_activation
        if s is not None and s.hadamard:
            raise ValueError("saved_activation cannot use a hadamard rotation: the weight "
                             "gradient contracts over tokens, not over the rotated features")
        w, a = self.weight, self.activation
        hw = (w.hadamard, w.hadamard_block) if w and w.hadamard else None
        ha = (a.hadamard, a.hadamard_block) if a and a.hadamard else None
        if w is not None and a is not None and hw != ha:
            raise ValueError("weight and activation must use the same hadamard setting (a "
                             f"rotation cancels only on both operands): weight {hw}, "
                             f"activation {ha}")

    def forward_hadamard(self):
        """Hadamard block of the forward inner dimension, or None."""
        for spec in (self.activation, self.weight):
            if spec is not None and spec.hadamard:
                return spec.hadamard_block
        return None


NONE = LinearQuantConfig()

# SPAM / Stable-SPAM's 4-bit LLaMA runs quantize weights and activations to INT4 in groups of 256
# along the inner dimension and keep gradients in bf16 (their simulation code derives from
# Q-GaLore's). We use symmetric absmax scaling onto [-7, 7] (their code uses asymmetric min/max
# with a zero point), round-to-nearest.
_INT4 = TensorQuant("int4", scaling="block", block_size=256)
INT4 = LinearQuantConfig(weight=_INT4, activation=_INT4)

# FP8 training recipe of Micikevicius et al. 2022 ("FP8 Formats for Deep Learning"): e4m3 for
# weights and activations, e5m2 (more range) for gradients; here with per-row fp32 scales.
FP8 = LinearQuantConfig(weight=TensorQuant("e4m3", scaling="row"),
                        activation=TensorQuant("e4m3", scaling="row"),
                        grad_output=TensorQuant("e5m2", scaling="row"))

# FP4 (E2M1) in MXFP4 style: blocks of 32 with e8m0 power-of-two scales, a block-32 Hadamard on
# every operand, round-to-nearest forward and stochastic rounding for the gradient (the
# combination the FP4 training studies, e.g. Quartet, report as stable).
_FP4_FWD = TensorQuant("e2m1", block_size=32, scale_format="e8m0", hadamard=True,
                       hadamard_block=32)
FP4 = LinearQuantConfig(weight=_FP4_FWD, activation=_FP4_FWD,
                        grad_output=TensorQuant("e2m1", block_size=32, scale_format="e8m0",
                                                rounding="stochastic", hadamard=True,
                                                hadamard_block=32))

PRESETS = {"none": NONE, "int4": INT4, "fp8": FP8, "fp4": FP4}
