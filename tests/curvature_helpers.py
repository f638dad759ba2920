"""Shared pieces of the curvature optimizer tests: state tensors as fp32, bit-identity, and the
rigorous tracking bound of a quantized run against the 32-bit run under identical gradients and
estimates (teacher forcing).

Tracking bound. Every state s of these rules is a linear EMA s_new = (1 - a) s + a x of inputs x
(g, the estimate, or its square) that both runs see identically, so the difference of the
dequantized states D_t = |deq(s8_t) - s32_t| obeys, per element,
    D_t <= (1 - a) D_{t-1} + delta * A_t + slack     (steps that update s)
    D_t <= D_{t-1} + delta * A_t                     (steps that only requantize it)
where A_t is the element's block absmax after the step (stored) and delta the largest distance
of a point of the codebook's range ([-1, 1] signed, [0, 1] unsigned) to its nearest code (half
the largest gap, or an end the codebook does not reach), and slack covers fp32 rounding. The
states the step USES are the unquantized new ones, off by U_t = (1 - a) D_{t-1} + slack (or
D_{t-1} when frozen)."""
import torch

from lowbit import codebooks
from lowbit.reference import optim as ref

SLACK = 2e-6  # relative: a few fp32 ulps of the magnitudes involved


def codebook_delta(name: str, signed: bool) -> float:
    c = codebooks.codebook(name).double().sort().values
    lo = -1.0 if signed else 0.0
    return float(max((c[1:] - c[:-1]).max() / 2, c[0] - lo, 1.0 - c[-1]))


def fp32_states(opt, p):
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    return opt._moments_fp32(p, opt.state[p], opt._state_names(group), opt._format_for(p, group))


def block_absmax(opt, p, j):
    """Per element, the absmax of its block of state j (fp32 states: zeros)."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    bits, block, _ = opt._format_for(p, group)
    if bits == 32:
        return torch.zeros(p.numel())
    name = opt._state_names(group)[j]
    return opt.state[p][name + "_absmax"].repeat_interleave(block)[:p.numel()].reshape(p.shape)


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
               for k in a)


class EmaBound:
    """D_t and U_t (module docstring) of one state of one parameter."""

    def __init__(self, shape, a: float, delta: float):
        self.a, self.delta = a, delta
        self.D = torch.zeros(shape, dtype=torch.float64)
        self.U = torch.zeros(shape, dtype=torch.float64)

    def advance(self, updated: bool, absmax, magnitude):
        slack = SLACK * (magnitude.double().abs() + self.D)
        if updated:
            self.U = (1.0 - self.a) * self.D + slack
        else:
            self.U = self.D.clone()
        self.D = self.U + self.delta * absmax.double() + slack


def quant_delta(kind: str, bits: int, j: int) -> float:
    if bits == 32:
        return 0.0
    name, _ = ref.state_codebook(j, bits, 0, kind)
    signed = j == 0 or kind in ref.SIGNED_SECOND
    return codebook_delta(name, signed)


def softmax_regression_optimum(X, y, classes) -> float:
    """The minimum of the mean cross-entropy of softmax regression W x (no bias) on (X, y), by
    float64 L-BFGS: the target the convergence tests measure the optimizers' gap against."""
    W = torch.zeros(classes, X.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=200, tolerance_grad=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X.double() @ W.T, y)
        loss.backward()
        return loss
    opt.step(closure)
    return closure().item()
