"""lowbit's pretraining demo: train one small LLaMA-style byte-level decoder with several
optimizers and precisions on the same data, seed and order, and compare them.

    python -m lowbit.examples.pretrain                # the default comparison (~5 min, 2 cores)
    python -m lowbit.examples.pretrain --runs lowbit-adamw8bit@bf16,torch-adamw@bf16 --steps 600
    python -m lowbit.examples.pretrain --precision int4 --runs torch-adamw,lowbit-stablespam
    python -m lowbit.examples.pretrain --preset small --data my_texts/ --out runs_small
    python -m lowbit.examples.pretrain --stop-at 100 ...  then the same command with --resume

Corpus: the running Python's standard library sources unless --data is given (corpus.py). Each
run trains in its own process (so peak memory is per run), writes
<out>/runs/<run>/{steps.csv,summary.json,checkpoint.pt}; at the end <out> holds steps.csv (every
step of every run), summary.md (the table) and loss_curves.png / memory.png (/ sharpness.png).
Every input is checked before any training starts.
"""
import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time

import torch

from . import corpus as data
from .model import Decoder, DecoderConfig
from .report import merge_step_csvs, table_markdown, table_text, write_plots
from .runs import DEFAULT_RUNS, known_optimizers, parse_runs
from .train import TrainConfig, run_dir, train_run

# name -> (model config, batch size, steps, eval every). "default" is sized for about 5 minutes
# of the default comparison on 2 CPU cores; the larger ones are for real hardware or patience.
PRESETS = {
    "tiny": (DecoderConfig(dim=32, n_layers=1, n_heads=2, seq_len=32), 4, 20, 10),
    "default": (DecoderConfig(dim=128, n_layers=4, n_heads=4, seq_len=128), 16, 300, 50),
    "small": (DecoderConfig(dim=256, n_layers=6, n_heads=8, seq_len=256), 32, 2000, 200),
    "medium": (DecoderConfig(dim=768, n_layers=12, n_heads=12, seq_len=512), 32, 10000, 500),
    "large": (DecoderConfig(dim=2048, n_layers=24, n_heads=16, seq_len=2048), 64, 20000, 1000),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                   help="comma-separated optimizer@precision (fp32 | bf16 | fp8 | int4 | "
                        "fp4: the last three quantize the linear layers, lowbit.nn); --list "
                        "shows the optimizers (default: %(default)s)")
    p.add_argument("--precision", default="fp32",
                   help="the precision of runs given without @precision (default %(default)s)"
                        ", e.g. --precision int4 --runs torch-adamw,lowbit-stablespam")
    p.add_argument("--list", action="store_true", help="list the optimizer names and exit")
    p.add_argument("--data", default=None, help="a text file or folder (default: the Python "
                                                "standard library's sources)")
    p.add_argument("--out", default="pretrain_out", help="output folder (default %(default)s)")
    p.add_argument("--steps", type=int, help="training steps (preset's by default)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--warmup", type=int, help="warmup steps (default: 10%% of the steps)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: "
                                                          "torch's)")
    p.add_argument("--resume", action="store_true",
                   help="continue each run from its checkpoint in --out (same options)")
    p.add_argument("--stop-at", type=int, default=0,
                   help="stop every run after this step (as a preempted job; then --resume)")
    p.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--sharpness", type=int, default=0, metavar="N",
                   help="measure the sharpness every N steps (lowbit.hessian.SharpnessMonitor)")
    return p.parse_args(argv)


def config_from_args(a) -> TrainConfig:
    if a.preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {a.preset!r}; choose from "
                         f"{', '.join(PRESETS)}")
    model, batch_size, steps, eval_every = PRESETS[a.preset]
    overrides = {k: v for k, v in (("dim", a.dim), ("n_layers", a.layers), ("n_heads", a.heads),
                                   ("seq_len", a.seq_len)) if v is not None}
    model = dataclasses.replace(model, **overrides)
    pick = lambda given, preset: preset if given is None else given
    steps, batch_size = pick(a.steps, steps), pick(a.batch_size, batch_size)
    eval_every = pick(a.eval_every, min(eval_every, steps))
    for name, v in (("--steps", steps), ("--batch-size", batch_size), ("--eval-every", eval_every),
                    ("--dim", model.dim), ("--layers", model.n_layers), ("--heads", model.n_heads),
                    ("--seq-len", model.seq_len)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    return TrainConfig(model=model, batch_size=batch_size, steps=steps,
                       lr=a.lr, warmup=a.warmup if a.warmup is not None else max(1, steps // 10),
                       weight_decay=a.weight_decay,
                       eval_every=eval_every, seed=a.seed,
                       ckpt_every=a.ckpt_every, stop_at=a.stop_at,
                       sharpness_every=a.sharpness, threads=a.threads)


def available_memory() -> int:
    """Bytes the kernel reports as available (MemAvailable), or total RAM without /proc."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_memory(cfg: TrainConfig) -> int:
    """Upper estimate of one run's bytes: parameters, gradients, the largest optimizer state
    (fp32 Adam: 8 B/param) and foreach temporaries in fp32, plus the activations autograd
    keeps (per layer ~ 20 dim-wide and 3 hidden-wide fp32 rows per token, the attention
    matrix per head, the logits and their softmax), with a 1.5x margin."""
    with torch.device("meta"):
        nparams = Decoder(cfg.model).num_params()
    m, tokens = cfg.model, cfg.batch_size * cfg.model.seq_len
    per_layer = tokens * (20 * m.dim + 3 * m.hidden) + 2 * cfg.batch_size * m.n_heads * m.seq_len ** 2
    acts = 4 * (m.n_layers * per_layer + 3 * tokens * m.vocab)
    return int(1.5 * (nparams * 4 * 6 + acts))


def check_memory(cfg: TrainConfig, preset: str):
    need, have = estimate_memory(cfg), available_memory()
    if need > have:
        raise MemoryError(f"--preset {preset} (with the given overrides) needs about "
                          f"{need / 2**30:.1f} GiB per run, but this machine has "
                          f"{have / 2**30:.1f} GiB available: choose a smaller --preset or lower "
                          f"--batch-size / --seq-len / --dim / --layers")


def _die_with_parent():
    """Linux: the run gets SIGTERM when the driver process dies (killed, not just Ctrl-C, which
    reaches the whole process group anyway), instead of training on as an orphan."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(spec, cfg_dict, data_path, out, resume, label):
    _die_with_parent()
    train_run(spec, TrainConfig.from_dict(cfg_dict), data_path, out, resume, label)


def run_all(specs, cfg: TrainConfig, data_path, out: str, resume: bool) -> list:
    """Each run in a fresh spawned process (its own peak memory and thread pool); summaries in
    order. A failed run stops the comparison with its exit code."""
    ctx = multiprocessing.get_context("spawn")
    summaries = []
    for i, spec in enumerate(specs):
        label = f"[{i + 1}/{len(specs)}] {spec.name:<28}"
        proc = ctx.Process(target=_worker, args=(spec, cfg.as_dict(), data_path, out, resume,
                                                 label))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"run {spec.name} failed (exit code {proc.exitcode}); its output "
                               f"is above")
        with open(os.path.join(run_dir(out, spec), "summary.json")) as f:
            summaries.append(json.load(f))
    return summaries


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.list:
        print("\n".join(known_optimizers()))
        return 0
    try:
        specs = parse_runs(a.runs, a.precision)
        cfg = config_from_args(a)
        corpus = data.load_corpus(a.data)
        data.check_fits(corpus, cfg.model.seq_len)
        check_memory(cfg, a.preset)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    with torch.device("meta"):
        nparams = Decoder(cfg.model).num_params()
    print(f"model: {nparams / 1e6:.2f} M parameters ({cfg.model.n_layers} layers, dim "
          f"{cfg.model.dim}, {cfg.model.n_heads} heads, seq {cfg.model.seq_len}); batch "
          f"{cfg.batch_size} x {cfg.model.seq_len} bytes; {cfg.steps} steps; lr {cfg.lr} "
          f"(warmup {cfg.warmup}, cosine to {cfg.min_lr_ratio:g}x)")
    print(f"data: {corpus.describe()}")
    t0 = time.perf_counter()
    summaries = run_all(specs, cfg, a.data, a.out, a.resume)
    step_csvs = {s["run"]: os.path.join(run_dir(a.out, spec), "steps.csv")
                 for s, spec in zip(summaries, specs)}
    sharp = {spec.name: p for spec in specs
             if os.path.exists(p := os.path.join(run_dir(a.out, spec), "sharpness.csv"))}
    merge_step_csvs(step_csvs.values(), os.path.join(a.out, "steps.csv"))
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(f"Command: `python -m lowbit.examples.pretrain {' '.join(argv or sys.argv[1:])}`"
                f"\n\nModel: {nparams / 1e6:.2f} M parameters, {cfg.steps} steps of "
                f"{cfg.batch_size} x {cfg.model.seq_len} bytes; data: {corpus.describe()}\n\n")
        f.write(table_markdown(summaries) + "\n")
    plots = write_plots(step_csvs, summaries, sharp, a.out)
    print()
    print(table_text(summaries))
    print(f"\n{len(specs)} runs in {time.perf_counter() - t0:.0f} s. Outputs in {a.out}/: "
          f"steps.csv, summary.md" + "".join(f", {os.path.basename(p)}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
