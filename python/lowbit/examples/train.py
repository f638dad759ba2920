"""One training run of the pretraining demo: model, optimizer, schedule, the step loop, held-out
evaluation, per-step CSV rows and checkpoints. Runs inside its own process (pretrain.py), so
its peak memory is its own.

Determinism: the model is initialised from the shared seed, batch(step) is a pure function of
(seed, step), lowbit's stochastic rounding and Sophia's sampled labels are keyed by the step,
and no op draws from the global RNG during training — so a run resumed from a checkpoint
reproduces the uninterrupted run bit for bit (tests/test_example_pretrain.py checks it).
"""
import csv
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field

import torch

import lowbit.nn as lowbit_nn

from . import corpus as data
from .model import Decoder, DecoderConfig, lm_loss
from .progress import Progress
from .runs import SOPHIA_EVERY, RunSpec, build_optimizer, state_bytes

STEP_COLUMNS = ("run", "step", "loss", "lr", "step_ms", "optimizer_ms", "tokens_per_s", "val_loss")


@dataclass
class TrainConfig:
    model: DecoderConfig = field(default_factory=DecoderConfig)
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    ckpt_every: int = 0      # 0: a checkpoint at the end of the run only
    stop_at: int = 0         # > 0: stop after this step (a preempted job; continue with resume)
    sharpness_every: int = 0
    threads: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = DecoderConfig(**d["model"])
        d["betas"] = tuple(d["betas"])
        return cls(**d)

    def lr_at(self, step: int) -> float:
        """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(self.steps - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 *
                          (1 + math.cos(math.pi * progress)))


def run_dir(out: str, spec: RunSpec) -> str:
    return os.path.join(out, "runs", spec.name.replace("@", "_"))


def checkpoint_path(out: str, spec: RunSpec) -> str:
    return os.path.join(run_dir(out, spec), "checkpoint.pt")


def build_model(cfg: TrainConfig, spec: RunSpec) -> Decoder:
    torch.manual_seed(cfg.seed)
    model = Decoder(cfg.model).to(spec.dtype)
    if spec.layers:  # fp8 / int4 / fp4: the linear layers (not the head) fake-quantized
        lowbit_nn.convert(model, lowbit_nn.PRESETS[spec.layers])
    return model


@torch.no_grad()
def evaluate(model, batches) -> float:
    return sum(lm_loss(model(x), y).item() for x, y in batches) / len(batches)


def _set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _save(path: str, model, optimizer, step: int, rows, cfg: TrainConfig, spec: RunSpec):
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "rows": rows, "config": cfg.as_dict(), "run": spec.name}, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def _load(path: str, model, optimizer, cfg: TrainConfig, spec: RunSpec):
    ckpt = torch.load(path, weights_only=True)
    saved = TrainConfig.from_dict(ckpt["config"])
    # the same trajectory needs the same model, data order and schedule; these may differ
    same = {k: v for k, v in cfg.as_dict().items() if k not in ("stop_at", "ckpt_every",
                                                                   "threads")}
    theirs = {k: v for k, v in saved.as_dict().items() if k in same}
    diff = [k for k in same if same[k] != theirs.get(k)]
    if diff or ckpt["run"] != spec.name:
        raise ValueError(f"--resume: the checkpoint {path} was written by run {ckpt['run']} with "
                         f"different settings ({', '.join(diff) or 'run name'}); resume with the "
                         f"same options or start a fresh --out")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["step"], ckpt["rows"]


def _lr_scales(optimizer, base_lr: float):
    # the optimizer-specific lr factors of runs.build_optimizer (Sophia's lr/2, Lion's lr/3),
    # kept so the shared schedule scales them instead of overwriting them
    for group in optimizer.param_groups:
        group.setdefault("lr_scale", group["lr"] / base_lr)


def train_run(spec: RunSpec, cfg: TrainConfig, corpus_path, out: str, resume: bool,
              label: str = "") -> dict:
    """Train one run; writes run_dir/steps.csv, run_dir/summary.json and the checkpoint; returns
    the summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = data.load_corpus(corpus_path)
    seq = cfg.model.seq_len
    rss0 = _current_rss_mb()
    model = build_model(cfg, spec)
    params = list(model.parameters())
    optimizer = build_optimizer(spec, params, lr=cfg.lr, betas=cfg.betas,
                                weight_decay=cfg.weight_decay, seed=cfg.seed)
    _lr_scales(optimizer, cfg.lr)
    os.makedirs(run_dir(out, spec), exist_ok=True)
    ckpt = checkpoint_path(out, spec)
    start, rows = 0, []
    if resume and os.path.exists(ckpt):
        start, rows = _load(ckpt, model, optimizer, cfg, spec)
    val = data.eval_batches(corpus.val, cfg.eval_batches, cfg.batch_size, seq, cfg.seed)
    monitor = _sharpness_monitor(cfg, model, optimizer, corpus, out, spec)
    tokens = cfg.batch_size * seq
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    bar = Progress(label or spec.name, cfg.steps, start)
    diverged = False
    for step in range(start, end):
        x, y = data.batch(corpus.train, step, cfg.batch_size, seq, cfg.seed)
        lr = cfg.lr_at(step)
        _set_lr(optimizer, lr)
        t0 = time.perf_counter()
        loss = lm_loss(model(x), y)
        loss.backward()
        if spec.is_sophia_g and step % SOPHIA_EVERY == 0:
            _sophia_refresh(optimizer, model, x, step, cfg.seed)
        t1 = time.perf_counter()
        if spec.is_sophia_g:
            optimizer.step(bs=tokens)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        loss_v = loss.item()
        row = {"run": spec.name, "step": step + 1, "loss": loss_v, "lr": lr,
               "step_ms": (t2 - t0) * 1e3, "optimizer_ms": (t2 - t1) * 1e3,
               "tokens_per_s": tokens / (t2 - t0), "val_loss": ""}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row["val_loss"] = evaluate(model, val)
        if monitor is not None:
            monitor.maybe_measure(step + 1)
        rows.append(row)
        bar.update(step + 1, loss=f"{loss_v:.3f}", **{"tok/s": f"{row['tokens_per_s']:.0f}"})
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
            _save(ckpt, model, optimizer, step + 1, rows, cfg, spec)
        if not math.isfinite(loss_v):
            diverged = True
            break
    _save(ckpt, model, optimizer, rows[-1]["step"] if rows else 0, rows, cfg, spec)
    bar.close("diverged (non-finite loss)" if diverged else "")
    summary = _summary(spec, cfg, rows, model, optimizer, diverged, corpus)
    summary["train_peak_mb"] = summary["peak_rss_mb"] - rss0
    _write(out, spec, rows, summary)
    return summary


def _current_rss_mb() -> float:
    """Resident memory now, and the kernel's peak (VmHWM) reset to it (Linux: writing 5 to
    /proc/self/clear_refs), so the run's peak is measured from here: after the interpreter,
    torch and the corpus (whose loading peaks higher) are in memory. 0 without /proc."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except (OSError, ValueError):
        return 0.0


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise ValueError(field)


def _peak_rss_mb() -> float:
    """This process's peak resident memory (since the reset above where it worked)."""
    try:
        return _status_mb("VmHWM")
    except (OSError, ValueError):
        # ru_maxrss is KiB on Linux: the whole process's peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sophia_refresh(optimizer, model, x, step, seed):
    """SophiaG's Gauss-Newton-Bartlett estimate on this step's batch (labels sampled from the
    model's own predictions, keyed by the step), applied by the next step()."""
    from lowbit.hessian import gnb_estimate
    # (gnb_estimate differentiates with autograd.grad: the step's .grad stays as it is)
    est = gnb_estimate(lambda: model(x), list(model.parameters()), seed=seed,
                       offset=step * x.numel())
    optimizer.update_hessian(est)


def _sharpness_monitor(cfg, model, optimizer, corpus, out, spec):
    if not cfg.sharpness_every:
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lowbit.hessian import SharpnessMonitor
    x, y = data.batch(corpus.train, -1_000_000, cfg.batch_size, cfg.model.seq_len, cfg.seed)
    xf = x[: max(1, cfg.batch_size // 4)]
    yf = y[: xf.shape[0]]

    def probe_loss():
        # SDPA's math kernel: CPU flash attention has no double backward, which would force the
        # HVPs onto finite differences (lowbit.hessian.hvp's auto route warns about it)
        with sdpa_kernel(SDPBackend.MATH):
            return lm_loss(model(xf), yf)

    return SharpnessMonitor(probe_loss, model, every=cfg.sharpness_every,
                            optimizer=optimizer, max_steps=20, tol=1e-2, seed=cfg.seed,
                            csv_path=os.path.join(run_dir(out, spec), "sharpness.csv"))


def _summary(spec, cfg, rows, model, optimizer, diverged, corpus) -> dict:
    tail = rows[-max(1, len(rows) // 10):]
    vals = [r["val_loss"] for r in rows if r["val_loss"] != ""]
    step_ms = sorted(r["step_ms"] for r in rows[1:] or rows)
    opt_ms = sorted(r["optimizer_ms"] for r in rows[1:] or rows)
    nparams = sum(p.numel() for p in model.parameters())
    sbytes = state_bytes(optimizer)
    val_loss = vals[-1] if vals else float("nan")
    return {
        "run": spec.name, "optimizer": spec.optimizer, "precision": spec.precision,
        "steps": rows[-1]["step"] if rows else 0, "diverged": diverged,
        "train_loss": sum(r["loss"] for r in tail) / len(tail) if rows else float("nan"),
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if math.isfinite(val_loss) and val_loss < 50 else float("inf"),
        "params": nparams, "state_bytes": sbytes, "state_bytes_per_param": sbytes / nparams,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "peak_rss_mb": _peak_rss_mb(),
        "step_ms": step_ms[len(step_ms) // 2] if rows else float("nan"),
        "optimizer_ms": opt_ms[len(opt_ms) // 2] if rows else float("nan"),
        "tokens_per_s": cfg.batch_size * cfg.model.seq_len * 1e3 / step_ms[len(step_ms) // 2]
        if rows else float("nan"),
        "corpus": corpus.describe(),
    }


def _write(out, spec, rows, summary):
    d = run_dir(out, spec)
    with open(os.path.join(d, "steps.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=STEP_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
