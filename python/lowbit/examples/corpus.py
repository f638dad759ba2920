"""The demo's byte-level corpus and its deterministic batches.

Default corpus: the source files (*.py) of the running Python's standard library — every
machine that runs the demo has them, nothing downloads. Files are taken in sorted order of
their path relative to the library root; a file goes to the held-out split when the CRC32 of
that relative path is divisible by 20 (about 5% of the files, the same files whatever else the
folder holds). `--data PATH` takes a text file (its last 5% of bytes held out) or a folder
(every text file under it, the same rule by file). Binary files (with a NUL byte) are skipped.

Batches: batch(step) is a pure function of (seed, step) — the window offsets come from a
generator seeded with both — so a run resumed at step k sees exactly the batches it would
have seen, and every optimizer of one comparison trains on the same data order.
"""
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

HELD_OUT_MODULUS = 20


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor
    source: str          # what was read, for the report
    train_files: int
    val_files: int

    def describe(self) -> str:
        return (f"{self.source}: {self.train.numel() / 1e6:.2f} MB train "
                f"({self.train_files} files), {self.val.numel() / 1e6:.2f} MB held out "
                f"({self.val_files} files)")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _held_out(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HELD_OUT_MODULUS == 0


def _text_bytes(path: Path):
    data = path.read_bytes()
    return None if b"\0" in data else data


def _from_files(root: Path, files, source: str) -> Corpus:
    train, val, nt, nv = [], [], 0, 0
    for path in files:
        data = _text_bytes(path)
        if not data:
            continue
        if _held_out(path.relative_to(root).as_posix()):
            val.append(data)
            nv += 1
        else:
            train.append(data)
            nt += 1
    if not train or not val:
        raise ValueError(f"--data {root}: found {nt} training and {nv} held-out text files; the "
                         f"demo needs text in both splits (a folder's files are split by the "
                         f"CRC32 of their path, 1 in {HELD_OUT_MODULUS} held out): give a folder "
                         f"with more text files, or one text file")
    return Corpus(_as_tensor(b"".join(train)), _as_tensor(b"".join(val)), source, nt, nv)


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def load_stdlib() -> Corpus:
    root = stdlib_root()
    files = sorted((p for p in root.rglob("*.py")
                    if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    return _from_files(root, files, f"Python {sysconfig.get_python_version()} standard library "
                                    f"sources ({root})")


def load_path(path) -> Corpus:
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if root.is_file():
        data = _text_bytes(root)
        if data is None:
            raise ValueError(f"--data {path}: the file is binary (has NUL bytes); give a text file")
        if len(data) < 64:
            raise ValueError(f"--data {path}: the file has {len(data)} bytes; the demo needs at "
                             f"least 64 to hold out a validation tail")
        cut = len(data) - max(len(data) // HELD_OUT_MODULUS, 1)
        return Corpus(_as_tensor(data[:cut]), _as_tensor(data[cut:]), f"{root} (last 5% held out)",
                      1, 1)
    files = sorted((p for p in root.rglob("*") if p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"--data {path}: the folder is empty")
    return _from_files(root, files, str(root))


def load_corpus(path=None) -> Corpus:
    return load_stdlib() if path is None else load_path(path)


def check_fits(corpus: Corpus, seq_len: int):
    """Both splits must hold at least one window of seq_len + 1 bytes (input and shifted target)."""
    for name, data in (("training", corpus.train), ("held-out", corpus.val)):
        if data.numel() < seq_len + 1:
            raise ValueError(f"the {name} split of {corpus.source} has {data.numel()} bytes, fewer "
                             f"than one sequence of seq_len + 1 = {seq_len + 1}: give more data or "
                             f"a smaller --seq-len")


def batch(data: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int):
    """(inputs, targets) int64 [batch_size, seq_len]: random windows of `data`, a pure function
    of (seed, step)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) & 0x7FFFFFFFFFFFFFFF)
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    windows = data[idx].long()
    return windows[:, :-1], windows[:, 1:]


def eval_batches(data: torch.Tensor, n_batches: int, batch_size: int, seq_len: int, seed: int):
    """A fixed list of held-out batches (the same for every run and every evaluation)."""
    return [batch(data, -(i + 1), batch_size, seq_len, seed) for i in range(n_batches)]


