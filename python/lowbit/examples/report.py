"""The demo's outputs: the summary table (terminal + Markdown), the CSV of every step of every
run, and the PNG charts (loss curves on one chart, optimizer-state memory per run, the sharpness
curve when it was measured). matplotlib is optional: without it the PNGs are skipped with a note.
"""
import csv
import math
import os

from .train import STEP_COLUMNS

TABLE_COLUMNS = (("run", "run", "{}"), ("train loss", "train_loss", "{:.4f}"),
                 ("val loss", "val_loss", "{:.4f}"), ("val ppl/byte", "val_ppl", "{:.3f}"),
                 ("state MB", "state_mb", "{:.2f}"), ("state B/param", "state_bytes_per_param",
                                                     "{:.3f}"),
                 ("train peak MB", "train_peak_mb", "{:.1f}"), ("step ms", "step_ms", "{:.1f}"),
                 ("optimizer ms", "optimizer_ms", "{:.2f}"), ("tokens/s", "tokens_per_s",
                                                              "{:.0f}"))


def _cells(summary: dict) -> list:
    s = dict(summary, state_mb=summary["state_bytes"] / 2**20)
    out = []
    for _, key, fmt in TABLE_COLUMNS:
        v = s[key]
        out.append(fmt.format(v) if not (isinstance(v, float) and not math.isfinite(v)) else str(v))
    if summary.get("diverged"):
        out[0] += " (diverged)"
    return out


def table_text(summaries) -> str:
    rows = [[c for c, _, _ in TABLE_COLUMNS]] + [_cells(s) for s in summaries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def table_markdown(summaries) -> str:
    head = [c for c, _, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(s)) + " |" for s in summaries]
    return "\n".join(lines)


def merge_step_csvs(paths, out_path: str) -> int:
    n = 0
    with open(out_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=STEP_COLUMNS)
        w.writeheader()
        for p in paths:
            with open(p, newline="") as src:
                for row in csv.DictReader(src):
                    w.writerow(row)
                    n += 1
    return n


def _read_steps(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ema(xs, beta=0.9):
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def write_plots(step_csvs: dict, summaries, sharpness_csvs: dict, out: str) -> list:
    """PNG files written (empty when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG charts (pip install matplotlib)")
        return []
    written = []
    fig, (ax_tr, ax_val, ax_rel) = plt.subplots(1, 3, figsize=(18, 5))
    base = None  # the first run's held-out losses: the third panel's zero line
    rel = {}  # run -> its differences from the base run (for the third panel's scale)
    for name, path in step_csvs.items():
        rows = [r for r in _read_steps(path) if math.isfinite(float(r["loss"]))]
        if not rows:
            continue
        line, = ax_tr.plot([int(r["step"]) for r in rows], _ema([float(r["loss"]) for r in rows]),
                           label=name, lw=1.2)
        vals = dict((int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"] != "")
        if not vals:
            continue
        ax_val.plot(list(vals), list(vals.values()), marker="o", ms=3, label=name,
                    color=line.get_color())
        if base is None:
            base, base_name = vals, name
        common = [k for k in vals if k in base]
        rel[name] = [vals[k] - base[k] for k in common]
        ax_rel.plot(common, rel[name], marker="o", ms=3, color=line.get_color())
    ax_tr.set(title="training loss (EMA 0.9)", xlabel="step", ylabel="nats / byte")
    ax_val.set(title="held-out loss", xlabel="step", ylabel="nats / byte")
    if base is not None:
        # zoom on the bulk of the runs: one far-off run (e.g. an untuned optimizer) would
        # otherwise flatten every other difference; the runs cut off are named in the title
        spread = sorted(max(abs(d) for d in ds) for ds in rel.values() if ds)
        lim = max(0.02, 1.3 * spread[(len(spread) - 1) * 3 // 4])
        off = [n for n, ds in rel.items() if ds and max(abs(d) for d in ds) > lim]
        ax_rel.set_ylim(-lim, lim)
        ax_rel.set(title=f"held-out loss minus {base_name}'s" +
                   (f"\n(off scale: {', '.join(off)})" if off else ""),
                   xlabel="step", ylabel="nats / byte (lower is better)")
    for ax in (ax_tr, ax_val, ax_rel):
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out, "loss_curves.png")))

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(summaries) + 1.5))
    names = [s["run"] for s in summaries]
    state = [s["state_bytes"] / 2**20 for s in summaries]
    params = [s["param_bytes"] / 2**20 for s in summaries]
    ax.barh(names, params, label="parameters", color="#bbbbbb")
    ax.barh(names, state, left=params, label="optimizer state", color="#3070b0")
    for i, (p, s) in enumerate(zip(params, state)):
        ax.text(p + s, i, f" {s:.2f} MB", va="center", fontsize=8)
    ax.set_xlim(0, 1.18 * max(p + s for p, s in zip(params, state)))  # room for the labels
    ax.invert_yaxis()
    ax.set(title="memory: parameters + optimizer state", xlabel="MB")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out, "memory.png")))

    if sharpness_csvs:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, path in sharpness_csvs.items():
            rows = _read_steps(path)
            ax.plot([int(r["step"]) for r in rows], [float(r["sharpness"]) for r in rows],
                    marker="o", ms=3, label=name)
        ax.set(title="sharpness (top eigenvalue; preconditioned for Adam-family)", xlabel="step",
               yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, os.path.join(out, "sharpness.png")))
    plt.close("all")
    return written


def _save(fig, path):
    fig.savefig(path, dpi=110)
    return path
