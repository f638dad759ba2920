"""pytest-benchmark tests of one clipped optimizer step: lowbit's fused clipping (statistics pass
and policy in the one fused 8-bit update) vs the unfused sequences users write today
(torch.nn.utils.clip_grad_norm_ + torch AdamW fused / bitsandbytes AdamW8bit) and
pytorch-optimizer's 32-bit SPAM, StableSPAM, AdaGC and StableAdamW, on 2**22 fp32 parameters in
8 tensors. Peers are skipped when not installed.

Before it is timed, every case takes 3 steps from fresh parameters, on gradients whose scale
changes from step to step (so a clip acts), and checks its parameter change against the 32-bit
reference of its algorithm (torch's clip_grad_norm_ + AdamW, pytorch-optimizer's classes with
their defaults): an unclipped step misses the global-norm reference by ~0.3, the 8-bit steps
agree to ~0.01.

    pytest bench/test_bench_clip.py --benchmark-enable
"""
import pytest
import torch

from _cases import ClipThenStep, require_lowbit_cpu, update_error

N = 2**22
MAX_NORM = 0.1   # below the gradients' global norm: every step is clipped


def _lowbit(name):
    require_lowbit_cpu()
    import lowbit.optim as lo
    from lowbit import clip
    if name == "AdamW8bit+NormClip":
        return lambda ps: lo.AdamW8bit(ps, clip=clip.NormClip(MAX_NORM))
    return getattr(lo, name)


def _pto(name):
    pto = pytest.importorskip("pytorch_optimizer")
    return getattr(pto, name)


def _norm_clip_ref(ps):
    return ClipThenStep(ps, torch.optim.AdamW(ps, foreach=False), MAX_NORM)


def _bnb_clip(ps):
    bnb = pytest.importorskip("bitsandbytes")
    return ClipThenStep(ps, bnb.optim.AdamW8bit(ps), MAX_NORM)


# (group, id, factory, reference, tolerance)
CASES = [
    ("global-norm clip + AdamW", "lowbit-fused-8bit", lambda: _lowbit("AdamW8bit+NormClip"),
     lambda: _norm_clip_ref, 0.03),
    ("global-norm clip + AdamW", "clip_grad_norm_+torch-fused",
     lambda: lambda ps: ClipThenStep(ps, torch.optim.AdamW(ps, fused=True), MAX_NORM),
     lambda: _norm_clip_ref, 1e-3),
    ("global-norm clip + AdamW", "clip_grad_norm_+bitsandbytes-8bit", lambda: _bnb_clip,
     lambda: _norm_clip_ref, 0.03),
]
for _name in ("SPAM", "StableSPAM", "AdaGC", "StableAdamW"):
    CASES += [(_name, "lowbit-8bit", lambda n=_name: _lowbit(f"{n}8bit"),
               lambda n=_name: _pto(n), 0.03),
              (_name, "pytorch-optimizer-32bit", lambda n=_name: _pto(n),
               lambda n=_name: _pto(n), 1e-6)]
CASES.append(("StableSPAM", "lowbit-4bit", lambda: _lowbit("StableSPAM4bit"),
              lambda: _pto("StableSPAM"), 0.25))


@pytest.mark.parametrize("group,impl,make,reference,tol", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_clipped_step(benchmark, group, impl, make, reference, tol):
    err, opt, _ = update_error(make(), reference(), N)
    assert err < tol, f"{group} {impl}: relative update error {err:.3e}"
    benchmark.group = f"clipped step: {group}, {N} fp32 params in 8 tensors"
    benchmark(opt.step)
