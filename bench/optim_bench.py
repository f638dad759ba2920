#!/usr/bin/env python
"""Optimizer-step benchmark: lowbit's fused steps vs torch.optim (for-loop, foreach, fused),
bitsandbytes, torch-optimi and torchao (those installed), on the CPU, side by side in one run.

Layouts: N parameters (default 2**24) in 8 equal tensors, and the same N in 500 small tensors
(launch / per-tensor overhead). Parameter dtypes fp32 and bf16; gradients random, fixed. Every
timed step is preceded by one timed fp32 copy of N elements on separate buffers, so "x copy" (the
step's effective bandwidth over the copy's, both from the same moments) is robust to the shared
machine's noise; absolute ms are not.

Bytes moved per parameter (exact, what one step must read and write at least): param read+write,
grad read, every state tensor read+write (codes and absmax included), kahan compensation
read+write. "state B/param" is the optimizer-state memory per parameter.

Usage: python bench/optim_bench.py [--quick] [--n N] [--threads T] [--no-peers] [--torchao]
Writes bench/out/optim_report.md and bench/out/optim_results.json. `python bench/run.py` runs
these rows with the other families in one report (it calls `collect`).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import copy_timer, time_steps  # noqa: E402,F401  (clip and hessian benches use them from here)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and configurations")
    p.add_argument("--n", type=int, default=2**24, help="total parameters (default 2**24)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="timed steps per row (default 15)")
    p.add_argument("--no-peers", action="store_true", help="lowbit and torch.optim only")
    p.add_argument("--torchao", action="store_true",
                   help="include torchao's optimizers (torch.compile per parameter shape: slow)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    a = p.parse_args(argv)
    a.reps = a.reps or (5 if a.quick else 15)
    return a


if __name__ == "__main__":
    ARGS = parse_args()
    # OpenMP (lowbit's kernels and torch's) reads this when the runtime loads, i.e. at import
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import torch  # noqa: E402


def tensor_bytes(t) -> int:
    """Storage bytes of a tensor; tensor subclasses (torchao's quantized states) are counted by
    their inner tensors, not by the dtype they present."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        if not isinstance(st, dict):  # e.g. pytorch-optimizer's step counters in opt.state
            continue
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                total += tensor_bytes(v)
    return total


def make_params(n, ntensors, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [n // ntensors] * ntensors
    sizes[-1] += n - sum(sizes)
    params = []
    for s in sizes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(dtype)
        params.append(p)
    return params


def optimizers(args, dtype):
    """(label, kind, factory) rows; factory(params) -> optimizer or raises."""
    import lowbit.optim as lo
    rows = [
        ("lowbit AdamW (32-bit states)", "lowbit", lambda ps: lo.AdamW(ps)),
        ("lowbit AdamW8bit", "lowbit", lambda ps: lo.AdamW8bit(ps)),
        ("lowbit AdamW4bit", "lowbit", lambda ps: lo.AdamW4bit(ps)),
        ("lowbit Lion8bit", "lowbit", lambda ps: lo.Lion8bit(ps)),
        ("lowbit SGD8bit momentum", "lowbit", lambda ps: lo.SGD8bit(ps, lr=1e-3, momentum=0.9)),
    ]
    if dtype == torch.bfloat16:
        rows.append(("lowbit AdamW8bit kahan", "lowbit", lambda ps: lo.AdamW8bit(ps, kahan=True)))
    rows += [
        ("torch AdamW fused", "torch", lambda ps: torch.optim.AdamW(ps, fused=True)),
        ("torch AdamW foreach", "torch", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        ("torch AdamW for-loop", "torch", lambda ps: torch.optim.AdamW(ps, foreach=False)),
    ]
    if args.no_peers:
        return rows
    try:
        import bitsandbytes as bnb
        rows.append(("bitsandbytes AdamW8bit", "peer", lambda ps: bnb.optim.AdamW8bit(ps)))
    except Exception as e:  # noqa: BLE001 - optional peer
        NOTES.append(f"bitsandbytes not importable: {type(e).__name__}: {e}")
    try:
        import optimi  # torch-optimi: Kahan summation on by default for bf16 params
        rows.append(("torch-optimi AdamW", "peer",  # with torch's AdamW defaults
                     lambda ps: optimi.AdamW(ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                             weight_decay=1e-2)))
    except Exception as e:  # noqa: BLE001 - optional peer
        NOTES.append(f"torch-optimi (optimi) not importable: {type(e).__name__}: {e}")
    if args.torchao:
        try:
            import torchao.optim as tao
            rows.append(("torchao AdamW8bit", "peer", lambda ps: tao.AdamW8bit(ps)))
            rows.append(("torchao AdamW4bit", "peer", lambda ps: tao.AdamW4bit(ps)))
        except Exception as e:  # noqa: BLE001
            NOTES.append(f"torchao not importable: {type(e).__name__}: {e}")
    return rows


NOTES = []


def write_outputs(args, name, lines, results, notes):
    """Print the report and write bench/out/<name>_report.md and <name>_results.json."""
    text = "\n".join(lines)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}_report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, f"{name}_results.json"), "w") as f:
        json.dump({"n": args.n, "threads": args.threads, "rows": results, "notes": notes}, f,
                  indent=1)


def collect(args, copy):
    """Time every optimizer row (layouts x dtypes x optimizers) with `copy` (copy_timer(args.n))
    before each step; returns the result dicts."""
    n = args.n
    layouts = [(8, "8 tensors")] + ([] if args.quick else [(500, "500 tensors")])
    dtypes = [torch.float32, torch.bfloat16]
    results = []
    for ntensors, lname in layouts:
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            for label, kind, factory in optimizers(args, dtype):
                params = make_params(n, ntensors, dtype)
                try:
                    opt = factory(params)
                    opt.step()  # creates the states
                    sbytes = state_bytes(opt)
                    med, cmed, reps = time_steps(opt, copy, args.reps)
                except Exception as e:  # noqa: BLE001 - a failing peer must not stop the run
                    NOTES.append(f"{label} ({lname}, {dname}): {type(e).__name__}: {e}")
                    print(f"  skip {label}: {type(e).__name__}: {e}", flush=True)
                    continue
                esize = torch.empty(0, dtype=dtype).element_size()
                moved = 3 * esize * n + 2 * sbytes
                row = dict(layout=lname, dtype=dname, label=label, kind=kind, ms=med * 1e3,
                           copy_ms=cmed * 1e3, reps=reps, bytes_per_param=moved / n,
                           state_bytes_per_param=sbytes / n, gbps=moved / med / 1e9,
                           x_copy=(moved / med) / (8 * n / cmed))
                results.append(row)
                print(f"  {lname:<12} {dname:<9} {label:<32} {row['ms']:8.2f} ms  "
                      f"{row['bytes_per_param']:5.2f} B/param  {row['gbps']:6.1f} GB/s  "
                      f"{row['x_copy']:.2f}x copy", flush=True)
                del opt, params
    return results


def main(args):
    torch.set_num_threads(args.threads)
    import lowbit
    print(f"lowbit {lowbit.__version__ if hasattr(lowbit, '__version__') else ''} cpu isa "
          f"{lowbit._ext.C.isa()}; torch {torch.__version__}; {args.threads} threads; "
          f"N = {args.n} params", flush=True)
    results = collect(args, copy_timer(args.n))
    write_outputs(args, "optim", report(results, args), results, NOTES)


def report(results, args):
    lines = [f"Optimizer step, {args.n} parameters, CPU, {args.threads} threads "
             f"(`python bench/optim_bench.py{' --quick' if args.quick else ''}`).", ""]
    for lname in dict.fromkeys(r["layout"] for r in results):
        for dname in dict.fromkeys(r["dtype"] for r in results):
            rows = [r for r in results if r["layout"] == lname and r["dtype"] == dname]
            if not rows:
                continue
            fused = next((r for r in rows if r["label"] == "torch AdamW fused"), None)
            lines += [f"### {lname}, {dname} params", "",
                      "| optimizer | ms/step | B/param moved | state B/param | GB/s | x copy BW "
                      "| x torch fused time |", "|---|---|---|---|---|---|---|"]
            for r in rows:
                rel = f"{r['ms'] / fused['ms']:.2f}" if fused else "—"
                lines.append(f"| {r['label']} | {r['ms']:.2f} | {r['bytes_per_param']:.2f} | "
                             f"{r['state_bytes_per_param']:.3f} | {r['gbps']:.1f} | "
                             f"{r['x_copy']:.2f} | {rel} |")
            lines.append("")
    lines += ["x copy BW = (bytes moved / step time) / (8 B x N / time of the fp32 copy timed "
              "just before each step), medians. x torch fused time < 1 means faster.", ""]
    if NOTES:
        lines += ["Notes:", ""] + [f"- {s}" for s in NOTES] + [""]
    lines.append(f"load average at the end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return lines


if __name__ == "__main__":
    sys.exit(main(ARGS))
