#!/usr/bin/env python
"""Block-wise quantization and stochastic-rounding benchmark: lowbit's CPU kernels vs a plain
memory copy and vs the peers (bitsandbytes, torchao, torch's round-to-nearest casts).

One run, one input (the "embedded default input": torch.randn(2**24) with torch.manual_seed(0)),
every number compared only against baselines measured in the same run:

  * each timed repetition of an op is preceded by one timed fp32 copy (dst.copy_(src) on
    separate buffers of the input's size), so machine noise hits both; each row's
    "x copy BW" uses the copies interleaved with that row;
  * warm-up, then median (and min) of the repetitions, time.perf_counter;
  * GB/s = essential bytes / median time, where essential bytes = bytes of the input read plus
    bytes of the output written, in lowbit's storage format (fp32 in = 4 B/elem, 8-bit codes
    1 B/elem, 4-bit codes 0.5 B/elem, absmax 4 B/block, bf16/fp16 2 B, e4m3 1 B). Peers doing
    the same op are charged the same bytes, so GB/s is an effective rate comparable across rows;
    a copy of fp32 is charged 8 B/elem (read + write), a uint8 copy 2 B/elem.

The process re-executes itself once (bench/_timing.py) with glibc malloc set to never return large blocks to the
OS (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ huge), so repeated 64 MB output allocations reuse
memory instead of page-faulting fresh mmaps on every call (--no-malloc-tune to disable).

Usage: python bench/quant_bench.py [--quick] [--n N] [--threads T] [--reps R] [--torchao-compile]
Writes bench/out/quant_report.md, quant_results.json and (with matplotlib) quant_bench.png.
`python bench/run.py` runs these rows with the other families in one report; `collect` is the
function it calls.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import machine  # noqa: E402
from _timing import Bench, Timing, reexec_steady, timed_plain  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="few repetitions (finishes in about a minute; what `make demo` runs)")
    p.add_argument("--n", type=int, default=2**24, help="elements of the fp32 input (default 2**24)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per op (default 21, --quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per op (default 3, --quick 1)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop repeating an op after this many seconds once it has min reps "
                        "(default 10, --quick 1.5)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the input (default 0)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                   help="output directory (default bench/out)")
    p.add_argument("--torchao-compile", action="store_true",
                   help="also time torchao's quantizers under torch.compile (~10 s+ compile each)")
    p.add_argument("--no-peers", action="store_true", help="time lowbit and the copy only")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before timing, wait up to SECONDS for the 1-min load average to drop "
                        "below 0.5 (default 0: do not wait)")
    p.add_argument("--no-malloc-tune", action="store_true",
                   help="do not re-exec with the steady glibc malloc setting")
    args = p.parse_args(argv)
    q = args.quick
    args.reps = args.reps if args.reps is not None else (5 if q else 21)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    args.max_seconds = args.max_seconds if args.max_seconds is not None else (1.5 if q else 10.0)
    args.min_reps = min(args.reps, 3 if q else 5)
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    reexec_steady(__file__, ARGS.threads, not ARGS.no_malloc_tune)

import torch  # noqa: E402  (after the re-exec, so the environment is in place)

# ------------------------------------------------------------------------------------------
# rows and tables

ROWS = []   # dicts: family, group, label, kind ("lowbit" | "peer" | "baseline"), bytes, timing, err, note


def add_row(family, group, label, kind, nbytes, timing, err=None, note=""):
    row = dict(family=family, group=group, label=label, kind=kind, bytes=nbytes, timing=timing,
               err=err, note=note)
    ROWS.append(row)
    t = timing
    print(f"  {family:<10} {group:<16} {label:<44} {t.median * 1e3:9.2f} ms "
          f"(min {t.min * 1e3:8.2f}, {len(t.times)} reps)  "
          f"{nbytes / t.median / 1e9:7.2f} GB/s", flush=True)
    return row


def skip(what, why):
    print(f"  note: skipping {what}: {why}", flush=True)
    NOTES.append(f"skipped {what}: {why}")


NOTES = []


def fmt_ms(s):
    return f"{s * 1e3:.2f}"


def fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}"


def fmt_err(e):
    return "—" if e is None else f"{e:.4e}"


FAMILIES = [
    # (family key, title, reference-peer label prefix, reference column header)
    ("bandwidth", "Memory-copy baselines", None, None),
    ("quantize", "Block-wise quantize (fp32 → codes + absmax)", "bitsandbytes", "x bnb"),
    ("dequantize", "Block-wise dequantize (codes + absmax → fp32)", "bitsandbytes", "x bnb"),
    ("roundtrip", "Quantize + dequantize combined (sum of the two medians above)",
     "bitsandbytes", "x bnb"),
    ("sr", "Stochastic rounding of fp32 (vs torch's round-to-nearest cast)", "torch x.to(",
     "x torch RTN cast"),
]


def family_table(family, title, ref_prefix, ref_header, copy_bw):
    rows = [r for r in ROWS if r["family"] == family]
    if not rows:
        return []
    lines = [f"### {title}", ""]
    if family == "bandwidth":
        lines += ["| op | backend/peer | ms (median) | ms (min) | reps | GB/s (median) | GB/s (best) | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            t = r["timing"]
            lines.append(f"| {r['group']} | {r['label']} | {fmt_ms(t.median)} | {fmt_ms(t.min)} | "
                         f"{len(t.times)} | {r['bytes'] / t.median / 1e9:.2f} | "
                         f"{r['bytes'] / t.min / 1e9:.2f} | {r['note']} |")
        return lines + [""]
    lines += [f"| op | backend/peer | ms (median) | ms (min) | reps | GB/s | x copy BW | "
              f"{ref_header} | x best peer | mean abs err | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["timing"]
        group = [g for g in rows if g["group"] == r["group"]]
        ref = next((g for g in group if g["label"].startswith(ref_prefix)), None)
        peers = [g for g in group if g["kind"] == "peer"]
        best = min(peers, key=lambda g: g["timing"].median) if peers else None
        gbs = r["bytes"] / t.median / 1e9
        # fraction of the copy bandwidth measured interleaved with this row
        frac = gbs / (r["copy_bw"] if r.get("copy_bw") else copy_bw)
        lines.append(
            f"| {r['group']} | {r['label']} | {fmt_ms(t.median)} | {fmt_ms(t.min)} | "
            f"{r.get('reps', len(t.times))} | {gbs:.2f} | {frac:.2f} | "
            f"{fmt_ratio(ref['timing'].median / t.median if ref else None)} | "
            f"{fmt_ratio(best['timing'].median / t.median if best else None)} | "
            f"{fmt_err(r['err'])} | {r['note']} |")
    return lines + [""]


LEGEND = """Legend: ms = wall time of one call (median / min over the timed repetitions, after warm-up).
GB/s = essential bytes / median time; essential bytes = input read + output written in lowbit's
storage format (fp32 4 B/elem, 8-bit codes 1 B, packed 4-bit codes 0.5 B, absmax 4 B/block,
bf16/fp16 2 B, e4m3 1 B); peers doing the same op are charged the same bytes. Copy rows: fp32
`dst.copy_(src)` = 8 B/elem, uint8 copy = 2 B/elem (bytes read + written).
x copy BW = GB/s / the fp32 copy GB/s measured interleaved with that row (one copy before every
repetition). x bnb / x torch RTN cast / x best peer = that row's median time divided into the
reference's median time (> 1: this row is faster). Best peer = fastest non-lowbit implementation
of the same op (not the RTN casts, which do less work). mean abs err = mean |dequant(quant(x)) - x|
with each implementation's own dequantizer (for SR: mean |round(x) - x|); equal errors mean the
peers did the same work. Round-trip rows: ms = quantize median + dequantize median
(min = sum of the mins; reps = quantize+dequantize reps). The uint8 copy moves 1/4 of the fp32
copy's bytes and may stay cache-resident (see L3 in the header), so it is not the reference."""


# ------------------------------------------------------------------------------------------
# header


def machine_header(args):
    import lowbit
    m = machine()  # (bench/_report.py: cpu model, cores, L3, OS, load average)
    cpu, l3, load = m["cpu"], m["l3"], m["load"]
    isa = lowbit._ext.C.isa() if lowbit._ext.C is not None else "(lowbit._C not built)"
    vers = []
    for mod in ("bitsandbytes", "torchao", "numpy"):
        try:
            vers.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - optional
            vers.append(f"{mod} (absent)")
    malloc = ("MALLOC_MMAP_MAX_=" + os.environ.get("MALLOC_MMAP_MAX_", "unset") +
              ", MALLOC_TRIM_THRESHOLD_=" + os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset"))
    mode = "quick" if args.quick else "full"
    return [
        "# lowbit block-wise quantization & stochastic rounding benchmark (CPU)",
        "",
        f"- machine: {cpu}; {os.cpu_count()} logical cores; L3 {l3 or 'n/a'}; "
        f"{platform.system()} {platform.release()}; load avg (1/5/15 min) at start {load}",
        f"- torch {torch.__version__} ({torch.get_num_threads()} threads); lowbit "
        f"{lowbit.__version__}, lowbit._ext.C.isa() = {isa}; {', '.join(vers)}",
        f"- input: torch.randn({args.n}) fp32 (torch.manual_seed({args.seed})), "
        f"{args.n * 4 / 2**20:.0f} MiB; mode {mode}: {args.warmup} warm-up, up to {args.reps} "
        f"timed reps (>= {args.min_reps}, stop after {args.max_seconds:g} s); malloc: {malloc}",
        "",
    ]


# ------------------------------------------------------------------------------------------
# the ops


def mean_abs(a, b):
    return (a.float().reshape(-1) - b.float().reshape(-1)).abs().mean().item()


def require_lowbit_cpu():
    import lowbit
    if lowbit._ext.C is None or "cpu" not in lowbit.available_backends():
        sys.exit("lowbit's CPU module (lowbit._C) is not built; run `make build` first")


def copy_baselines(bench, args):
    """The fp32 and uint8 memory-copy rows (no interleaving: they are the baselines); returns
    the fp32 copy's Timing."""
    n = bench.n
    t_copy = timed_plain(lambda: bench.copy_dst.copy_(bench.copy_src), args)
    add_row("bandwidth", "copy fp32", "torch dst.copy_(src)", "baseline", 8 * n, t_copy,
            note=f"{4 * n / 2**20:.0f} MiB read + written")
    u8_src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    u8_dst = torch.empty_like(u8_src)
    t_u8 = timed_plain(lambda: u8_dst.copy_(u8_src), args)
    add_row("bandwidth", "copy uint8", "torch dst.copy_(src)", "baseline", 2 * n, t_u8,
            note=f"{n / 2**20:.0f} MiB read + written")
    return t_copy


def collect(args, x, bench, families=("quantize", "sr")):
    """Time the block-wise quantization rows ("quantize": quantize, dequantize and their sum)
    and/or the stochastic-rounding rows ("sr") on x with the copy-interleaved `bench`; returns
    the rows added to ROWS (NOTES gets the skipped peers)."""
    import lowbit
    first = len(ROWS)
    n = x.numel()

    def add(family, group, label, kind, nbytes, timing, err=None, note=""):
        r = add_row(family, group, label, kind, nbytes, timing, err, note)
        r["copy_bw"] = 8 * n / timing.copy_median / 1e9
        return r

    # -- optional peers ---------------------------------------------------------------------
    bnbF = tao = None
    if not args.no_peers:
        try:
            import bitsandbytes.functional as bnbF  # noqa: N812
        except Exception as e:  # noqa: BLE001 - optional peer
            skip("bitsandbytes", f"not importable ({type(e).__name__}: {e})")
        try:
            import torchao.optim.quant_utils as tao
        except Exception as e:  # noqa: BLE001 - optional peer
            skip("torchao", f"not importable ({type(e).__name__}: {e})")
    else:
        NOTES.append("peers disabled (--no-peers)")

    # -- block-wise quantization ------------------------------------------------------------
    formats = [("dynamic", 256, "dyn8 b256"), ("nf4", 64, "nf4 b64"), ("dynamic4", 128, "dyn4 b128")]
    sr_seed = 1234
    for code, bs, group in (formats if "quantize" in families else []):
        book = lowbit.codebook(code)
        bits = 4 if book.numel() == 16 else 8
        nblocks = -(-n // bs)
        codes_bytes = (n + 1) // 2 if bits == 4 else n
        q_bytes = 4 * n + codes_bytes + 4 * nblocks
        dq_bytes = codes_bytes + 4 * nblocks + 4 * n
        impls = []  # (label, kind, quant fn, dequant fn(state), note)

        impls.append(("lowbit cpu", "lowbit",
                      lambda code=code, bs=bs: lowbit.quantize_blockwise(x, code, bs, backend="cpu"),
                      lambda qs: lowbit.dequantize_blockwise(qs, backend="cpu"), ""))
        if code == "dynamic":
            impls.append(("lowbit cpu stochastic=True", "lowbit",
                          lambda: lowbit.quantize_blockwise(x, "dynamic", 256, stochastic=True,
                                                            seed=sr_seed, backend="cpu"),
                          None, "stochastic rounding to codes; peers have no SR quantize"))
        if bnbF is not None and code == "dynamic":
            impls.append(("bitsandbytes quantize_blockwise", "peer",
                          lambda: bnbF.quantize_blockwise(x, blocksize=256),
                          lambda st: bnbF.dequantize_blockwise(st[0], st[1]), "native C (CPU)"))
        if bnbF is not None and code == "nf4":
            impls.append(("bitsandbytes quantize_4bit(nf4)", "peer",
                          lambda: bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4"),
                          lambda st: bnbF.dequantize_4bit(st[0], st[1]), ""))
        if bnbF is not None and code == "dynamic4":
            NOTES.append("bitsandbytes has no 4-bit dynamic-map quantizer (quantize_4bit takes "
                         "only fp4/nf4); dyn4 rows have no bnb column")
        if tao is not None:
            if code == "dynamic":
                qmap = torch.tensor(tao.create_dynamic_map(True, 7, 8), dtype=torch.float32)
            elif code == "dynamic4":
                qmap = torch.tensor(tao.create_dynamic_map(True, 3, 4), dtype=torch.float32)
            else:
                qmap = book.clone()  # torchao's 4-bit path takes any sorted 16-entry map

            if bits == 8:
                def tq(xx, qmap=qmap, bs=bs):
                    scaled, scale = tao.scale_tensor(xx.view(-1), bs)
                    return tao.quantize_8bit_with_qmap(scaled, qmap), scale

                def tdq(st, qmap=qmap):
                    return tao.dequant_with_qmap(st[0], qmap, st[1])
                name = "torchao quantize_8bit_with_qmap"
            else:
                def tq(xx, qmap=qmap, bs=bs):  # as torchao's OptimState4bit.copy_ packs them
                    scaled, scale = tao.scale_tensor(xx.view(-1), bs)
                    c = tao.quantize_4bit_with_qmap(scaled, qmap)
                    return (c[::2] << 4) | c[1::2], scale

                def tdq(st, qmap=qmap):
                    c = torch.stack([st[0] >> 4, st[0] & 0b1111], dim=-1)
                    return tao.dequant_with_qmap(c, qmap, st[1]).view(-1)
                name = "torchao quantize_4bit_with_qmap+pack"
            impls.append((f"{name} [eager]", "peer", lambda tq=tq: tq(x), tdq, "scale_tensor + qmap"))
            if args.torchao_compile:
                ctq, ctdq = torch.compile(tq), torch.compile(tdq)
                impls.append((f"{name} [compiled]", "peer", lambda ctq=ctq: ctq(x), ctdq,
                              "torch.compile; compile time excluded"))

        lb_codes = None
        for label, kind, qf, dqf, note in impls:
            try:
                state = qf()   # the first warm-up call (slow peers take seconds per call)
                t_q = bench.time(qf, warmup=max(args.warmup - 1, 0))
                err = t_dq = None
                if dqf is not None:
                    y = dqf(state)
                    err = mean_abs(y, x)
                    del y
                    t_dq = bench.time(lambda: dqf(state), warmup=max(args.warmup - 1, 0))
                elif label.startswith("lowbit") and "stochastic" in label:
                    err = mean_abs(lowbit.dequantize_blockwise(state, backend="cpu"), x)
                match = ""
                codes = state.codes if hasattr(state, "codes") else state[0]
                if label == "lowbit cpu":
                    lb_codes = codes.reshape(-1)
                elif lb_codes is not None and kind == "peer" and codes.numel() == lb_codes.numel():
                    eq = (codes.reshape(-1) == lb_codes).float().mean().item()
                    match = f"codes == lowbit: {100 * eq:.3f}%"
                qnote = "; ".join(s for s in (note, match) if s)
                add("quantize", group, label, kind, q_bytes, t_q, err, qnote)
                if t_dq is not None:
                    add("dequantize", group, label, kind, dq_bytes, t_dq, err, note)
                    rt = Timing(t_q.times + t_dq.times, t_q.copies + t_dq.copies,
                                median=t_q.median + t_dq.median, min_=t_q.min + t_dq.min)
                    r = add("roundtrip", group, label, kind, q_bytes + dq_bytes, rt, err, note)
                    r["reps"] = f"{len(t_q.times)}+{len(t_dq.times)}"
                del state
            except Exception as e:  # noqa: BLE001 - a failing peer must not stop the run
                skip(f"{group} {label}", f"{type(e).__name__}: {e}")

    # -- stochastic rounding ----------------------------------------------------------------
    targets = [(torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float8_e4m3fn, "e4m3")]
    for dt, short in (targets if "sr" in families else []):
        out_bytes = 4 * n + n * torch.empty(0, dtype=dt).element_size()
        impls = [("lowbit cpu stochastic_round", "lowbit",
                  lambda dt=dt: lowbit.stochastic_round(x, dt, seed=sr_seed, backend="cpu"), "")]
        if tao is not None and dt is torch.bfloat16 and hasattr(tao, "_fp32_to_bf16_sr"):
            impls.append(("torchao _fp32_to_bf16_sr [eager]", "peer",
                          lambda: tao._fp32_to_bf16_sr(x), "16-bit random; private torchao helper"))
        impls.append((f"torch x.to({str(dt).replace('torch.', '')})", "baseline",
                      lambda dt=dt: x.to(dt), "round-to-nearest-even (no RNG)"))
        for label, kind, f, note in impls:
            try:
                y = f()   # the first warm-up call
                err = mean_abs(y, x)
                bias = (y.float() - x).mean().item()
                del y
                t = bench.time(f, warmup=max(args.warmup - 1, 0))
                add("sr", f"fp32→{short}", label, kind, out_bytes, t, err,
                    "; ".join(s for s in (note, f"mean err {bias:+.2e}") if s))
            except Exception as e:  # noqa: BLE001
                skip(f"SR {short} {label}", f"{type(e).__name__}: {e}")

    return ROWS[first:]


def run(args):
    require_lowbit_cpu()
    torch.set_num_threads(args.threads)
    if args.wait_quiet > 0:
        deadline = time.time() + args.wait_quiet
        while os.getloadavg()[0] >= 0.5 and time.time() < deadline:
            time.sleep(2.0)
        print(f"load average after waiting: {os.getloadavg()[0]:.2f}")
    wall0 = time.perf_counter()
    header = machine_header(args)
    print("\n".join(header), flush=True)

    torch.manual_seed(args.seed)
    n = args.n
    x = torch.randn(n)
    bench = Bench(n, args)
    print("timing (live):", flush=True)
    t_copy = copy_baselines(bench, args)
    collect(args, x, bench)

    wall = time.perf_counter() - wall0
    copy_bw_all = 8 * n / statistics.median(bench.all_copies) / 1e9 if bench.all_copies else \
        8 * n / t_copy.median / 1e9

    lines = list(header)
    for fam, title, ref_prefix, ref_header in FAMILIES:
        lines += family_table(fam, title, ref_prefix, ref_header, copy_bw_all)
    lines += [f"fp32 copy bandwidth over all {len(bench.all_copies)} interleaved copies: "
              f"median {copy_bw_all:.2f} GB/s.", "", LEGEND, ""]
    if NOTES:
        lines += ["Notes:", ""] + [f"- {s}" for s in NOTES] + [""]
    lines.append(f"Total benchmark wall time: {wall:.1f} s; load avg (1/5/15 min) at the end "
                 f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())} (above {args.threads} "
                 "means other processes shared the cores: trust the in-run ratios, not the "
                 "absolute ms).")
    text = "\n".join(lines)
    print()
    print(text, flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "quant_results.json"), "w") as f:
        json.dump({"n": n, "threads": args.threads, "quick": args.quick,
                   "copy_gbps_interleaved_median": copy_bw_all,
                   "rows": [{k: (v if k != "timing" else {"times_s": v.times, "copy_s": v.copies})
                             for k, v in r.items()} for r in ROWS]}, f, indent=1)
    plot(args.out, copy_bw_all)
    print(f"wrote {os.path.join(args.out, 'quant_report.md')} and quant_results.json", flush=True)


def plot(outdir, copy_bw):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the bar chart "
              "(pip install matplotlib to get bench/out/quant_bench.png)")
        return
    fams = [f for f in FAMILIES if f[0] != "bandwidth" and any(r["family"] == f[0] for r in ROWS)]
    colors = {"lowbit": "tab:blue", "peer": "tab:orange", "baseline": "tab:gray"}
    heights = [sum(r["family"] == f[0] for r in ROWS) for f in fams]
    fig, axes = plt.subplots(len(fams), 1, figsize=(11, 0.38 * sum(heights) + 1.2 * len(fams)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (fam, title, *_rest) in zip(axes[:, 0], fams):
        rows = [r for r in ROWS if r["family"] == fam]
        names = [f"{r['group']} · {r['label']}" for r in rows]
        vals = [r["bytes"] / r["timing"].median / 1e9 for r in rows]
        ax.barh(range(len(rows)), vals, color=[colors[r["kind"]] for r in rows])
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        if copy_bw:
            ax.axvline(copy_bw, color="k", ls="--", lw=1, label=f"fp32 copy {copy_bw:.1f} GB/s (interleaved median)")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("effective GB/s (essential bytes / median time), log scale", fontsize=8)
    fig.tight_layout()
    path = os.path.join(outdir, "quant_bench.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    run(ARGS)
