"""The fused step inside torch.compile: lowbit::optim_step and lowbit::grad_stats are custom ops
with fake implementations, so dynamo traces them as single nodes (fullgraph, no graph break)."""
import torch

import lowbit.optim as lo
from lowbit import ops
from lowbit.reference import optim as ref


def test_fused_update_compiles_fullgraph_and_equals_eager():
    torch._dynamo.reset()
    params = [torch.randn(4097), torch.randn(300)]
    grads = [torch.randn_like(p) for p in params]
    sc = ref.adam_scalars(1e-3, 0.9, 0.999, 1e-8, 1e-2, 1)
    flags = ref.step_flags("adam", sc)

    def update(ps, gs, m, v):
        stats = ops.grad_stats(gs, "cpu")
        ops.optim_step(ps, gs, m, [], v, [], [], [], "adam", 32, 0, sc, flags, "f32", "cpu", [],
                       [])
        return stats

    def state():
        return [p.clone() for p in params], [torch.zeros_like(p) for p in params], [
            torch.zeros_like(p) for p in params]

    pe, me, ve = state()
    se = update(pe, grads, me, ve)
    pc, mc, vc = state()
    sc_ = torch.compile(update, fullgraph=True, backend="eager")(pc, grads, mc, vc)
    assert torch.equal(se, sc_)
    for a, b in zip(pe + me + ve, pc + mc + vc):
        assert torch.equal(a, b)


def test_rank1_update_compiles_fullgraph_and_equals_eager():
    # the rank-1 lists (v_cols, and v_colmax, mutated in place like absmax2) through dynamo
    torch._dynamo.reset()
    params = [torch.randn(37, 129), torch.randn(5000)]
    grads = [torch.randn_like(p) for p in params]
    sc = ref.adam_scalars(1e-3, 0.9, 0.999, 1e-8, 1e-2, 1)
    flags = ref.step_flags("adam", sc)

    def update(ps, gs, states, v_colmax):
        ops.optim_step(ps, gs, *states, [], [], "adam", 4, 0, sc, flags, "f32", "cpu", [129, 0],
                       v_colmax)

    def state():
        m = [ref.quantize_state(torch.zeros(p.numel()), 0, 4) for p in params]
        v0 = ref.quantize_state_rank1(torch.zeros(params[0].numel()), 129)
        v1 = ref.quantize_state(torch.zeros(params[1].numel()), 1, 4)
        states = [[x[0] for x in m], [x[1] for x in m], [v0[0], v1[0]], [v0[1], v1[1]]]
        return [p.clone() for p in params], states, [v0[2], torch.empty(0)]

    pe, se, ce = state()
    update(pe, grads, se, ce)
    pc, sc_, cc = state()
    torch.compile(update, fullgraph=True, backend="eager")(pc, grads, sc_, cc)
    assert ce[0].abs().sum() > 0
    for a, b in zip(pe + sum(se, []) + ce, pc + sum(sc_, []) + cc):
        assert torch.equal(a, b)


def test_compiled_training_step_equals_eager():
    # inductor-compiled model + lowbit optimizer step in the same compiled function (the step
    # runs eagerly behind a graph break: torch.compiler.disable).
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                    torch.nn.Linear(64, 4))
        return model, lo.AdamW8bit(model.parameters(), lr=1e-2, min_quant_numel=0)

    def train_step(model, opt, x, y):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        return loss

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 32, generator=g), torch.randn(16, 4, generator=g))
               for _ in range(5)]
    m1, o1 = make()
    eager = [train_step(m1, o1, x, y).item() for x, y in batches]
    m2, o2 = make()
    step = torch.compile(train_step)
    compiled = [step(m2, o2, x, y).item() for x, y in batches]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-5, rtol=1e-5)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
