"""The machinery every lowbit optimizer shares: one fused multi-tensor step per parameter group
and storage format (lowbit.ops.optim_step), state formats, non-finite gradient handling, and
state_dict save / load / conversion.

State per parameter: "step" (a float32 0-dim tensor, as torch keeps it); each of the rule's states
(lowbit.reference.optim.STATE_NAMES: Adam exp_avg / exp_avg_sq, Lion exp_avg, SGD
momentum_buffer) either as an fp32 tensor shaped like the parameter (32-bit states: torch's names
and layout) or as "<name>_codes" (flat uint8) plus "<name>_absmax" (fp32 per block) for 8/4-bit
ones; and "kahan_comp" (the parameter's dtype) with kahan=True on bf16/fp16 parameters. A rank-1
second moment (Adam family, second_moment_norm="rank1") keeps "<name>_row_max" (fp32 [R]) and
"<name>_col_max" (fp32 [C]) instead of "<name>_absmax".
Parameters with fewer than `min_quant_numel` elements keep 32-bit states (bitsandbytes' rule; the
decision uses the parameter's full size). Everything is a plain tensor, so state_dict()
checkpoints load with torch.load(..., weights_only=True).

FSDP2 / DTensor parameters (lowbit.optim._sharding has the rules): the format is decided from
the full parameter, the states hold the local shard (a quantized state's blocks start at the
shard's first element), the step runs on the local shards, and the gradient statistics of
sharded parameters are all-reduced across the shards once per step. Their state_dict() entries
are fp32 DTensors (lowbit.optim._checkpoint), which torch.distributed.checkpoint reshards.
"""
from collections import defaultdict

import torch

from .. import ops
from ..reference import optim as ref
from . import _checkpoint as ckpt
from . import _sharding as shard
from ._clipping import ClipSteps

# Group keys that describe how this optimizer stores its state: on load_state_dict they keep the
# values of the optimizer being loaded into (so loading an 8-bit checkpoint into a 4-bit
# optimizer converts the states), while hyperparameters (lr, betas, seed, ...) are restored.
_CONFIG_KEYS = ("state_bits", "block_size", "min_quant_numel", "stochastic_rounding", "kahan",
                "second_moment_norm")
# Values of config keys for state dicts saved before the key existed: how they stored states.
_LEGACY_CONFIG = {"second_moment_norm": "block"}


def _scale_keys(name: str, cols: int) -> tuple:
    """State keys of the scales of quantized state `name`: one absmax per block, or (cols > 0) the
    row and column maxima of a rank-1 state."""
    return (name + "_row_max", name + "_col_max") if cols else (name + "_absmax",)


def _check_grad(p: torch.Tensor, g: torch.Tensor, name: str):
    if shard.is_dtensor(p):  # the checks below apply to the local shards the step reads
        p, g = shard.check_dtensor_grad(p, g, name)
    if g.is_sparse:
        raise RuntimeError(f"{name}: sparse gradients are not supported; use "
                           "torch.optim.SparseAdam")
    if g.is_complex() or p.is_complex():
        raise RuntimeError(f"{name}: complex parameters/gradients are not supported; optimize "
                           "torch.view_as_real(param) instead")
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: parameter dtype {p.dtype} is not supported; use float32, "
                        "bfloat16 or float16 parameters")
    if not p.is_contiguous():
        raise RuntimeError(f"{name}: non-contiguous parameters are not supported; make the "
                           "parameter contiguous before building the optimizer")
    if g.dtype != p.dtype:
        raise TypeError(f"{name}: gradient dtype {g.dtype} does not match parameter dtype "
                        f"{p.dtype}; keep .grad in the parameter's dtype")
    if g.device != p.device:
        raise RuntimeError(f"{name}: gradient on {g.device} but parameter on {p.device}")
    if g.shape != p.shape:
        raise RuntimeError(f"{name}: gradient shape {tuple(g.shape)} != parameter shape "
                           f"{tuple(p.shape)}")


class FusedOptimizer(ClipSteps, torch.optim.Optimizer):
    """Base of the lowbit optimizers. Subclasses set `_kind` and implement `_scalars(group,
    step)` -> (8 fp32 scalars, step_flags kwargs) and `_nstates(group)`."""

    _kind = "adam"
    _torch_class = None  # the torch.optim class whose state-dict layout export_state_dict gives
    _shardable = True    # steps DTensor (FSDP2) parameters on their local shards

    def __init__(self, params, defaults, *, state_bits=32, block_size=None, min_quant_numel=4096,
                 stochastic_rounding=None, kahan=False, seed=None, backend=None,
                 nonfinite="skip", clip=None):
        if state_bits not in (32, 8, 4):
            raise ValueError(f"state_bits must be 32, 8 or 4, got {state_bits!r}")
        if block_size is not None and block_size not in ref.BLOCK_SIZES:
            raise ValueError(f"block_size must be a power of two from 32 to 4096 (or None for "
                             f"256 with 8-bit and 128 with 4-bit states), got {block_size!r}")
        if not isinstance(min_quant_numel, int) or min_quant_numel < 0:
            raise ValueError(f"min_quant_numel must be a non-negative int, got {min_quant_numel!r}")
        if kahan and stochastic_rounding:
            raise ValueError("kahan=True and stochastic_rounding=True exclude each other: kahan "
                             "keeps a compensation buffer and rounds to nearest")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(ops.BACKENDS)} or None")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if seed is None:
            # follows torch.manual_seed, so seeded scripts are reproducible
            seed = torch.initial_seed() % 2**63
        defaults.update(state_bits=state_bits, block_size=block_size,
                        min_quant_numel=min_quant_numel,
                        stochastic_rounding=not kahan if stochastic_rounding is None
                        else bool(stochastic_rounding),
                        kahan=bool(kahan), seed=int(seed), skipped_steps=0)
        self.backend = backend
        self.nonfinite = nonfinite
        self._init_clip(clip)
        # Per group, after each step: {"skipped": bool, "nonfinite_tensors": int, "grad_norm":
        # float (L2 norm of the group's finite gradient elements)}.
        self.last_step_info = []
        super().__init__(params, defaults)
        if self.clip and any(g.get("second_moment_norm") == "rank1" for g in self.param_groups):
            raise ValueError("clip= policies do not support second_moment_norm='rank1' yet (the "
                             "rank-1 maxima pass computes v without the clipping steps); use "
                             "second_moment_norm='block'")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if not self._shardable and any(shard.is_dtensor(p)
                                       for p in self.param_groups[-1]["params"]):
            self.param_groups.pop()
            raise NotImplementedError(f"{type(self).__name__}: DTensor (FSDP2) parameters are "
                                      "not supported by this optimizer yet")

    # --- rule-specific (subclasses) ---------------------------------------------------------

    def _nstates(self, group) -> int:
        return len(ref.STATE_NAMES[self._kind])

    def _scalars(self, group, step: int):
        raise NotImplementedError

    def _state_names(self, group):
        return ref.STATE_NAMES[self._kind][:self._nstates(group)]

    def _bucket_extra(self, p, group):
        """What besides the step count this parameter's scalars depend on (None: nothing); the
        fused calls are bucketed by it and it reaches _scalars(group, step, extra)."""
        return None

    def _hessian_args(self, group, params) -> tuple:
        """(per-tensor fp32 Hessian-diagonal estimates, extra flags) of one fused call over
        `params` (the curvature optimizers; none by default)."""
        return [], 0

    def _after_fused(self, group, params):
        """Called after each fused call over `params` (state bookkeeping of subclasses)."""

    def _v_cols(self, p, group, bits: int) -> int:
        """Columns of the rank-1 view of p's second state; 0 when it is block-wise (the default,
        and the only format of rules other than the Adam family)."""
        return 0

    # --- state formats ----------------------------------------------------------------------
    # A format is (state_bits, block_size, v_cols): (32, 0, 0) for fp32 states; v_cols > 0 when
    # the second state is rank-1 over the [numel // v_cols, v_cols] view. It is a function of the
    # parameter's shape and its group's settings, so a state dict needs no format tags: the saved
    # groups say how their states were stored. (2-tuples (bits, block) are accepted as block-wise.)

    def _format_for(self, p, group) -> tuple:
        bits = 32 if p.numel() < group["min_quant_numel"] else group["state_bits"]
        if bits == 32:
            return 32, 0, 0
        return (bits, group.get("block_size") or ref.STATE_FORMATS[bits][2],
                self._v_cols(p, group, bits))

    @staticmethod
    def _unpack(fmt) -> tuple:
        return tuple(fmt) if len(fmt) == 3 else (*fmt, 0)

    @staticmethod
    def _quantize_into(state, name, j, values, fmt, device, kind="adam"):
        """Quantized state `name` (index j: 0 first, 1 second) of fp32 `values` into `state`;
        `kind` picks the codebooks (Sophia's second state is signed)."""
        bits, block, cols = FusedOptimizer._unpack(fmt)
        if j == 1 and cols:
            codes, *scales = ref.quantize_state_rank1(values.cpu(), cols)
        else:
            codes, *scales = ref.quantize_state(values.cpu(), j, bits, block, kind)
        state[name + "_codes"] = codes.to(device)
        for key, scale in zip(_scale_keys(name, cols if j == 1 else 0), scales):
            state[key] = scale.to(device)

    @staticmethod
    def _writeback(p, group) -> str:
        if p.dtype == torch.float32:
            return "f32"
        if group["kahan"]:
            return "kahan"
        return "stochastic" if group["stochastic_rounding"] else "nearest"

    def _fresh_state(self, p, group) -> dict:
        state = {"step": torch.tensor(0.0, dtype=torch.float32)}
        fmt = self._format_for(p, group)  # from the full parameter, the states for its shard
        lp = shard.local(p)
        for j, name in enumerate(self._state_names(group)):
            if fmt[0] == 32:
                state[name] = torch.zeros_like(lp, dtype=torch.float32,
                                               memory_format=torch.contiguous_format)
            else:
                self._quantize_into(state, name, j, torch.zeros(lp.numel()), fmt, lp.device,
                                    self._kind)
        if self._writeback(p, group) == "kahan":
            state["kahan_comp"] = torch.zeros_like(lp)
        state.update(self._fresh_clip_state(lp))
        return state

    @staticmethod
    def _check_state(p, state, names, fmt, where):
        """The state holds `fmt` tensors that fit p (the LOCAL shard of a DTensor parameter; fmt
        is the full parameter's): a state dict from another parameter layout (or optimizer)
        fails here with a clear error instead of corrupting memory."""
        n, (bits, block, cols) = p.numel(), FusedOptimizer._unpack(fmt)
        for j, name in enumerate(names):
            if j == 1 and cols:
                FusedOptimizer._check_rank1_state(p, state, name, cols, where)
                continue
            if bits == 32:
                t = state.get(name)
                if t is None:
                    raise RuntimeError(f"{where}: fp32 state {name!r} is missing. Was the state "
                                       "dict saved by another optimizer or with other settings?")
                if t.shape != p.shape or t.dtype != torch.float32:
                    raise RuntimeError(f"{where}: state {name!r} has shape {tuple(t.shape)} and "
                                       f"dtype {t.dtype}; the parameter has shape "
                                       f"{tuple(p.shape)}. Was the state dict saved for another "
                                       "model?")
                continue
            c, a = state.get(name + "_codes"), state.get(name + "_absmax")
            if c is None or a is None:
                raise RuntimeError(f"{where}: {bits}-bit state {name!r} is missing. Was the state "
                                   "dict saved by another optimizer or with other settings?")
            if (c.numel() != (n if bits == 8 else (n + 1) // 2) or c.dtype != torch.uint8
                    or a.numel() != -(-n // block) or a.dtype != torch.float32):
                raise RuntimeError(f"{where}: {bits}-bit state {name!r} ({c.numel()} codes, "
                                   f"{a.numel()} absmax) does not fit a parameter of {n} "
                                   f"elements in blocks of {block}. Was the state dict saved "
                                   "for another model?")

    @staticmethod
    def _check_rank1_state(p, state, name, cols, where):
        rows = p.numel() // cols
        c, r, k = (state.get(name + suffix) for suffix in ("_codes", "_row_max", "_col_max"))
        if c is None or r is None or k is None:
            raise RuntimeError(f"{where}: 4-bit rank-1 state {name!r} needs {name}_codes, "
                               f"{name}_row_max and {name}_col_max. Was the state dict saved by "
                               "another optimizer or with other settings?")
        if (c.numel() != (p.numel() + 1) // 2 or c.dtype != torch.uint8
                or r.numel() != rows or r.dtype != torch.float32
                or k.numel() != cols or k.dtype != torch.float32):
            raise RuntimeError(f"{where}: 4-bit rank-1 state {name!r} ({c.numel()} codes, "
                               f"{r.numel()} row maxima, {k.numel()} column maxima) does not fit "
                               f"a parameter of shape {tuple(p.shape)} viewed as ({rows}, {cols}) "
                               f"(codes {(p.numel() + 1) // 2}). Was the state dict saved for "
                               "another model?")

    @staticmethod
    def _state_format(fmt, j) -> tuple:
        """The format of state j alone: only the second state can be rank-1."""
        bits, block, cols = FusedOptimizer._unpack(fmt)
        return bits, block, cols if j == 1 else 0

    @staticmethod
    def _state_fp32(p, state, name, j, fmt, kind="adam") -> torch.Tensor:
        bits, block, cols = FusedOptimizer._state_format(fmt, j)
        if bits == 32:
            return state[name].float()
        if cols:
            return ref.dequantize_state_rank1(
                state[name + "_codes"].cpu(), state[name + "_row_max"].cpu(),
                state[name + "_col_max"].cpu(), p.shape).to(p.device)
        return ref.dequantize_state(state[name + "_codes"].cpu(), state[name + "_absmax"].cpu(),
                                    j, bits, p.shape, block, kind).to(p.device)

    def _moments_fp32(self, p, state, names, fmt):
        """The rule's states as fp32 tensors shaped like p."""
        return [self._state_fp32(p, state, name, j, fmt, self._kind)
                for j, name in enumerate(names)]

    def _adopt_state(self, p, state, group, saved_group, where) -> dict:
        """A loaded state converted to this optimizer's format for p (state_bits, block_size,
        second_moment_norm, kahan); each state tensor untouched when it already is (so a resumed
        run continues bit for bit, and switching v to rank-1 leaves m's codes as they were).
        `saved_group` describes how the state was stored."""
        if not state:
            return state
        names = self._state_names(group)
        if "max_exp_avg_sq" in state:
            raise ValueError(f"{where}: the state dict is from an amsgrad optimizer; lowbit's "
                             "Adam/AdamW do not implement amsgrad")
        state = dict(state)
        if "step" not in state:  # torch.optim.SGD keeps no step count
            state["step"] = torch.tensor(1.0)
        state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).cpu()
        for name in names:
            if name in state:  # e.g. torch's bf16 states of bf16 parameters
                state[name] = state[name].float()
            if name + "_codes" in state:
                if name in state:
                    # e.g. a compact state dict of a plain model given to
                    # set_optimizer_state_dict on an FSDP2 model: DCP merges its codes into the
                    # fp32 template states, and which one holds the data is unknowable
                    raise ValueError(f"{where}: the state holds both {name!r} (fp32) and "
                                     f"{name + '_codes'!r} (quantized); a state dict has one "
                                     "form per state. Save from the same kind of model (a "
                                     "plain model's state dict is compact; FSDP2's is fp32)")
                state[name + "_codes"] = state[name + "_codes"].to(torch.uint8)
        src = (32, 0, 0) if all(n in state for n in names) else self._format_for(p, saved_group)
        full, p = p, shard.local(p)  # formats from the full parameter, shapes of its shard
        self._check_state(p, state, names, src, where)
        want = self._format_for(full, group)
        for j, name in enumerate(names):
            if self._state_format(src, j) == self._state_format(want, j):
                continue
            value = self._state_fp32(p, state, name, j, src, self._kind)
            for k in (name, name + "_codes", name + "_absmax", name + "_row_max",
                      name + "_col_max"):
                state.pop(k, None)
            if want[0] == 32:
                state[name] = value.contiguous()
            else:
                self._quantize_into(state, name, j, value, want, p.device, self._kind)
        comp = state.pop("kahan_comp", None)
        if self._writeback(full, group) == "kahan":
            ok = comp is not None and comp.shape == p.shape and comp.dtype == p.dtype
            state["kahan_comp"] = comp if ok else torch.zeros_like(p)
        for name, fresh in self._fresh_clip_state(p).items():  # absent: a checkpoint without it
            value = state.get(name)
            ok = isinstance(value, torch.Tensor) and value.numel() == 1
            state[name] = value.reshape(()).float() if ok else fresh
        return state

    # --- state dicts ------------------------------------------------------------------------

    def load_state_dict(self, state_dict):
        """torch's semantics (hyperparameters and states restored, matched to parameters by
        position) with three differences: state tensors keep their dtype (torch would cast them to
        the parameter's, which breaks uint8 codes and fp32 states of bf16 parameters); states in
        another format (a torch.optim state dict, or other state_bits / block_size) are converted
        to this optimizer's; and everything is validated before anything changes."""
        groups, saved = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved):
            raise ValueError("loaded state dict has a different number of parameter groups")
        id_map = {}
        for g, sg in zip(groups, saved):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't "
                                 "match the size of optimizer's group")
            for pid, p in zip(sg["params"], g["params"]):
                id_map[pid] = (p, g, sg)
        new_groups, merged = [], {}
        for g, sg in zip(groups, saved):
            ng = {k: v for k, v in sg.items() if k not in ("params", "clip_step")}
            for k, v in g.items():
                if k in _CONFIG_KEYS or k not in ng:
                    ng[k] = v
            ng["params"] = g["params"]
            new_groups.append(ng)
            merged[id(g)] = ng
        new_state = defaultdict(dict)
        for pid, st in state_dict["state"].items():
            if pid not in id_map:
                continue
            p, g, sg = id_map[pid]
            # copies: the caller's dict (possibly loaded into another optimizer too) stays apart
            # (DTensor states, as torch.optim keeps under FSDP2: their local shards)
            # (DTensor states, as state_dict() gives them under FSDP2 and DCP loads them: the
            # part this rank's shard owns, quantized below into this shard's own blocks)
            moved = {k: (shard.local_like(v, p).to(shard.local(p).device, copy=True)
                         if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            saved_group = {**g, **_LEGACY_CONFIG,
                           **{k: v for k, v in sg.items() if k != "params"}}
            new_state[p] = self._adopt_state(p, moved, merged[id(g)], saved_group,
                                             f"state of parameter {pid}")
        # the clock from "clip", or from the groups when only state and param_groups were kept
        # (torch.distributed.checkpoint.state_dict keeps only those)
        clip_step = int(state_dict.get("clip", {}).get(
            "step", saved[0].get("clip_step", 0) if saved else 0))
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._clip_step = clip_step

    def state_dict(self):
        """torch's state dict plus "clip": {"step": the clip policies' clock} (with clip policies,
        also in every group as "clip_step", the part torch.distributed.checkpoint keeps).

        DTensor (FSDP2) parameters get their states in the reshardable form of torch.optim's
        under FSDP2 (lowbit.optim._checkpoint): each of the rule's states an fp32 DTensor laid
        out like the parameter (a quantized state dequantized from this shard's blocks), so DCP
        saves on N ranks and loads on M, and full_state_dict=True gathers whole tensors.
        Plain parameters keep the compact format (codes and absmax of quantized states)."""
        sd = super().state_dict()
        sd["clip"] = {"step": self._clip_step}
        if self.clip:
            for g in sd["param_groups"]:
                g["clip_step"] = self._clip_step
        owner = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, st in list(sd["state"].items()):
            p, group = owner[pid]
            if shard.is_dtensor(p) and st:
                sd["state"][pid] = ckpt.reshardable_state(self, p, group, st,
                                                          f"state of parameter {pid}")
        return sd

    def export_state_dict(self) -> dict:
        """The state dict with every state as an fp32 tensor shaped like its parameter under
        torch's names, and param_groups holding the keys of `_torch_class` — loadable by that
        torch optimizer (and by any lowbit optimizer, which converts back to the same codes and
        absmax: lowbit.optim._checkpoint.carry_absmax). Kahan compensations and clip-policy
        states are dropped (torch has none). DTensor (FSDP2) parameters export
        fp32 DTensors laid out like them, as that torch optimizer's state_dict() under FSDP2
        holds them (full_tensor() of each gives the unsharded state)."""
        sd = self.state_dict()
        export_state = {}
        owner = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, st in sd["state"].items():
            p, group = owner[pid]
            names = self._state_names(group)
            if shard.is_dtensor(p):  # state_dict() gave them as fp32 DTensors already
                values = [st[name] for name in names]
            else:
                fmt = self._format_for(p, group)
                self._check_state(p, st, names, fmt, f"state of parameter {pid}")
                values = ckpt.exact_fp32(self, p, st, names, fmt)
            out = {"step": st["step"].clone()}
            for name, value in zip(names, values):
                out[name] = value.clone()
            export_state[pid] = out
        keys = (self._torch_class([torch.zeros(1)]).defaults
                if self._torch_class is not None else None)
        groups = []
        for g in sd["param_groups"]:
            eg = ({k: g.get(k, v) for k, v in keys.items()} if keys
                  else {k: v for k, v in g.items() if k != "clip_step"})
            eg["params"] = g["params"]
            groups.append(eg)
        return {"state": export_state, "param_groups": groups}

    # --- the step ---------------------------------------------------------------------------

    def _grad_stats(self, grads, tau=None):
        """(the statistics, the capture (over, over_count) or None) of one group's gradients (the
        local shards of DTensor ones): one multi-tensor statistics pass (lowbit.ops.grad_stats;
        with the clip policies' thresholds tau, it also captures the elements above them)."""
        if not grads:
            return None, None
        grads = [g.contiguous() for g in grads]
        device = grads[0].device
        backend = ops.resolve_backend(self.backend, device)
        capture = None
        if tau is not None:
            # (the rows are read only up to each count: no need to clear them)
            capture = (torch.empty((len(grads), self._capture_capacity), device=device),
                       torch.zeros(len(grads), dtype=torch.int64, device=device))
            stats = ops.grad_stats_eager(grads, backend, tau=tau.to(device), over=capture[0],
                                         over_count=capture[1])
        else:
            stats = ops.grad_stats_eager(grads, backend)
        return stats, capture

    def _reduce_shards(self, plan):
        """The groups' statistics with the rows of sharded (FSDP2) parameters summed over their
        shards: one all-reduce of all groups' rows stacked (lowbit.optim._sharding; the maxima
        are reduced later, only if a clip policy reads them). Unchanged without sharding."""
        parts = [(k, s) for k, (_, _, s, _) in enumerate(plan) if s is not None]
        reducer = shard.ShardReducer([p for k, _ in parts for _, p, _ in plan[k][1]])
        if not reducer:
            return
        stats = reducer.sums(torch.cat([s for _, s in parts]))
        for (k, _), rows in zip(parts, stats.split([s.shape[0] for _, s in parts])):
            plan[k][2] = rows

    @staticmethod
    def _nonfinite_and_norms(plan):
        """Per group: (number of gradient tensors with inf/NaN, global L2 norm of the finite
        elements), in one host sync for all groups."""
        sums = [torch.stack([(s[:, 1] > 0).sum().double(), s[:, 0].sum()])
                for _, _, s, _ in plan if s is not None]
        values = iter(torch.cat(sums).tolist() if sums else [])
        out = []
        for _, _, s, _ in plan:
            if s is None:
                out.append((0, 0.0))
            else:
                bad, sumsq = next(values), next(values)
                out.append((int(bad), sumsq ** 0.5))
        return out

    # Under torch.compile the step runs eagerly (a graph break around it): its bookkeeping is host
    # code with syncs, and tracing it buys nothing, since the update itself is one custom op.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything is checked before any parameter or state changes: a bad gradient, a state
        # dict from another model, or (nonfinite="raise") a non-finite gradient raises with the
        # optimizer untouched.
        checked, pid = [], 0
        for gi, group in enumerate(self.param_groups):
            live = []
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    where = f"param_groups[{gi}]['params'][{pi}]"
                    _check_grad(p, p.grad, where)
                    live.append((pid, p, where))
                pid += 1
            stats, capture = self._grad_stats([shard.local(p.grad) for _, p, _ in live],
                                              self._capture_tau(live))
            checked.append([group, live, stats, capture])
        # FSDP2: the statistics of the whole parameters, the same on every rank, so every rank
        # takes the same skip decision and clip scales
        self._reduce_shards(checked)
        plan, info = [], []
        for gi, ((group, live, stats, capture), (bad, norm)) in enumerate(
                zip(checked, self._nonfinite_and_norms(checked))):
            if bad and self.nonfinite == "raise":
                raise FloatingPointError(
                    f"param_groups[{gi}]: {bad} gradient tensor(s) contain inf or NaN "
                    "(nonfinite='raise'); pass nonfinite='skip' to skip such steps instead")
            info.append({"skipped": bool(bad), "nonfinite_tensors": bad, "grad_norm": norm})
            plan.append((group, live, bool(bad), stats, capture))
        fmts = {}  # id(p) -> its state format this step (the fused calls need it again)
        for group, live, skip, *_ in plan:
            names = self._state_names(group)
            for _, p, where in live:
                fmt = fmts[id(p)] = self._format_for(p, group)  # the full parameter's
                if fmt[2] and shard.shard_group(p) is not None:
                    raise NotImplementedError(
                        f"{where}: second_moment_norm='rank1' on a sharded (FSDP2) parameter is "
                        "not supported yet (its column maxima span every shard); use "
                        "second_moment_norm='block' for sharded parameters")
                state = self.state[p]
                if len(state) == 0:
                    state.update(self._fresh_state(p, group))
                self._check_state(shard.local(p), state, names, fmt, where)
        ctx = self._run_clip_policies(plan)
        row = 0
        for group, live, skip, *_ in plan:
            if skip:
                group["skipped_steps"] += 1
                continue
            self._step_group(group, live, ctx, row, fmts)
            row += len(live)
        if ctx is not None:
            self._finish_clip(ctx)
        self.last_step_info = info
        return loss

    def _step_group(self, group, live, ctx=None, row0=0, fmts=None):
        """The group's fused calls; ctx: the clip policies' context, whose rows row0.. are this
        group's live tensors; fmts: id(p) -> state format, as step() found them."""
        names = self._state_names(group)
        # one fused call per (state bits and block, step, device, dtype, write-back): rank-1 and
        # block-wise second states share it (v_cols says which is which)
        buckets = {}
        # the step counts in one host read (an .item() per parameter adds up with many tensors)
        steps = torch.stack([self.state[p]["step"] for _, p, _ in live]).tolist()
        for i, ((pid, p, where), step) in enumerate(zip(live, steps)):
            step = int(step) + 1
            bits, block, cols = (fmts[id(p)] if fmts is not None
                                 else self._format_for(p, group))
            key = ((bits, block), step, p.device, p.dtype, self._writeback(p, group),
                   self._bucket_extra(p, group))
            buckets.setdefault(key, []).append((pid, p, cols, row0 + i))
        for ((bits, block), step, device, dtype, wb, extra), items in buckets.items():
            ps = [p for _, p, _, _ in items]
            v_cols = [cols for _, _, cols, _ in items] if any(c for _, _, c, _ in items) else []
            states = [[], [], [], []]
            for j, name in enumerate(names):
                for p, (_, _, cols, _) in zip(ps, items):
                    st = self.state[p]
                    if bits == 32:
                        states[2 * j].append(st[name])
                    else:
                        states[2 * j].append(st[name + "_codes"])
                        states[2 * j + 1].append(st[_scale_keys(name, cols if j else 0)[0]])
            # column maxima of the rank-1 states (a never-read empty tensor for the others)
            unused = torch.empty(0, device=device) if v_cols else None
            v_colmax = [self.state[p][names[1] + "_col_max"] if cols else unused
                        for p, cols in zip(ps, v_cols)]
            comps = [self.state[p]["kahan_comp"] for p in ps] if wb == "kahan" else []
            keys = ([ref.sr_key(group["seed"], pid, step) for pid, _, _, _ in items]
                    if wb == "stochastic" else [])
            scalars, flags, table, counts = self._step_args(group, step, ctx,
                                                            [r for _, _, _, r in items], device,
                                                            extra)
            hess, hess_flags = self._hessian_args(group, ps)
            flags |= hess_flags
            backend = ops.resolve_backend(self.backend, device)
            # DTensor (FSDP2) parameters: the kernels step their local shards
            data = [shard.local(p).data for p in ps]
            grads = [shard.local(p.grad).contiguous() for p in ps]
            if ctx is not None and ctx.update_clip is not None:
                def rms_pass(sums):
                    ops.optim_step_eager(data, grads, *states, comps, keys, self._kind, bits,
                                         block, scalars, flags, wb, backend, v_cols, v_colmax,
                                         table, None, sums)
                table, flags = self._update_clip(group, step, ctx, [r for _, _, _, r in items],
                                                 table, scalars, flags,
                                                 [p.numel() for p in ps], rms_pass)
            ops.optim_step_eager(data, grads, *states, comps, keys, self._kind, bits, block,
                                 scalars, flags, wb, backend, v_cols, v_colmax, table, counts,
                                 hess=hess)
            if counts is not None:
                ctx.clipped.index_add_(0, torch.tensor([r for _, _, _, r in items],
                                                       device=ctx.clipped.device),
                                       counts.to(ctx.clipped.device))
            # as an in-place torch op on the parameters would (torch.optim's updates do this too;
            # on a DTensor, its local shard changed too)
            torch.autograd.graph.increment_version(ps)
            if any(shard.is_dtensor(p) for p in ps):
                torch.autograd.graph.increment_version([shard.local(p) for p in ps
                                                        if shard.is_dtensor(p)])
            torch._foreach_add_([self.state[p]["step"] for p in ps], 1.0)
            self._after_fused(group, ps)
