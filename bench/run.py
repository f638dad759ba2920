#!/usr/bin/env python
"""lowbit's microbenchmark suite: every op family side by side against the peers installed, in
one run, with the machine's copy bandwidth measured in that run.

Families (--families, default all): quant (block-wise quantize / dequantize, bench/quant_bench.py),
rounding (stochastic rounding, bench/quant_bench.py), optim (optimizer steps,
bench/optim_bench.py), clip (clipped steps, bench/clip_bench.py), hvp (Hessian-vector products,
eigenvalue readings, Sophia steps, bench/hessian_bench.py), dist (FSDP2 state bytes per rank and
the statistics all-reduce, bench/dist_bench.py), nn (QuantLinear's simulated low precision and
the fused fake-quant kernels vs unfused PyTorch, bench/nn_bench.py). Each script also runs on its own with
its own, more detailed report; this runner calls their `collect` functions and prints one table
per family: median time, effective GB/s, fraction of the copy bandwidth, ratio to the best peer.
Peers (torch.optim, bitsandbytes, torchao, pytorch-optimizer, torch-optimi, sophia-opt, PyHessian)
are optional: an absent one is skipped with a note.

Timing: each timed repetition follows one timed fp32 copy of N elements (bench/_timing.py), the
process re-executes itself once with a steady glibc malloc and OMP_NUM_THREADS set.

Usage: python bench/run.py [--quick] [--families quant,rounding,optim,clip,hvp,dist,nn] [--n N]
                           [--threads T] [--out DIR] [--reps R] [--no-peers] [--torchao]
--quick: tiny sizes (N = 2**14, a 1-layer d=32 transformer, few repetitions), well under a
minute: it checks the suite runs, its numbers mean little. Writes DIR/report.md (default
bench/out), DIR/results.json and, with matplotlib, DIR/bench_<family>.png.
"""
import argparse
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import reexec_steady  # noqa: E402

FAMILIES = {  # key: title
    "quant": "Block-wise quantization (quantize, dequantize, their sum)",
    "rounding": "Stochastic rounding of fp32",
    "optim": "Optimizer steps",
    "clip": "Clipped optimizer steps",
    "hvp": "Curvature: Hessian-vector products, eigenvalue readings, Sophia steps",
    "dist": "FSDP2 on gloo: optimizer-state bytes per rank, the statistics all-reduce",
    "nn": "Low-precision layers: QuantLinear and the fused fake-quant kernels",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repetitions (a smoke run, well under a minute)")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help=f"comma-separated subset of {','.join(FAMILIES)} (default all)")
    p.add_argument("--n", type=int, default=None,
                   help="elements / parameters per op (default 2**24, --quick 2**14)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="output directory")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per row (default: each family's own)")
    p.add_argument("--no-peers", action="store_true", help="lowbit, torch and the copy only")
    p.add_argument("--torchao", action="store_true",
                   help="include torchao's optimizers (torch.compile per parameter shape: slow)")
    p.add_argument("--torchao-compile", action="store_true",
                   help="also time torchao's quantizers under torch.compile (slow)")
    p.add_argument("--no-malloc-tune", action="store_true",
                   help="do not re-exec with the steady glibc malloc setting")
    a = p.parse_args(argv)
    a.families = [f.strip() for f in a.families.split(",") if f.strip()]
    unknown = [f for f in a.families if f not in FAMILIES]
    if unknown or not a.families:
        p.error(f"unknown families {unknown}; choose from {','.join(FAMILIES)}")
    a.n = a.n if a.n is not None else (2**14 if a.quick else 2**24)
    return a


if __name__ == "__main__":
    ARGS = parse_args()
    reexec_steady(__file__, ARGS.threads, not ARGS.no_malloc_tune)

import torch  # noqa: E402  (after the re-exec, so the environment is in place)

import _charts  # noqa: E402
import _report as rep  # noqa: E402
from _report import row  # noqa: E402
from _timing import Bench  # noqa: E402


def family_argv(args, *extra):
    """The common options, for a family script's own parse_args."""
    argv = ["--n", str(args.n), "--threads", str(args.threads), "--out", args.out]
    argv += ["--quick"] if args.quick else []
    argv += ["--reps", str(args.reps)] if args.reps else []
    argv += ["--no-peers"] if args.no_peers else []
    return argv + list(extra)


class QuantInput:
    """The quant and rounding families' shared input (torch.randn(N), seed 0) and its
    copy-interleaved timer, made once."""

    def __init__(self, args):
        import quant_bench as qb
        self.qb = qb
        self.qargs = qb.parse_args(family_argv(args, *(["--torchao-compile"]
                                                      if args.torchao_compile else [])))
        torch.manual_seed(self.qargs.seed)
        self.x = torch.randn(args.n)
        self.bench = Bench(args.n, self.qargs)

    def rows(self, family, which):
        out, first_note = [], len(self.qb.NOTES)
        for r in self.qb.collect(self.qargs, self.x, self.bench, families=(which,)):
            t = r["timing"]
            group = r["group"] if family == "rounding" else f"{r['family']} {r['group']}"
            err = "" if r["err"] is None else f"mean abs err {r['err']:.3e}"
            out.append(row(family, group, r["label"], r["kind"], t.median, min_s=t.min,
                           reps=r.get("reps", len(t.times)), nbytes=r["bytes"],
                           copy_s=t.copy_median, copy_bytes=8 * self.x.numel(), err=r["err"],
                           note="; ".join(s for s in (err, r["note"]) if s)))
        return out, self.qb.NOTES[first_note:]


def run_quant(args, ctx):
    return ctx.quant_input(args).rows("quant", "quantize")


def run_rounding(args, ctx):
    return ctx.quant_input(args).rows("rounding", "sr")


def run_optim(args, ctx):
    import optim_bench as ob
    oargs = ob.parse_args(family_argv(args, *(["--torchao"] if args.torchao else [])))
    out = []
    for r in ob.collect(oargs, ob.copy_timer(args.n)):
        out.append(row("optim", f"{r['layout']}, {r['dtype']} params", r["label"],
                       "lowbit" if r["kind"] == "lowbit" else "peer", r["ms"] / 1e3,
                       reps=r["reps"], nbytes=r["bytes_per_param"] * args.n,
                       copy_s=r["copy_ms"] / 1e3, copy_bytes=8 * args.n,
                       note=f"state {r['state_bytes_per_param']:.3f} B/param"))
    return out, ob.NOTES


def run_clip(args, ctx):
    import clip_bench as cb
    import optim_bench as ob
    cargs = ob.parse_args(family_argv(args))
    results = cb.collect(cargs, ob.copy_timer(args.n))
    out = []
    for r in results:
        base = next((b for b in results if b["dtype"] == r["dtype"]
                     and b["label"].startswith("lowbit AdamW8bit (no")), None)
        rel = f"; {r['ms'] / base['ms']:.2f}x lowbit AdamW8bit's time" if base else ""
        out.append(row("clip", f"{r['dtype']} params, 8 tensors", r["label"], r["kind"],
                       r["ms"] / 1e3, reps=r["reps"], nbytes=r["bytes_per_param"] * args.n,
                       copy_s=r["copy_ms"] / 1e3, copy_bytes=8 * args.n,
                       note=f"state {r['state_bytes_per_param']:.3f} B/param{rel}"))
    return out, cb.NOTES


def run_hvp(args, ctx):
    import hessian_bench as hb
    hargs = hb.parse_args(family_argv(args, *(["--model", "tiny"] if args.quick else [])))
    res = hb.collect(hargs)
    n, model = args.n, hb.describe(hargs.model)
    out, notes = [], []
    times, mem = res["times_s"], res["extra_peak_mib"]
    grad = times["gradient"]
    group = f"HVP, {model}"
    out.append(row("hvp", group, "gradient (torch.autograd.grad)", "baseline", grad,
                   reps=hargs.reps, note="the reference: one gradient"))
    work = res["matmul"]
    for r in hb.ROUTES + (hb.REUSED,):
        extra = f"; +{mem[r]:.0f} MiB peak" if r in mem else ""
        if r in work:  # the arithmetic floor: matmul FLOPs over the gradient's
            extra += f"; matmul work {work[r][0] / work['gradient'][0]:.2f}x a gradient's"
        label = f"lowbit hvp {r}" if r in hb.ROUTES else f"lowbit HessianOperator ({r})"
        out.append(row("hvp", group, label, "lowbit", times[r], reps=hargs.reps,
                       note=f"{times[r] / grad:.2f}x one gradient{extra}"))
    for (name, secs, lam, products), err in zip(res["eigen"], hb.relative_error(res["eigen"])):
        out.append(row("hvp", "top Hessian eigenvalue", name,
                       "lowbit" if name.startswith("lowbit") else "peer", secs, reps=1,
                       note=f"lambda_max {lam:.4f} ({err * 100:.2f}% from converged)"
                       + (f"; {products} HVPs" if products else "")))
    if not args.no_peers and not any(not e[0].startswith("lowbit") for e in res["eigen"]):
        notes.append("PyHessian not installed: the eigenvalue readings have no peer "
                     "(pip install --no-deps pyhessian)")
    for name, secs, products in res["monitor"]:
        out.append(row("hvp", "SharpnessMonitor reading", f"lowbit {name}", "lowbit", secs,
                       reps=1, note=f"{products} HVPs"))
    for name, (plain, refresh, _xc, copy_s, sbytes) in res["sophia_s"].items():
        kind = "lowbit" if name.startswith("lowbit") else "peer"
        st = f"state {sbytes / n:.3f} B/param"
        out.append(row("hvp", f"Sophia plain step, {n} fp32 params", name, kind, plain,
                       reps=hargs.reps, nbytes=12 * n + 2 * sbytes, copy_s=copy_s,
                       copy_bytes=8 * n, note=st))
        out.append(row("hvp", f"Sophia refresh step, {n} fp32 params", name, kind, refresh,
                       reps=hargs.reps, nbytes=16 * n + 2 * sbytes, copy_s=copy_s,
                       copy_bytes=8 * n, note=st + "; also reads the given estimate"))
    return out, notes


def run_dist(args, ctx):
    import dist_bench as db
    dargs = db.parse_args(["--out", args.out] + (["--quick", "--worlds", "1,2"] if args.quick
                                                 else []))
    out = []
    for bits, world, mb, ratio, r0 in db.summary(db.collect(dargs)):
        out.append(row("dist", f"AdamW, {bits}-bit states, FSDP2 ({r0['params']} params)",
                       f"lowbit, {world} rank{'s' if world > 1 else ''}", "lowbit",
                       r0["step_s"], reps=dargs.steps,
                       note=f"state {mb:.3f} MB per rank ({ratio:.3f}x of 1 rank); statistics "
                       f"all-reduce {r0['allreduce_bytes']} B, {r0['allreduce_s'] * 1e3:.2f} ms "
                       "per step"))
    return out, ["dist: ranks are spawned processes, one thread each; the all-reduce time "
                 "includes waiting for the slowest rank"]


def run_nn(args, ctx):
    import nn_bench as nb
    nargs = nb.parse_args(family_argv(args))
    out = [row("nn", r["group"], r["label"], r["kind"], r["ms"] / 1e3, reps=r["reps"],
               nbytes=r["bytes"], copy_s=r["copy_ms"] / 1e3, copy_bytes=r["copy_bytes"],
               note=r["note"]) for r in nb.collect(nargs)]
    return out, ["matmuls run in fp32 on dequantized values (simulated low precision); the "
                 "unfused PyTorch rows compute the same formats with torch ops, not lowbit's "
                 "exact tie and scale rules"]


RUNNERS = {"quant": run_quant, "rounding": run_rounding, "optim": run_optim, "clip": run_clip,
           "hvp": run_hvp, "dist": run_dist, "nn": run_nn}


class Context:
    def __init__(self):
        self._quant = None

    def quant_input(self, args):
        if self._quant is None:
            self._quant = QuantInput(args)
        return self._quant


def copy_bandwidth(args):
    """The run's copy baselines (fp32 and uint8 dst.copy_(src) of N elements, not interleaved):
    quant_bench's bandwidth rows. Returns (fp32 GB/s, rows)."""
    import quant_bench as qb
    qargs = qb.parse_args(family_argv(args))
    bench = Bench(args.n, qargs)
    t = qb.copy_baselines(bench, qargs)
    rows = [row("bandwidth", r["group"], r["label"], "baseline", r["timing"].median,
                min_s=r["timing"].min, reps=len(r["timing"].times), nbytes=r["bytes"],
                note=r["note"]) for r in qb.ROWS if r["family"] == "bandwidth"]
    qb.ROWS.clear()
    return 8 * args.n / t.median / 1e9, rows


def header(args, versions, copy_gbps):
    import lowbit
    m = rep.machine()
    isa = lowbit._ext.C.isa() if lowbit._ext.C is not None else "(lowbit._C not built)"
    peers = ", ".join(f"{k} {v}" if v else f"{k} (absent)" for k, v in versions.items())
    malloc = ("MALLOC_MMAP_MAX_=" + os.environ.get("MALLOC_MMAP_MAX_", "unset") +
              ", MALLOC_TRIM_THRESHOLD_=" + os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset"))
    return [
        f"- command: `python bench/run.py {shlex.join(sys.argv[1:])}`",
        f"- machine: {m['cpu']}; {m['cores']} logical cores; L3 {m['l3']}; {m['os']}; "
        f"load avg (1/5/15 min) at start {m['load']}",
        f"- torch {torch.__version__} ({torch.get_num_threads()} threads); lowbit "
        f"{lowbit.__version__}, lowbit._ext.C.isa() = {isa}",
        f"- peers: {peers}",
        f"- N = {args.n} ({'quick' if args.quick else 'full'} mode); families: "
        f"{', '.join(args.families)}; malloc: {malloc}",
        f"- fp32 copy bandwidth (dst.copy_(src), {args.n} elements, median): "
        f"**{copy_gbps:.2f} GB/s**",
    ]


def main(args):
    import lowbit
    if lowbit._ext.C is None or "cpu" not in lowbit.available_backends():
        sys.exit("lowbit's CPU module (lowbit._C) is not built; run `make build` first")
    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    versions = rep.peer_versions()
    notes = []
    for name, v in versions.items():
        if v is None:
            msg = f"{name} is not installed: its rows are skipped"
            print(f"note: {msg}", flush=True)
            notes.append(msg)
    if args.no_peers:
        notes.append("peers disabled (--no-peers): lowbit, torch and the copy only")

    print(f"copy bandwidth, N = {args.n}:", flush=True)
    copy_gbps, bw_rows = copy_bandwidth(args)
    rep.derive(bw_rows, copy_gbps)
    sections = [("Memory-copy baselines", [], bw_rows)]
    all_rows, walls, ctx = list(bw_rows), {}, Context()
    for fam in args.families:
        print(f"\n{fam}: {FAMILIES[fam]}", flush=True)
        t0 = time.perf_counter()
        rows, fam_notes = RUNNERS[fam](args, ctx)
        walls[fam] = time.perf_counter() - t0
        for s in fam_notes:
            if f"{fam}: {s}" not in notes:
                notes.append(f"{fam}: {s}")
        rep.derive(rows, copy_gbps)
        sections.append((f"{fam} — {FAMILIES[fam]}", [], rows))
        all_rows += rows

    wall = time.perf_counter() - wall0
    footer = [f"Wall time: {wall:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items())
              + f"); load avg (1/5/15 min) at the end {rep.load_avg()} (above {args.threads} "
              "means other processes shared the cores)."]
    head = header(args, versions, copy_gbps)
    text = rep.markdown("lowbit microbenchmarks (CPU)", head, sections, notes, footer)
    print("\n" + text, flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    meta = dict(command=["python", "bench/run.py"] + sys.argv[1:], n=args.n,
                threads=args.threads, quick=args.quick, families=args.families,
                copy_gbps=copy_gbps, machine=rep.machine(), peers=versions, wall_s=wall)
    rep.write_json(os.path.join(args.out, "results.json"), meta, all_rows, notes)
    charts = []
    for fam in args.families:
        rows = [r for r in all_rows if r["family"] == fam]
        if rows:
            p = _charts.family_chart(os.path.join(args.out, f"bench_{fam}.png"), FAMILIES[fam],
                                     rows, copy_gbps)
            if p is None:
                print("note: matplotlib is not installed; no PNG charts", flush=True)
                break
            charts.append(os.path.basename(p))
    print(f"wrote {os.path.join(args.out, 'report.md')}, results.json"
          + (f", {', '.join(charts)}" if charts else ""), flush=True)


if __name__ == "__main__":
    main(ARGS)
