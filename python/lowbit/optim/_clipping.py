"""The clip policies' part of the lowbit optimizers' step (lowbit.clip.policies): build the
policies' context from the statistics pass, run them, and hand each fused call its scalars, flags,
clip-table rows and clipped-element counters. Mixed into _base.FusedOptimizer."""
import torch

from .. import ops
from ..clip import policies as clip_policies
from ..reference import optim as ref
from . import _sharding as shard


class ClipSteps:
    _step_size_slot = {"adam": 6, "lion": 5, "sgd": 3}  # the scalar the lr warmup multiplies
    _decay_after = False  # SPAM applies the decoupled decay after the update

    def _init_clip(self, clip):
        self.clip = clip_policies.as_policies(clip)
        for policy in self.clip:
            if self._kind not in policy.kinds:
                raise ValueError(f"clip: {type(policy).__name__} needs an Adam-family optimizer "
                                 f"(it reads the second moment), not {type(self).__name__}")
        self._clip_step = 0  # optimizer steps the clip policies have seen (their clock)
        # After each step with clip policies: device tensors (no sync until read) — "step",
        # "grad_norm" (global L2 norm of the finite gradient elements before clipping),
        # "tensor_norms" and "scale" (per live tensor: its norm before clipping, its scalar clip
        # factor), "clipped" (per live tensor, elements an element-wise clip changed),
        # "spike_clip" / "reset" (bools), plus policy extras ("clip_norm", "adagn_norm",
        # "update_rms").
        self.last_clip_info = {}

    # Elements per tensor the statistics pass may capture above AdaClip's lower threshold: a
    # handful per step in practice (the threshold follows the largest |g| of recent steps); a
    # tensor with more takes the second statistics pass instead.
    _capture_capacity = 1024

    def _capture_tau(self, live):
        """Per live tensor, the threshold above which the statistics pass captures elements for
        AdaGN's norm after AdaClip (lowbit.clip.AdaClip.lower_threshold), or None when no policy
        needs it."""
        ada = [p for p in self.clip if isinstance(p, clip_policies.AdaClip)]
        if not ada or not live or not any(isinstance(p, clip_policies.AdaGN) for p in self.clip) \
                or any(isinstance(p, clip_policies.ValueClip) for p in self.clip):
            return None
        if any(shard.shard_group(p) is not None for _, p, _ in live):
            # FSDP2: whether the capture overflowed is a per-rank fact, and every rank must take
            # the same path; AdaGN's norm comes from the (reduced) second statistics pass instead
            return None
        device = live[0][1].device
        zero = torch.zeros((), dtype=torch.float32, device=device)
        m = torch.stack([self.state[p].get("adaclip_max", zero).to(device) for _, p, _ in live])
        return ada[0].lower_threshold(m, self._clip_step + 1)

    def _fresh_clip_state(self, p) -> dict:
        return {name: torch.tensor(value, dtype=torch.float32, device=p.device)
                for policy in self.clip for name, value in policy.tensor_state.items()}

    def _run_clip_policies(self, plan):
        """The clip policies over the live tensors of every group that steps (a ClipContext for
        the kernels), or None without policies."""
        params = [p for _, live, skip, *_ in plan if not skip for _, p, _ in live]
        if not self.clip or not params:
            return None
        device = params[0].device
        stats = torch.cat([s.to(device) for _, live, skip, s, _ in plan if not skip and live])
        captures = [c for _, live, skip, _, c in plan if not skip and live]
        grads = [shard.local(p.grad).contiguous() for p in params]
        t = self._clip_step + 1
        ctx = clip_policies.ClipContext(grads, stats, t,
                                        ops.resolve_backend(self.backend, device), device)
        reducer = shard.ShardReducer(params)
        if reducer:  # FSDP2: further statistics of sharded gradients are reduced over shards
            ctx.reducer = reducer
        if all(c is not None for c in captures):
            ctx.capture = tuple(torch.cat([c[k].to(device) for c in captures]) for k in (0, 1))
        for name in {n for policy in self.clip for n in policy.tensor_state}:
            ctx.state[name] = torch.stack([self.state[p][name].to(device) for p in params])
        for policy in self.clip:
            policy.apply(ctx)
        ctx.finish()
        for name, values in ctx.state.items():  # write the per-tensor policy states back
            torch._foreach_copy_([self.state[p][name] for p in params], list(values.unbind()))
        if ctx.restart_bias_correction:
            torch._foreach_zero_([self.state[p]["step"] for p in params])
        ctx.clipped = torch.zeros(len(params), dtype=torch.int64, device=device)
        self._clip_step = t
        return ctx

    def _finish_clip(self, ctx):
        info = {"step": ctx.step, "grad_norm": ctx.raw[:, 0].sum().sqrt(),
                "tensor_norms": ctx.raw[:, 0].sqrt(), "scale": ctx.scale,
                "clipped": ctx.clipped, "spike_clip": bool(ctx.flags & ref.SPIKE_CLIP),
                "reset": bool(ctx.flags & ref.RESET)}
        info.update(ctx.telemetry)
        self.last_clip_info = info

    def _step_args(self, group, step, ctx, rows, device, extra=None):
        """(scalars, flags, clip table rows, clipped counters) of one fused call over the live
        tensors `rows` of the clip context (None: no clipping); extra: the bucket's
        _bucket_extra, passed on to _scalars when not None."""
        if ctx is None:
            scalars, flag_kw = (self._scalars(group, step) if extra is None
                                else self._scalars(group, step, extra))
            return scalars, ref.step_flags(self._kind, scalars, **flag_kw), None, None
        scalars, flag_kw = self._scalars(group, step, beta1_scale=ctx.beta1_scale)
        scalars = list(scalars)
        slot = self._step_size_slot[self._kind]
        scalars[slot] = ref.f32(scalars[slot] * ctx.lr_scale)
        floor = ctx.spike_floor if ctx.spike_floor is not None else group.get("eps", 0.0) ** 2
        scalars = ref.with_clip_scalars(scalars, ctx.value_clip, ctx.spike_threshold, floor)
        flags = ref.step_flags(self._kind, scalars, **flag_kw) | ctx.flags
        if self._decay_after:
            flags |= ref.DECAY_AFTER
        index = torch.tensor(rows, device=ctx.table.device)
        table = ctx.table.index_select(0, index).to(device).contiguous()
        counts = torch.zeros(len(rows), dtype=torch.int64, device=device)
        return scalars, flags, table, counts

    def _update_clip(self, group, step, ctx, rows, table, scalars, flags, numel, rms_pass):
        """UpdateClip's part of one fused call: rms_pass(sums) runs the kernel's statistics pass
        (writes nothing), then each tensor's clip row gets its step size (the group's times the
        policy's factor, rounded once) and decay factor. Returns (table, flags) of the update."""
        policy = ctx.update_clip
        sums = torch.zeros(len(rows), dtype=torch.float64, device=table.device)
        rms_pass(sums)
        if ctx.reducer is not None:  # FSDP2: the shards' sums, over the full numel
            sums = ctx.reducer.row_sums(sums, rows)
        numel = torch.tensor(numel, dtype=torch.float64, device=table.device)
        rms, factor = policy.factors(sums, numel, group["betas"][1], step)
        table = table.clone()
        table[:, 4] = (scalars[self._step_size_slot["adam"]] * factor).float()
        if flags & ref.DECAY and policy.decay == "clipped":
            table[:, 5] = (1.0 - float(group["lr"]) * group["weight_decay"] * factor).float()
        else:
            table[:, 5] = scalars[0]
        index = torch.tensor(rows, device=ctx.device)
        ctx.telemetry["update_rms"].index_copy_(0, index, rms.to(ctx.device))
        return table, flags | ref.UPDATE_SCALE
