#!/usr/bin/env python
"""Curvature benchmark: the cost of one Hessian-vector product per route relative to one
gradient, each route's peak memory, the cost of a top-eigenvalue reading (lowbit.hessian against
PyHessian when installed) on a small transformer, and the Sophia optimizer step (lowbit's fused
SophiaG / SophiaH against the official code's SophiaG, pip sophia-opt, and pytorch-optimizer's
SophiaH, when installed) on N parameters in 8 tensors — all on the CPU.

The model is a byte-level decoder (2 layers, d=128, 4 heads, sequence 64, batch 8) written with
explicit attention so every route applies (fused scaled_dot_product_attention has no double
backward on CPU). Times are medians of interleaved repetitions, reported as ratios to the
gradient's time measured in the same run (issue 5's target: double backward <= 2.5x a gradient),
next to each pass's matrix-multiply FLOPs counted by torch.profiler: the arithmetic floor (one
double-backward product from scratch does 3x a gradient's matmul work on this model).
Peak memory: each route runs in a fresh process, and its peak resident set minus that of a
process that only takes gradients is reported.

Sophia steps are timed apart for the two kinds of step: plain ones (the gradient EMA and the
clipped update) and refresh ones (which also fold a Hessian estimate, given, into the EMA; the
estimate's own cost is the HVP's above). Each timed step follows one timed fp32 copy of N
elements, and "x copy" is their ratio (robust to the shared machine's noise).

Usage: python bench/hessian_bench.py [--quick] [--threads T] [--reps R] [--n N] [--model tiny]
Writes bench/out/hessian_report.md and bench/out/hessian_results.json. `python bench/run.py`
runs these rows with the other families in one report (it calls `collect`).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROUTES = ("double_backward", "forward_over_reverse", "finite_difference", "ggn")
# the transformer: byte vocabulary, width, layers, heads, sequence, batch
MODELS = {"default": dict(d=128, layers=2, heads=4, seq=64, batch=8),
          "tiny": dict(d=32, layers=1, heads=2, seq=16, batch=4)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, no memory runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 9)")
    p.add_argument("--n", type=int, default=2**22, help="Sophia step: parameters (default 2**22)")
    p.add_argument("--model", choices=sorted(MODELS), default="default",
                   help="transformer size (default: 2 layers, d=128; tiny: 1 layer, d=32)")
    p.add_argument("--no-peers", action="store_true", help="lowbit only (no PyHessian, "
                   "sophia-opt, pytorch-optimizer)")
    p.add_argument("--memory-route", default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    a = p.parse_args(argv)
    a.reps = a.reps or (3 if a.quick else 9)
    return a


class Block(torch.nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=256, d=128, layers=2, heads=4, seq=64):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def describe(model="default"):
    c = MODELS[model]
    return (f"{c['layers']}-layer d={c['d']} byte-level transformer ({c['batch']} x {c['seq']} "
            "tokens)")


def setup(seed=0, model="default"):
    c = MODELS[model]
    torch.manual_seed(seed)
    model = TinyLM(d=c["d"], layers=c["layers"], heads=c["heads"], seq=c["seq"])
    data = torch.randint(0, 256, (c["batch"], c["seq"] + 1))
    x, y = data[:, :-1], data[:, 1:]
    params = [p for p in model.parameters()]

    def loss_fn():
        return F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))

    v = [torch.randn_like(p) for p in params]
    return model, params, loss_fn, x, y, v


def route_fn(route, model, params, loss_fn, x, y, v):
    """A callable computing one product (or, for "gradient", one gradient)."""
    from lowbit import hessian
    if route == "gradient":
        return lambda: torch.autograd.grad(loss_fn(), params)
    if route == "ggn":
        return lambda: hessian.ggn_vp(lambda: model(x).reshape(-1, 256), params, v,
                                      y.reshape(-1), loss="cross_entropy")
    return lambda: hessian.hvp(loss_fn, params, v, method=route, module=model)


# A product of HessianOperator after its first: the double-backward graph of the gradient is
# kept (reuse_graph), so each further product is one backward of that backward — what every
# estimator (Lanczos, power iteration, Hutchinson, SharpnessMonitor) pays per product at a fixed
# point. Timed beside the routes; its memory is the kept graph's (not measured here).
REUSED = "double_backward, graph reused"


def time_routes(args):
    from lowbit import hessian
    model, params, loss_fn, x, y, v = setup(model=args.model)
    fns = {r: route_fn(r, model, params, loss_fn, x, y, v) for r in ("gradient",) + ROUTES}
    for fn in fns.values():  # warm-up (and the first-call costs of torch.func)
        fn()
    times = {r: [] for r in fns}
    for _ in range(args.reps):
        for r, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[r].append(time.perf_counter() - t0)
    out = {r: statistics.median(ts) for r, ts in times.items()}
    # (timed on its own: the finite-difference route moves the parameters' version counters,
    # which would make the operator rebuild its graph between the repetitions)
    op = hessian.HessianOperator(loss_fn, params, method="double_backward")
    op(v)
    reused = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        op(v)
        reused.append(time.perf_counter() - t0)
    out[REUSED] = statistics.median(reused)
    return out


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_work(model="default"):
    """{"gradient" | "double_backward" | REUSED: (matmul GFLOP, matmul calls)} of one gradient,
    one double-backward product from scratch and one with the graph kept, counted by
    torch.profiler (with_flops) over aten::mm / addmm / bmm: the arithmetic floor of each."""
    from torch.profiler import profile
    _, params, loss_fn, _, _, v = setup(model=model)
    kept = torch.autograd.grad(loss_fn(), params, create_graph=True)

    def scratch():
        g = torch.autograd.grad(loss_fn(), params, create_graph=True)
        return torch.autograd.grad(g, params, grad_outputs=v)
    fns = {"gradient": lambda: torch.autograd.grad(loss_fn(), params),
           "double_backward": scratch,
           REUSED: lambda: torch.autograd.grad(kept, params, grad_outputs=v, retain_graph=True)}
    out = {}
    for name, fn in fns.items():
        with profile(with_flops=True) as prof:
            fn()
        events = [e for e in prof.key_averages() if e.key in MATMULS]
        out[name] = (sum(e.flops for e in events) / 1e9, sum(e.count for e in events))
    return out


def peak_rss_mib(route, model="default"):
    """Peak resident set of a fresh process that runs the route 3 times (MiB)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-route", route,
                          "--model", model], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(route, model="default"):
    model, params, loss_fn, x, y, v = setup(model=model)
    fn = route_fn(route, model, params, loss_fn, x, y, v)
    for _ in range(3):
        fn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)


def eigen_readings(args):
    """(name, seconds, top eigenvalue, products) of lowbit's Lanczos and power iteration and of
    the installed peers on the same loss."""
    from lowbit import hessian
    model, params, loss_fn, x, y, _ = setup(model=args.model)
    rows = []
    # Lanczos at its default tolerance (residual <= 1e-6 |lambda|: the reference value), and
    # stopped by PyHessian's own rule (the estimate moved by <= 1e-3 relative in one step).
    for name, run in (("lanczos", lambda op: hessian.lanczos(op, 1, which="LA", seed=1)),
                      ("lanczos rtol=1e-3",
                       lambda op: hessian.lanczos(op, 1, which="LA", seed=1, rtol=1e-3)),
                      ("power", lambda op: hessian.power_iteration(op, 1, seed=1))):
        op = hessian.HessianOperator(loss_fn, params)
        t0 = time.perf_counter()
        res = run(op)
        rows.append((f"lowbit {name}", time.perf_counter() - t0,
                     float(res.eigenvalues[0]), res.num_matvecs))
    if args.no_peers:
        return rows
    try:
        from pyhessian import hessian as pyh  # noqa: F401
        crit = torch.nn.CrossEntropyLoss()

        class Flat(torch.nn.Module):  # PyHessian calls model(inputs) and criterion(out, targets)
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, z):
                return self.m(z).reshape(-1, 256)
        # Its default stops at the same rule as lowbit's rtol=1e-3 reading, but power iteration
        # on a spectrum without a gap at the top stops far short of the converged value; with
        # tol=1e-5 it reaches about the accuracy of that reading (same answer, its time).
        # PyHessian draws its start vector from torch's global generator, and its time varies
        # with it (0.6 to 1.2 s here): the reading with the median time over seeds 0, 1, 2.
        for name, kw in (("PyHessian eigenvalues(top_n=1)", {}),
                         ("PyHessian eigenvalues(top_n=1, tol=1e-5)", {"tol": 1e-5})):
            runs = []
            for seed in range(1 if args.quick else 3):
                comp = pyh(Flat(model), crit, data=(x, y.reshape(-1)), cuda=False)
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                vals, _ = comp.eigenvalues(top_n=1, **kw)
                runs.append((time.perf_counter() - t0, float(vals[0])))
            secs, val = sorted(runs)[len(runs) // 2]
            rows.append((name, secs, val, None))
    except ImportError:
        pass
    return rows


def relative_error(eigen_rows):
    """Each reading's |lambda - reference| / reference, the reference being lowbit's Lanczos at
    its default tolerance (the first row: residual <= 1e-6 lambda)."""
    ref = eigen_rows[0][2]
    return [abs(val - ref) / abs(ref) for _, _, val, _ in eigen_rows]


def monitor_readings(args):
    """(reading, seconds, Hessian-vector products) of SharpnessMonitor on the transformer: a
    cold reading, then readings warm-started from the previous eigenvector after one AdamW step
    each."""
    from lowbit import hessian
    import lowbit.optim as lo
    model, params, loss_fn, x, y, _ = setup(model=args.model)
    opt = lo.AdamW(params, lr=1e-4)
    mon = hessian.SharpnessMonitor(loss_fn, params, every=1, optimizer=opt, module=model)
    rows = []
    for k in range(4):
        for p, g in zip(params, torch.autograd.grad(loss_fn(), params)):
            p.grad = g
        opt.step()  # (the preconditioner is AdamW's second moment: one step first)
        t0 = time.perf_counter()
        row = mon.measure(k)
        rows.append(("cold" if k == 0 else f"warm {k}", time.perf_counter() - t0, row["hvps"]))
    return rows


def sophia_rows(peers=True):
    """(name, make(params) -> optimizer, step(opt, estimate or None)) of the Sophia steps; the
    peers' names do not start with "lowbit"."""
    import lowbit.optim as lo
    rows = [("lowbit SophiaG (32-bit states)", lambda ps: lo.SophiaG(ps),
             lambda o, e: o.step(bs=5120, hessian=e)),
            ("lowbit SophiaG8bit", lambda ps: lo.SophiaG8bit(ps),
             lambda o, e: o.step(bs=5120, hessian=e)),
            ("lowbit SophiaH (32-bit states)", lambda ps: lo.SophiaH(ps, update_period=10**9),
             lambda o, e: o.step(hessian=e)),
            ("lowbit SophiaH8bit", lambda ps: lo.SophiaH8bit(ps, update_period=10**9),
             lambda o, e: o.step(hessian=e))]
    if not peers:
        return rows
    try:
        import sophia_opt

        def official(o, e):  # its update_hessian() reads .grad: the estimate's unit g*g
            if e is not None:
                saved = [p.grad for p in o.param_groups[0]["params"]]
                for p, x in zip(o.param_groups[0]["params"], e):
                    p.grad = x
                o.update_hessian()
                for p, g in zip(o.param_groups[0]["params"], saved):
                    p.grad = g
            o.step(bs=5120)
        rows.append(("official SophiaG (sophia-opt)", lambda ps: sophia_opt.SophiaG(ps),
                     official))
    except ImportError:
        pass
    try:
        import pytorch_optimizer as pto
        rows.append(("pytorch-optimizer SophiaH", lambda ps: pto.SophiaH(ps, update_period=10**9),
                     lambda o, e: o.step(hessian=e) if e is not None else o.step()))
    except ImportError:
        pass
    return rows


def time_sophia(args):
    """{name: (plain step s, refresh step s, plain x copy, copy s, state bytes)}: medians over
    interleaved steps, and the optimizer-state bytes."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from optim_bench import copy_timer, state_bytes
    copy = copy_timer(args.n)
    rows = sophia_rows(peers=not args.no_peers)
    g = torch.Generator().manual_seed(0)
    runs = []
    for name, make, step in rows:
        ps = [torch.nn.Parameter(torch.randn(args.n // 8, generator=g) * 0.1) for _ in range(8)]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        est = [torch.rand(p.shape, generator=g) for p in ps]
        opt = make(ps)
        step(opt, est)  # states created, a first estimate in
        runs.append((name, opt, step, est))
    out = {name: ([], [], [], []) for name, *_ in runs}
    for rep in range(args.reps):
        for name, opt, step, est in runs:
            for refresh in (False, True):
                c = copy()
                t0 = time.perf_counter()
                step(opt, est if refresh else None)
                dt = time.perf_counter() - t0
                out[name][1 if refresh else 0].append(dt)
                if not refresh:
                    out[name][2].append(dt / c)
                    out[name][3].append(c)
    sbytes = {name: state_bytes(opt) for name, opt, *_ in runs}
    return {k: tuple(statistics.median(x) for x in v) + (sbytes[k],) for k, v in out.items()}


def collect(args):
    """All the measurements: {"times_s": route -> median s (and "gradient"), "extra_peak_mib":
    route -> MiB (not with --quick), "eigen": [(name, s, lambda_max, products)], "monitor":
    [(reading, s, products)], "sophia_s": name -> (plain s, refresh s, plain x copy, copy s,
    state bytes)}."""
    times = time_routes(args)
    memory = {}
    if not args.quick:
        base = peak_rss_mib("gradient", args.model)
        memory = {r: peak_rss_mib(r, args.model) - base for r in ROUTES}
    return {"times_s": times, "extra_peak_mib": memory, "matmul": matmul_work(args.model),
            "eigen": eigen_readings(args), "monitor": monitor_readings(args),
            "sophia_s": time_sophia(args)}


def main(args):
    torch.set_num_threads(args.threads)
    res = collect(args)
    times, memory = res["times_s"], res["extra_peak_mib"]
    grad = times["gradient"]
    lines = [f"Hessian-vector products on a {describe(args.model)}, "
             f"CPU, {args.threads} threads (`python bench/hessian_bench.py"
             f"{' --quick' if args.quick else ''}`).", "",
             "| route | ms | x one gradient | extra peak memory (MiB) |", "|---|---|---|---|",
             f"| gradient (baseline) | {grad * 1e3:.2f} | 1.00 | 0 |"]
    for r in ROUTES + (REUSED,):
        mem = f"{memory[r]:.0f}" if r in memory else "-"
        lines.append(f"| {r} | {times[r] * 1e3:.2f} | {times[r] / grad:.2f} | {mem} |")
    work = res["matmul"]
    lines += ["", "Matrix-multiply work (torch.profiler with_flops, aten::mm / addmm / bmm): the "
              "arithmetic floor of each pass:", "",
              "| pass | matmul GFLOP | x one gradient | matmul calls |", "|---|---|---|---|"]
    for name, (gflop, calls) in work.items():
        lines.append(f"| {name} | {gflop:.3f} | {gflop / work['gradient'][0]:.2f} | {calls} |")
    eig = res["eigen"]
    lines += ["", "Top Hessian eigenvalue of the same loss:", "",
              "| method | seconds | lambda_max | error vs converged | Hessian-vector products |",
              "|---|---|---|---|---|"]
    for (name, secs, val, n), err in zip(eig, relative_error(eig)):
        lines.append(f"| {name} | {secs:.2f} | {val:.4f} | {err * 100:.2f}% | "
                     f"{n if n is not None else '-'} |")
    mon = res["monitor"]
    lines += ["", "SharpnessMonitor readings (λ_max of the AdamW-preconditioned Hessian, Lanczos):",
              "", "| reading | seconds | Hessian-vector products |", "|---|---|---|"]
    lines += [f"| {name} | {secs:.2f} | {n} |" for name, secs, n in mon]
    sophia = res["sophia_s"]
    lines += ["", f"Sophia optimizer steps, {args.n} parameters in 8 fp32 tensors (the estimate "
              "given, not computed):", "",
              "| optimizer | plain step ms | x copy | refresh step ms |", "|---|---|---|---|"]
    for name, (plain, refresh, xcopy, *_rest) in sophia.items():
        lines.append(f"| {name} | {plain * 1e3:.2f} | {xcopy:.2f} | {refresh * 1e3:.2f} |")
    text = "\n".join(lines)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hessian_report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "hessian_results.json"), "w") as f:
        json.dump({"times_s": times, "extra_peak_mib": memory, "matmul": work,
                   "eigen": [list(r) for r in eig], "monitor": [list(r) for r in mon],
                   "sophia_s": sophia}, f, indent=1)


if __name__ == "__main__":
    a = parse_args()
    if a.memory_route:
        torch.set_num_threads(a.threads)
        memory_child(a.memory_route, a.model)
    else:
        main(a)
