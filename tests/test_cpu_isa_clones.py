"""The CPU kernels are compiled three times (AVX-512, AVX2, scalar) and dispatched at run time;
this machine picks one, so each other clone is forced through LOWBIT_CPU_ISA in a subprocess and
checked against the reference bit for bit."""
import os
import subprocess
import sys

import pytest

import lowbit

CHECK = r"""
import torch, lowbit
from lowbit import _ext
print(_ext.C.isa())
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = (torch.randn(5000) * torch.exp(torch.randn(5000) * 2)).to(dtype)
    x[7] = 0.0
    for code in ("dynamic", "udynamic", "nf4", "dynamic4", "linear4_nozero"):
        for st in (False, True):
            a = lowbit.quantize_blockwise(x, code, 128, stochastic=st, seed=3, backend="cpu")
            b = lowbit.quantize_blockwise(x, code, 128, stochastic=st, seed=3, backend="reference")
            assert torch.equal(a.codes, b.codes) and torch.equal(a.absmax, b.absmax), (dtype, code, st)
            for out in (torch.float32, torch.bfloat16, torch.float16):
                assert torch.equal(lowbit.dequantize_blockwise(a, dtype=out, backend="cpu"),
                                   lowbit.dequantize_blockwise(a, dtype=out, backend="reference"))
x = torch.randn(70000) * 300
for dt in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
    a = lowbit.stochastic_round(x, dt, seed=5, offset=11, backend="cpu")
    b = lowbit.stochastic_round(x, dt, seed=5, offset=11, backend="reference")
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), dt
# the raw stream (Hessian probes): word 0 alone, and two words through the four-word fill
from lowbit.rounding import philox_words
for words in (1, 2):
    assert torch.equal(philox_words(5003, seed=9, counter0=2**32 - 2000, words=words, backend="cpu"),
                       philox_words(5003, seed=9, counter0=2**32 - 2000, words=words,
                                    backend="reference"))
# the rank-1 second moment's prepass and step (odd row lengths: rows start on either nibble)
import lowbit.optim as lo
def rank1_run(backend):
    torch.manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in ((37, 129), (1100, 5))]
    opt = lo.Adam4bit(ps, weight_decay=0.1, second_moment_norm="rank1", backend=backend)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape)
        opt.step()
    return [t for p in ps for t in (p, *opt.state[p].values())]
for a, b in zip(rank1_run("cpu"), rank1_run("reference")):
    assert torch.equal(a, b)
# the 8-bit step (the AVX-512 clone decodes its codes by byte-plane lookups where the CPU has
# VBMI, by gathers otherwise or under LOWBIT_CPU_NO_VBMI=1); tensors end mid-piece and mid-block
def adam8_run(backend):
    torch.manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in ((300,), (70, 131))]
    opt = lo.AdamW8bit(ps, weight_decay=0.1, min_quant_numel=0, backend=backend)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape)
        opt.step()
    return [t for p in ps for t in (p, *opt.state[p].values()) if torch.is_tensor(t)]
for a, b in zip(adam8_run("cpu"), adam8_run("reference")):
    assert torch.equal(a, b)
print("ok")
"""


@pytest.mark.skipif("cpu" not in lowbit.available_backends(), reason="lowbit._C is not built")
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_forced_isa_clone_matches_reference(isa):
    env = dict(os.environ, LOWBIT_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    chosen, status = res.stdout.split()[-2:]
    if isa == "avx2" and chosen == "scalar":
        pytest.skip("this CPU has no AVX2; the scalar clone is covered by the other case")
    assert chosen == isa and status == "ok"


@pytest.mark.skipif("cpu" not in lowbit.available_backends(), reason="lowbit._C is not built")
def test_avx512_gather_decode_matches_reference():
    """The AVX-512 clone's gather decode of 8-bit codes, which CPUs with VBMI skip for byte-plane
    lookups (on those, the rest of the suite runs the lookups)."""
    env = dict(os.environ, LOWBIT_CPU_NO_VBMI="1")
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    chosen, status = res.stdout.split()[-2:]
    if chosen != "avx512":
        pytest.skip(f"this CPU runs the {chosen} clone, which has no AVX-512 decode")
    assert status == "ok"
