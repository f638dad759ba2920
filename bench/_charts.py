"""PNG bar charts of the unified runner's rows, one per family (matplotlib, optional): effective
GB/s against the copy bandwidth where every row has a byte count, else the median time."""
import os

COLORS = {"lowbit": "tab:blue", "peer": "tab:orange", "baseline": "tab:gray"}


def family_chart(path, title, rows, copy_gbps):
    """Write one chart; returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_bw = all(r["gbps"] for r in rows)
    vals = [r["gbps"] if by_bw else r["time_s"] * 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.3 * len(rows) + 1.4))
    ax.barh(range(len(rows)), vals, color=[COLORS.get(r["kind"], "tab:gray") for r in rows])
    ax.set_yticks(range(len(rows)), [f"{r['group']} · {r['label']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    if by_bw:
        if copy_gbps:
            ax.axvline(copy_gbps, color="k", ls="--", lw=1,
                       label=f"fp32 copy {copy_gbps:.1f} GB/s (this run)")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel("effective GB/s (bytes moved / median time), log scale", fontsize=8)
    else:
        ax.set_xlabel("median time (ms), log scale", fontsize=8)
    ax.set_title(f"{title} — blue lowbit, orange peers, gray baselines", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
