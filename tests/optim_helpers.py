"""Test helpers: drive lowbit.ops.optim_step (the reference backend unless told otherwise) on one
tensor at a time, keeping its states in the layout of the op (lists of one tensor)."""
import torch

from lowbit import ops
from lowbit.reference import optim as ref


class RefTensor:
    """One parameter and its states under the fused step of `backend`."""

    def __init__(self, p, kind="adam", state_bits=32, nstates=None, writeback="f32",
                 backend="reference", v_cols=0):
        self.p = p.clone()
        self.backend = backend
        self.kind, self.bits, self.writeback = kind, state_bits, writeback
        # v_cols > 0: the second state is rank-1 over the [numel // v_cols, v_cols] view
        self.v_cols, self.colmax = v_cols, []
        nstates = len(ref.STATE_NAMES[kind]) if nstates is None else nstates
        self.states = [[], [], [], []]
        for j in range(nstates):
            if state_bits == 32:
                self.states[2 * j].append(torch.zeros(p.shape))
            elif j == 1 and v_cols:
                codes, rows, cols = ref.quantize_state_rank1(torch.zeros(p.numel()), v_cols)
                self.states[2].append(codes)
                self.states[3].append(rows)
                self.colmax.append(cols)
            else:
                codes, absmax = ref.quantize_state(torch.zeros(p.numel()), j, state_bits)
                self.states[2 * j].append(codes)
                self.states[2 * j + 1].append(absmax)
        self.comps = [torch.zeros_like(p)] if writeback == "kahan" else []

    def step(self, g, scalars, key=0, **flag_kw):
        flags = ref.step_flags(self.kind, scalars, **flag_kw)
        keys = [key] if self.writeback == "stochastic" else []
        ops.optim_step([self.p], [g.contiguous()], *self.states, self.comps, keys, self.kind,
                       self.bits, 0, scalars, flags, self.writeback, self.backend,
                       [self.v_cols] if self.v_cols else [], self.colmax)
        return self.p

    def fp32_states(self):
        out = []
        for j in range(len([s for s in self.states[0::2] if s])):
            st, am = self.states[2 * j][0], (self.states[2 * j + 1] or [None])[0]
            if self.bits == 32:
                out.append(st)
            elif j == 1 and self.v_cols:
                out.append(ref.dequantize_state_rank1(st, am, self.colmax[0], self.p.shape))
            else:
                out.append(ref.dequantize_state(st, am, j, self.bits, self.p.shape))
        return out
