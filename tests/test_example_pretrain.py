"""The pretraining demo (lowbit.examples): its building blocks, a tiny whole run through the
command line, resume equality and the errors raised before any training."""
import csv
import json
import os

import pytest
import torch

from lowbit.examples import corpus as data
from lowbit.examples.model import Decoder, DecoderConfig, apply_rotary, lm_loss, rotary_tables
from lowbit.examples.pretrain import PRESETS, estimate_memory, main
from lowbit.examples.report import write_plots
from lowbit.examples.runs import DEFAULT_RUNS, RunSpec, build_optimizer, parse_runs
from lowbit.examples.train import TrainConfig, build_model, train_run

PNG = b"\x89PNG\r\n\x1a\n"
TINY = DecoderConfig(dim=32, n_layers=2, n_heads=2, seq_len=16)


def _text_folder(root, n_files=40):
    """A folder of small text files: enough for both splits of the CRC32 rule."""
    root.mkdir()
    for i in range(n_files):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(30))
        (root / f"mod_{i:03d}.py").write_text(body)
    return root


def _file(path, content: bytes):
    path.write_bytes(content)
    return path


# ---- model ------------------------------------------------------------------------------------

def test_decoder_shapes_and_gradients():
    torch.manual_seed(0)
    model = Decoder(TINY)
    x = torch.randint(0, 256, (3, 16))
    logits = model(x)
    assert logits.shape == (3, 16, 256) and logits.dtype == torch.float32
    lm_loss(logits, torch.randint(0, 256, (3, 16))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # an untrained model predicts bytes nearly uniformly: loss ~ ln 256
    assert abs(lm_loss(logits, x).item() - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_decoder_is_causal_and_bf16_runs():
    torch.manual_seed(0)
    model = Decoder(TINY)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.equal(a[:, 10:], b[:, 10:])
    bf = Decoder(TINY).to(torch.bfloat16)
    assert bf(x).dtype == torch.float32 and torch.isfinite(bf(x)).all()


def test_rotary_is_a_rotation():
    cos, sin = rotary_tables(8, 4, 10000.0)
    x = torch.randn(1, 1, 8, 4)
    r = apply_rotary(x, cos, sin)
    torch.testing.assert_close(r[..., 0, :], x[..., 0, :])  # position 0: angle 0
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))


def test_config_errors():
    with pytest.raises(ValueError, match="n_heads"):
        DecoderConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="seq_len"):
        Decoder(TINY)(torch.zeros(1, 17, dtype=torch.long))


# ---- corpus and batches --------------------------------------------------------------------------

def test_stdlib_corpus_is_deterministic_and_split_by_file():
    a, b = data.load_corpus(), data.load_corpus()
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train.numel() > 1_000_000 and a.val.numel() > 10_000
    assert 0.01 < a.val_files / (a.train_files + a.val_files) < 0.15
    assert b"import" in bytes(a.train[:200_000].tolist())


def test_data_folder_and_file(tmp_path):
    folder = _text_folder(tmp_path / "texts")
    c = data.load_corpus(folder)
    assert c.train_files + c.val_files == 40 and c.val_files >= 1
    (folder / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary files are skipped
    assert data.load_corpus(folder).train_files + data.load_corpus(folder).val_files == 40
    f = tmp_path / "one.txt"
    f.write_text("abcdefgh" * 100)
    c = data.load_corpus(f)
    assert c.train.numel() == 760 and c.val.numel() == 40


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing", "no such file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "empty"),
    (lambda p: _file(p / "e.txt", b""), "bytes"),
    (lambda p: _file(p / "b.bin", b"\0" * 100), "binary"),
    (lambda p: _text_folder(p / "one", 1), "held-out"),
])
def test_bad_data_paths(tmp_path, make, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        data.load_corpus(make(tmp_path))


def test_batches_are_a_function_of_seed_and_step():
    d = torch.arange(1000).to(torch.uint8)
    x1, y1 = data.batch(d, 7, 4, 16, seed=3)
    x2, y2 = data.batch(d, 7, 4, 16, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, data.batch(d, 8, 4, 16, seed=3)[0])
    assert not torch.equal(x1, data.batch(d, 7, 4, 16, seed=4)[0])
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and x1.dtype == torch.int64


# ---- runs -----------------------------------------------------------------------------------------

def test_parse_runs_and_build_every_default_optimizer():
    specs = parse_runs(",".join(DEFAULT_RUNS))
    assert len(specs) == len(DEFAULT_RUNS)
    assert parse_runs("lowbit-adamw8bit")[0] == RunSpec("lowbit-adamw8bit", "fp32")
    for spec in specs:
        p = [torch.nn.Parameter(torch.zeros(64, 64, dtype=spec.dtype))]
        opt = build_optimizer(spec, p, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, seed=0)
        assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize("text, match", [("adamw-nope", "unknown optimizer"),
                                         ("torch-adamw@fp16", "unknown precision"),
                                         ("torch-adamw,torch-adamw@fp32", "twice"),
                                         ("lowbit-sophiah", "Hessian-vector"), (",", "no runs")])
def test_parse_runs_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_runs(text)


def test_low_precision_runs_quantize_the_linear_layers_but_not_the_head():
    import lowbit.nn
    specs = parse_runs("torch-adamw,lowbit-stablespam8bit@fp32", "int4")
    assert [s.precision for s in specs] == ["int4", "fp32"]
    assert specs[0].layers == "int4" and specs[0].dtype == torch.float32
    assert specs[1].layers is None
    with pytest.raises(ValueError, match="--precision"):
        parse_runs("torch-adamw", "fp16")
    model = build_model(TrainConfig(model=TINY), specs[0])
    quant = [n for n, m in model.named_modules() if isinstance(m, lowbit.nn.QuantLinear)]
    linear = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert quant and all(n.startswith("blocks.") for n in quant) and linear == ["head"]
    assert all(m.config is lowbit.nn.INT4 for m in model.modules()
               if isinstance(m, lowbit.nn.QuantLinear))


# ---- command line: errors before training, and a whole tiny comparison ----------------------------

@pytest.mark.parametrize("args, match", [
    (["--runs", "sgd-classic"], "unknown optimizer"),
    (["--data", "/nonexistent/corpus"], "no such file"),
    (["--preset", "huge"], "unknown preset"),
    (["--preset", "large", "--batch-size", "4096"], "GiB available"),
    (["--steps", "0"], "--steps"),
])
def test_cli_errors_before_training(tmp_path, capsys, args, match):
    out = tmp_path / "out"
    assert main(args + ["--out", str(out)]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()  # nothing started


def test_memory_estimate_grows_with_the_preset():
    small = TrainConfig(model=PRESETS["tiny"][0], batch_size=4)
    large = TrainConfig(model=PRESETS["large"][0], batch_size=64)
    assert 0 < estimate_memory(small) < 2**27 < 2**34 < estimate_memory(large)


def test_whole_tiny_demo(tmp_path, capsys):
    folder = _text_folder(tmp_path / "texts")
    out = tmp_path / "out"
    runs = ["torch-adamw@fp32", "lowbit-adamw8bit@fp32", "lowbit-stablespam4bit@fp32",
            "lowbit-adamw4bit-rank1@fp32",
            "lowbit-sophiag8bit@fp32", "lowbit-adamw8bit@bf16"]
    assert main(["--preset", "tiny", "--steps", "30", "--data", str(folder), "--out", str(out),
                 "--runs", ",".join(runs), "--threads", "1"]) == 0
    text = capsys.readouterr().out
    with open(out / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 * len(runs)
    for run in runs:
        losses = [float(r["loss"]) for r in rows if r["run"] == run]
        assert len(losses) == 30
        assert sum(losses[-5:]) / 5 < losses[0] - 0.5, (run, losses)  # the loss goes down
        summary = json.loads((out / "runs" / run.replace("@", "_") / "summary.json").read_text())
        assert summary["val_loss"] < losses[0] and not summary["diverged"]
        assert run in text and run in (out / "summary.md").read_text()
    for png in ("loss_curves.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_sharpness_curve(tmp_path):
    folder = _text_folder(tmp_path / "texts")
    spec = parse_runs("lowbit-adamw8bit")[0]
    cfg = TrainConfig(model=TINY, batch_size=4, steps=12, warmup=2, eval_every=6, eval_batches=1,
                      sharpness_every=4)
    summary = train_run(spec, cfg, folder, str(tmp_path), resume=False)
    d = tmp_path / "runs" / "lowbit-adamw8bit_fp32"
    with open(d / "sharpness.csv", newline="") as f:
        sharp = list(csv.DictReader(f))
    assert [int(r["step"]) for r in sharp] == [4, 8, 12]
    # Adam's preconditioned sharpness, against its 38/lr threshold
    assert all(float(r["sharpness"]) > 0 and r["rule"] == "adam" for r in sharp), sharp
    assert {r["hvp_method"] for r in sharp} == {"double_backward"}  # exact HVPs, not FD
    written = write_plots({spec.name: str(d / "steps.csv")}, [summary],
                          {spec.name: str(d / "sharpness.csv")}, str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["loss_curves.png", "memory.png",
                                                      "sharpness.png"]
    assert (tmp_path / "sharpness.png").read_bytes()[:8] == PNG


# ---- resume ---------------------------------------------------------------------------------------

# (fp4: stochastic rounding of the layers' output gradients, whose Philox stream follows each
# layer's forward count: the checkpoint carries the counts)
@pytest.mark.parametrize("run", ["lowbit-adamw8bit@bf16", "lowbit-sophiag4bit@fp32",
                                 "torch-adamw@fp32", "lowbit-stablespam8bit@fp4"])
def test_resume_continues_the_identical_trajectory(tmp_path, run):
    folder = _text_folder(tmp_path / "texts")
    spec = parse_runs(run)[0]
    cfg = TrainConfig(model=TINY, batch_size=4, steps=16, warmup=3, eval_every=8,
                      eval_batches=2)
    whole = train_run(spec, cfg, folder, str(tmp_path / "a"), resume=False)
    # preempted after step 10 (the next step refreshes Sophia's estimate), then resumed
    stopped = TrainConfig.from_dict(dict(cfg.as_dict(), stop_at=10))
    train_run(spec, stopped, folder, str(tmp_path / "b"), resume=False)
    resumed = train_run(spec, cfg, folder, str(tmp_path / "b"), resume=True)
    read = lambda d: list(csv.DictReader(open(tmp_path / d / "runs" / run.replace("@", "_") /
                                               "steps.csv")))
    a, b = read("a"), read("b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 16
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]
    assert whole["val_loss"] == resumed["val_loss"]


def test_resume_with_other_settings_is_refused(tmp_path):
    folder = _text_folder(tmp_path / "texts")
    spec = parse_runs("lowbit-adamw8bit")[0]
    cfg = TrainConfig(model=TINY, batch_size=4, steps=6, warmup=1, eval_every=3, eval_batches=1)
    train_run(spec, cfg, folder, str(tmp_path), resume=False)
    other = TrainConfig.from_dict(dict(cfg.as_dict(), lr=1e-2))
    with pytest.raises(ValueError, match="lr"):
        train_run(spec, other, folder, str(tmp_path), resume=True)
