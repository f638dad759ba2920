#!/usr/bin/env python
"""Clipped optimizer steps: lowbit's fused clipping (statistics pass + policies on the device +
the one fused update) against the unfused sequences users write today — torch's clip_grad_norm_
followed by an optimizer step, and pytorch-optimizer's SPAM / StableSPAM / AdaGC / StableAdamW —
on the CPU, side by side in one run, same layout as bench/optim_bench.py (N parameters in 8 tensors).

The baseline is lowbit's plain fused AdamW8bit step (which already takes the statistics pass for
its non-finite check); "x AdamW8bit" is each row's time over it. Issue 4's targets: fused 8-bit
SPAM / Stable-SPAM at most 1.25x, and faster than every unfused peer.

Usage: python bench/clip_bench.py [--quick] [--n N] [--threads T] [--reps R]
Writes bench/out/clip_report.md and bench/out/clip_results.json. `python bench/run.py` runs
these rows with the other families in one report (it calls `collect`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    # OpenMP reads this when the runtime loads, i.e. when optim_bench imports torch
    _argv = sys.argv[1:]
    _threads = _argv[_argv.index("--threads") + 1] if "--threads" in _argv else "2"
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
import optim_bench as ob  # noqa: E402  (its argument parser and timing helpers)

import torch  # noqa: E402

NOTES = []


class ClipThenStep:
    """The unfused sequence: torch.nn.utils.clip_grad_norm_(params, max_norm), then opt.step()."""

    def __init__(self, params, opt, max_norm=1.0):
        self.params, self.opt, self.max_norm = params, opt, max_norm
        self.state = opt.state

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()


def rows(dtype, peers=True):
    """(label, kind, factory) of the clipped steps; kind "lowbit" or "peer" (the unfused
    sequences of other libraries)."""
    import lowbit.optim as lo
    from lowbit import clip
    out = [
        ("lowbit AdamW8bit (no clipping)", "lowbit", lambda ps: lo.AdamW8bit(ps)),
        ("lowbit AdamW8bit + NormClip(1.0), fused", "lowbit", lambda ps: lo.AdamW8bit(
            ps, clip=clip.NormClip(1.0))),
        ("lowbit SPAM8bit", "lowbit", lambda ps: lo.SPAM8bit(ps)),
        ("lowbit StableSPAM8bit", "lowbit", lambda ps: lo.StableSPAM8bit(ps)),
        ("lowbit AdaGC8bit", "lowbit", lambda ps: lo.AdaGC8bit(ps)),
        ("lowbit StableSPAM4bit", "lowbit", lambda ps: lo.StableSPAM4bit(ps)),
        ("lowbit StableAdamW8bit", "lowbit", lambda ps: lo.StableAdamW8bit(ps)),
        ("clip_grad_norm_ + lowbit AdamW8bit", "lowbit", lambda ps: ClipThenStep(
            ps, lo.AdamW8bit(ps))),
        ("clip_grad_norm_ + torch AdamW fused", "peer", lambda ps: ClipThenStep(
            ps, torch.optim.AdamW(ps, fused=True))),
    ]
    if not peers:  # lowbit and torch only (as optim_bench --no-peers)
        return out
    try:
        import bitsandbytes as bnb
        out.append(("clip_grad_norm_ + bitsandbytes AdamW8bit", "peer",
                    lambda ps: ClipThenStep(ps, bnb.optim.AdamW8bit(ps))))
    except Exception as e:  # noqa: BLE001 - optional peer
        NOTES.append(f"bitsandbytes not importable: {type(e).__name__}: {e}")
    try:
        import pytorch_optimizer as pto
        out += [("pytorch-optimizer SPAM (32-bit)", "peer", lambda ps: pto.SPAM(ps)),
                ("pytorch-optimizer StableSPAM (32-bit)", "peer", lambda ps: pto.StableSPAM(ps)),
                ("pytorch-optimizer AdaGC (32-bit)", "peer", lambda ps: pto.AdaGC(ps)),
                ("pytorch-optimizer StableAdamW (32-bit)", "peer", lambda ps: pto.StableAdamW(ps))]
    except Exception as e:  # noqa: BLE001
        NOTES.append(f"pytorch-optimizer not importable: {type(e).__name__}: {e}")
    return out


def collect(args, copy):
    """Time every clipped-step row with `copy` (ob.copy_timer(args.n)) before each step;
    returns the result dicts."""
    n = args.n
    results = []
    dtypes = [torch.float32] + ([] if args.quick else [torch.bfloat16])
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        esize = torch.empty(0, dtype=dtype).element_size()
        for label, kind, factory in rows(dtype, peers=not args.no_peers):
            params = ob.make_params(n, 8, dtype)
            try:
                opt = factory(params)
                opt.step()
                sbytes = ob.state_bytes(opt)
                med, cmed, reps = ob.time_steps(opt, copy, args.reps)
            except Exception as e:  # noqa: BLE001 - a failing peer must not stop the run
                NOTES.append(f"{label} ({dname}): {type(e).__name__}: {e}")
                print(f"  skip {label}: {type(e).__name__}: {e}", flush=True)
                continue
            # the optimizer step's least traffic (as optim_bench); the statistics pass is extra
            moved = 3 * esize * n + 2 * sbytes
            results.append(dict(dtype=dname, label=label, kind=kind, ms=med * 1e3,
                                copy_ms=cmed * 1e3, reps=reps, state_bytes_per_param=sbytes / n,
                                bytes_per_param=moved / n))
            print(f"  {dname:<9} {label:<44} {med * 1e3:8.2f} ms  (copy {cmed * 1e3:.2f} ms)",
                  flush=True)
            del opt, params
    return results


def main(args):
    torch.set_num_threads(args.threads)
    print(f"clip bench: N = {args.n} params in 8 tensors, {args.threads} threads", flush=True)
    results = collect(args, ob.copy_timer(args.n))
    ob.write_outputs(args, "clip", report(results, args), results, NOTES)


def report(results, args):
    lines = [f"Clipped optimizer steps, {args.n} parameters in 8 tensors, CPU, {args.threads} "
             f"threads (`python bench/clip_bench.py{' --quick' if args.quick else ''}`).", ""]
    for dname in dict.fromkeys(r["dtype"] for r in results):
        rs = [r for r in results if r["dtype"] == dname]
        base = next((r for r in rs if r["label"].startswith("lowbit AdamW8bit (no")), None)
        lines += [f"### {dname} params", "",
                  "| step | ms/step | x lowbit AdamW8bit | x copy time | state B/param |",
                  "|---|---|---|---|---|"]
        for r in rs:
            rel = f"{r['ms'] / base['ms']:.2f}" if base else "—"
            lines.append(f"| {r['label']} | {r['ms']:.2f} | {rel} | "
                         f"{r['ms'] / r['copy_ms']:.2f} | {r['state_bytes_per_param']:.3f} |")
        lines.append("")
    lines += ["x copy time = step time / time of an fp32 copy of N elements timed just before "
              "each step (medians; the shared machine's noise cancels in the ratio).", ""]
    if NOTES:
        lines += ["Notes:", ""] + [f"- {s}" for s in NOTES] + [""]
    lines.append(f"load average at the end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return lines


if __name__ == "__main__":
    sys.exit(main(ob.parse_args()))
