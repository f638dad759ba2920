"""Adam and AdamW with 32-, 8- or 4-bit states, one fused multi-tensor call per parameter group
and state format (lowbit.ops.adam_step).

State per parameter: "step" (a float32 0-dim tensor, as torch keeps it), and either
"exp_avg"/"exp_avg_sq" (fp32, torch.optim.AdamW's names and layout) for 32-bit states, or
"exp_avg_codes"/"exp_avg_absmax"/"exp_avg_sq_codes"/"exp_avg_sq_absmax" (flat uint8 codes and
float32 absmax per block; lowbit.reference.optim.STATE_FORMATS) for 8/4-bit ones. Parameters
with fewer than `min_quant_numel` elements keep 32-bit states (bitsandbytes' rule; the decision
uses the parameter's full size). Everything is a plain tensor, so state_dict() checkpoints load
with torch.load(..., weights_only=True).

This slice supports fp32 parameters; bf16/fp16 parameters (stochastic-rounding write-back) are
rejected with a clear error until that lands.
"""
import torch

from .. import ops
from ..reference import optim as ref

_SCALAR_KEYS = ("decay", "wd", "a1", "b2", "a2", "bc2", "eps", "step_size")


def _check_grad(p: torch.Tensor, g: torch.Tensor, name: str):
    if g.is_sparse:
        raise RuntimeError(f"{name}: sparse gradients are not supported; use torch.optim.SparseAdam")
    if g.is_complex() or p.is_complex():
        raise RuntimeError(f"{name}: complex parameters/gradients are not supported; optimize "
                           "torch.view_as_real(param) instead")
    if p.dtype != torch.float32:
        raise NotImplementedError(
            f"{name}: parameter dtype {p.dtype} is not supported yet (fp32 only in this "
            "release; bf16/fp16 with stochastic rounding is in progress) — keep fp32 params")
    if not p.is_contiguous():
        raise RuntimeError(f"{name}: non-contiguous parameters are not supported; make the "
                           "parameter contiguous before building the optimizer")
    if g.dtype != p.dtype:
        raise RuntimeError(f"{name}: gradient dtype {g.dtype} does not match parameter dtype "
                           f"{p.dtype}")
    if g.device != p.device:
        raise RuntimeError(f"{name}: gradient on {g.device} but parameter on {p.device}")
    if g.shape != p.shape:
        raise RuntimeError(f"{name}: gradient shape {tuple(g.shape)} != parameter shape "
                           f"{tuple(p.shape)}")


class _AdamBase(torch.optim.Optimizer):
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False, state_bits=32, min_quant_numel=4096, backend=None):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if state_bits not in (32, 8, 4):
            raise ValueError(f"state_bits must be 32, 8 or 4, got {state_bits!r}")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(ops.BACKENDS)} or None")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, state_bits=state_bits,
                        min_quant_numel=min_quant_numel)
        self.backend = backend
        super().__init__(params, defaults)

    def _state_bits_for(self, p, group) -> int:
        bits = group["state_bits"]
        return 32 if p.numel() < group["min_quant_numel"] else bits

    def _init_state(self, p, bits):
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        init = ref.init_state(p.detach().cpu(), bits)  # zero moments in the storage format
        for k, t in init.items():
            state[k] = t.to(p.device)

    @staticmethod
    def _stored_bits(p, state, name) -> int:
        """The format a (possibly loaded) state is in, checked against the parameter, so a state
        dict from another parameter layout fails here instead of corrupting memory."""
        n = p.numel()
        if "exp_avg" in state:
            for key in ("exp_avg", "exp_avg_sq"):
                t = state[key]
                if t.shape != p.shape or t.dtype != torch.float32:
                    raise RuntimeError(f"{name}: state {key!r} has shape {tuple(t.shape)} and "
                                       f"dtype {t.dtype}, parameter has shape {tuple(p.shape)}; "
                                       "was the state dict saved for another model?")
            return 32
        codes = state["exp_avg_codes"].numel()
        bits = 8 if codes == n else 4
        _, _, block = ref.STATE_FORMATS[bits]
        want_codes = n if bits == 8 else (n + 1) // 2
        for key in ("exp_avg", "exp_avg_sq"):
            c, a = state[key + "_codes"], state[key + "_absmax"]
            if (c.numel() != want_codes or c.dtype != torch.uint8 or
                    a.numel() != -(-n // block) or a.dtype != torch.float32):
                raise RuntimeError(f"{name}: quantized state {key!r} ({c.numel()} codes, "
                                   f"{a.numel()} absmax) does not fit a parameter of {n} "
                                   "elements; was the state dict saved for another model?")
        return bits

    def load_state_dict(self, state_dict):
        """torch's loader casts every state tensor to its parameter's dtype; quantized codes are
        uint8 (values 0..255, exact in any float dtype), so they are cast back here."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                if key in state and state[key].dtype != torch.uint8:
                    state[key] = state[key].to(torch.uint8)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every parameter of every group before touching any: a bad gradient or a state
        # dict from another model raises with the optimizer state unchanged.
        plan = []
        for gi, group in enumerate(self.param_groups):
            buckets = {}  # (state format, step, device) -> params: one fused call each
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = f"param_groups[{gi}]['params'][{pi}]"
                _check_grad(p, p.grad, name)
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, self._state_bits_for(p, group))
                bits = self._stored_bits(p, state, name)
                step = int(state["step"].item()) + 1
                buckets.setdefault((bits, step, p.device), []).append(p)
            plan.append((group, buckets))
        for group, buckets in plan:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for (bits, step, device), plist in buckets.items():
                sc = ref.adam_scalars(lr, beta1, beta2, group["eps"], group["weight_decay"],
                                      step, self._decoupled)
                if bits == 32:
                    m = [self.state[p]["exp_avg"] for p in plist]
                    v = [self.state[p]["exp_avg_sq"] for p in plist]
                    m_abs, v_abs = [], []
                else:
                    m = [self.state[p]["exp_avg_codes"] for p in plist]
                    v = [self.state[p]["exp_avg_sq_codes"] for p in plist]
                    m_abs = [self.state[p]["exp_avg_absmax"] for p in plist]
                    v_abs = [self.state[p]["exp_avg_sq_absmax"] for p in plist]
                backend = ops.resolve_backend(self.backend, device)
                ops.adam_step([p.data for p in plist], [p.grad.contiguous() for p in plist],
                              m, m_abs, v, v_abs, bits, [sc[k] for k in _SCALAR_KEYS],
                              bool(group["maximize"]), backend)
                for p in plist:
                    self.state[p]["step"].fill_(float(step))
        return loss


class AdamW(_AdamBase):
    """torch.optim.AdamW with fused 32/8/4-bit states (decoupled weight decay, default 1e-2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class Adam(_AdamBase):
    """torch.optim.Adam with fused 32/8/4-bit states (L2 weight decay added to the gradient,
    as torch.optim.Adam does; default 0)."""
    _decoupled = False


class AdamW8bit(AdamW):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 8)
        super().__init__(params, *args, **kwargs)


class AdamW4bit(AdamW):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 4)
        super().__init__(params, *args, **kwargs)


class Adam8bit(Adam):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 8)
        super().__init__(params, *args, **kwargs)


class Adam4bit(Adam):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", 4)
        super().__init__(params, *args, **kwargs)
