#!/usr/bin/env python
"""lowbit.nn benchmark: the CPU cost of QuantLinear's simulated low precision.

For one layer (default 4096 x 4096 weight, 2048 tokens, fp32), per preset (INT4, FP8, FP4):
  * forward + backward of QuantLinear vs nn.Linear (the matmuls dominate both);
  * the quantization itself, apart from the matmuls: the fused fake-quant kernel on each tensor
    the layer quantizes (weight and activation in the forward, the output gradient in the
    backward, with the preset's Hadamard rotations), charged 8 B per fp32 element (read x, write
    the dequantized values), against the fp32 copy bandwidth measured interleaved with it: a
    copy of as many bytes as the row charges (a smaller copy runs partly in the last-level
    cache — 66 GB/s for 32 MB against 45-48 GB/s from 64 MB up on the 32 MB-L3 EPYC — and would
    set the bar above the memory bandwidth the quantization streams through);
  * lowbit's fused quantize + dequantize vs the unfused PyTorch sequence a user writes today
    (absmax, divide, round, clamp, multiply as separate torch ops; the rotation as a matmul with
    the Hadamard matrix; E2M1 rounding by bucketize). Those sequences compute the same format but
    are not bit-identical to lowbit's rules (ties, the e8m0 ceiling): they are a speed peer.

Usage: python bench/nn_bench.py [--quick] [--tokens T] [--dim D] [--threads N] [--reps R]
`python bench/run.py --families nn` puts these rows in the suite's report; `collect` is the
function it calls.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import Bench, reexec_steady  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 256 x 256 layer, 64 tokens, few reps")
    p.add_argument("--dim", type=int, default=None, help="layer width (default 4096)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 2048)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    p.add_argument("--n", type=int, default=None, help="ignored (the suite's common option)")
    p.add_argument("--out", default=None, help="ignored (the suite's common option)")
    p.add_argument("--no-peers", action="store_true", help="skip the unfused PyTorch rows")
    a = p.parse_args(argv)
    a.dim = a.dim or (256 if a.quick else 4096)
    a.tokens = a.tokens or (64 if a.quick else 2048)
    a.reps = a.reps or (3 if a.quick else 5)
    a.warmup, a.min_reps, a.max_seconds = 1, min(a.reps, 3), 60.0
    return a


if __name__ == "__main__":
    ARGS = parse_args()
    reexec_steady(__file__, ARGS.threads)

import torch  # noqa: E402  (after the re-exec)

from lowbit import lowprec  # noqa: E402
from lowbit.nn import FP4, FP8, INT4, QuantLinear  # noqa: E402
from lowbit.reference.hadamard import hadamard_matrix  # noqa: E402
from lowbit.reference.lowprec import E2M1_VALUES, FMT_MAX  # noqa: E402

PRESETS = {"int4": INT4, "fp8": FP8, "fp4": FP4}
ROLES = ("weight", "activation", "grad_output")


# --- the unfused PyTorch sequences (speed peers, same formats, not lowbit's exact rules) --------

def _groups(x, spec):
    """x as (groups, elements) for block / row scaling (the presets use only these)."""
    return x.reshape(-1, spec.block_size if spec.scaling == "block" else x.shape[-1])


def _e2m1_round(y, stochastic):
    grid = torch.tensor(E2M1_VALUES)
    a = y.abs()
    if stochastic:
        lo = (torch.bucketize(a, grid, right=True) - 1).clamp(0, 6)
        glo, ghi = grid[lo], grid[lo + 1]
        mag = torch.where(torch.rand_like(a) < (a - glo) / (ghi - glo), ghi, glo)
    else:
        mag = grid[torch.bucketize(a, (grid[1:] + grid[:-1]) / 2)]
    return torch.copysign(mag, y)


def torch_fake_quant(x, spec):
    """absmax scaling, divide, round onto the grid, multiply back: one torch op per step."""
    h = None
    if spec.hadamard:
        h = hadamard_matrix(spec.hadamard_block, torch.float32)
        x = (x.reshape(-1, spec.hadamard_block) @ h).view(x.shape)
    g = _groups(x, spec)
    fmax = FMT_MAX[spec.format]
    s = g.abs().amax(1, keepdim=True) / fmax
    if spec.scale_format == "e8m0":
        s = torch.exp2(torch.ceil(torch.log2(s)))
    y = g / s
    if spec.format in ("int8", "int4"):
        if spec.rounding == "stochastic":
            y = torch.floor(y + torch.rand_like(y))
        q = y.round().clamp(-fmax, fmax)
    elif spec.format == "e2m1":
        q = _e2m1_round(y, spec.rounding == "stochastic")
    else:
        q = y.to({"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[spec.format]).float()
    out = (q * s).view(x.shape)
    if h is not None:
        out = (out.reshape(-1, spec.hadamard_block) @ h).view(x.shape)
    return out


def lowbit_fake_quant(x, spec):
    return lowprec.fake_quant(x, spec, 1, hadamard_block=spec.hadamard_block
                              if spec.hadamard else 0)


# --- measurements ------------------------------------------------------------------------------

def _layer_step(layer, x, g):
    def run():
        x.grad = None
        layer.weight.grad = layer.bias.grad = None
        layer(x).backward(g)
    return run


def collect(args):
    """Rows: dicts with group, label, kind ("lowbit" | "peer" | "baseline"), ms, reps,
    bytes (charged), copy_ms and copy_bytes (the interleaved copy), note."""
    torch.manual_seed(0)
    d, t = args.dim, args.tokens
    x = torch.randn(t, d, requires_grad=True)
    g = torch.randn(t, d)
    linear = torch.nn.Linear(d, d)
    tensors = {"weight": linear.weight.detach(), "activation": x.detach(), "grad_output": g}
    benches = {}

    def bench(nbytes):
        """The copy-interleaved timer whose copy moves `nbytes` (nbytes / 8 fp32 elements)."""
        n = nbytes // 8
        if n not in benches:
            benches.clear()  # one pair of copy buffers at a time (the largest is ~270 MB)
            benches[n] = Bench(n, args)
        return benches[n]

    rows = []

    def add(group, label, kind, timing, nbytes=None, note="", copy_bytes=8 * t * d):
        rows.append(dict(group=group, label=label, kind=kind, ms=timing.median * 1e3,
                         reps=len(timing.times), bytes=nbytes, copy_ms=timing.copy_median * 1e3,
                         copy_bytes=copy_bytes, note=note))

    layer_group = f"QuantLinear forward + backward, {d}x{d}, {t} tokens, fp32"
    base = bench(8 * t * d).time(_layer_step(linear, x, g))
    add(layer_group, "torch nn.Linear", "baseline", base, note="the matmuls alone")
    for name, cfg in PRESETS.items():
        q = QuantLinear.from_linear(linear, cfg)
        tm = bench(8 * t * d).time(_layer_step(q, x, g))
        add(layer_group, f"lowbit QuantLinear {name}", "lowbit", tm,
            note=f"{tm.median / base.median:.3f}x nn.Linear")

    for name, cfg in PRESETS.items():
        specs = {r: getattr(cfg, r) for r in ROLES if getattr(cfg, r) is not None}
        nbytes = sum(8 * tensors[r].numel() for r in specs)
        over_group = f"quantization overhead per forward + backward, {d}x{d}, {t} tokens"
        tm = bench(nbytes).time(lambda: [lowbit_fake_quant(tensors[r], s)
                                         for r, s in specs.items()])
        add(over_group, f"lowbit {name} ({', '.join(specs)})", "lowbit", tm, nbytes,
            note="fused fake-quant kernels, 8 B per fp32 element", copy_bytes=nbytes)
        for role, spec in specs.items():
            src = tensors[role]
            what = f"{spec.format} {spec.scaling}{spec.block_size if spec.scaling == 'block' else ''}" \
                   f"{', e8m0' if spec.scale_format == 'e8m0' else ''}" \
                   f"{', hadamard ' + str(spec.hadamard_block) if spec.hadamard else ''}" \
                   f"{', stochastic' if spec.rounding == 'stochastic' else ''}"
            group = f"fake quant of the {role} ({tuple(src.shape)}), {what}"
            if any(r["group"] == group for r in rows):
                continue
            nb = 8 * src.numel()
            mine = bench(nb).time(lambda: lowbit_fake_quant(src, spec))
            add(group, "lowbit fused fake_quant", "lowbit", mine, nb, copy_bytes=nb)
            if not args.no_peers:
                peer = bench(nb).time(lambda: torch_fake_quant(src, spec))
                add(group, "torch unfused sequence", "peer", peer, nb, copy_bytes=nb)
    return rows


def main(args):
    for r in collect(args):
        bw = ""
        if r["bytes"]:
            gbps = r["bytes"] / r["ms"] * 1e-6
            bw = f"  {gbps:6.2f} GB/s ({gbps / (r['copy_bytes'] / r['copy_ms'] * 1e-6):.2f}x copy)"
        print(f"{r['group'][:60]:60s} {r['label']:34s} {r['ms']:9.2f} ms{bw}  {r['note']}")


if __name__ == "__main__":
    main(ARGS)
