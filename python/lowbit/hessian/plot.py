"""PNG plots of a spectral density and of a SharpnessMonitor's readings. matplotlib is imported
when a plot is made, and only its object-oriented Agg canvas is used (no pyplot, no global
backend switch), so plotting works headless and leaves the caller's matplotlib state alone."""
import math
import os


def _figure(width=6.4, height=4.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is an optional dependency
        raise ImportError("lowbit.hessian plotting needs matplotlib (pip install matplotlib)") \
            from e
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_density(density, path: str | os.PathLike, *, log_scale: bool = True,
                 title: str = "Hessian spectral density (SLQ)") -> str:
    """The SpectralDensity `density` as a line plot (log-scaled density by default, as is usual
    for Hessian spectra with a bulk near 0 and a few outliers); returns the path."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    y = density.density.clamp_min(1e-12) if log_scale else density.density
    ax.plot(density.grid.numpy(), y.numpy(), lw=1.2)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"{title} (σ = {density.sigma:.3g}, {density.nodes.shape[0]} runs)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return os.fspath(path)


def plot_sharpness(history, path: str | os.PathLike, *,
                   title: str = "Sharpness vs stability threshold") -> str:
    """Sharpness and the stability threshold against step from SharpnessMonitor.history rows
    (dicts with step, sharpness, threshold); returns the path."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["sharpness"] for r in history], "o-", ms=3, label="λ_max")
    thr = [(r["step"], r["threshold"]) for r in history if math.isfinite(r["threshold"])]
    if thr:
        ax.plot([s for s, _ in thr], [t for _, t in thr], "--", color="tab:red",
                label="stability threshold")
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return os.fspath(path)
