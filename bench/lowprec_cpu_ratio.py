#!/usr/bin/env python
"""The CPU lowprec kernel's fake quantization against an fp32 copy of the same tensor.

Both allocate their output and move the same bytes (read x, write x.dtype out); the copy is
`torch.empty_like(x).copy_(x)`, timed interleaved with the kernel; medians. ratio = copy time /
fake-quant time (1.0: as fast as the copy; the target is >= 0.6).

Usage: python bench/lowprec_cpu_ratio.py [rows cols [dtype]]   (default 4096 4096 float32)
Run it on an otherwise idle machine: the ratios of a shared one are noise.
"""
import statistics
import sys
import time

import torch

from lowbit import lowprec
from lowbit.reference.lowprec import QuantSpec

CASES = [("int4 block256", QuantSpec("int4", "block", 256), 0),
         ("e4m3 row", QuantSpec("e4m3", "row"), 0),
         ("e2m1 block32 e8m0 had32", QuantSpec("e2m1", "block", 32, "e8m0"), 32),
         ("e2m1 block32 e8m0 had32 SR", QuantSpec("e2m1", "block", 32, "e8m0", "stochastic"),
          32),
         ("int8 column", QuantSpec("int8", "column"), 0),
         ("hadamard 32 alone", None, 32)]


def main():
    rows, cols = (int(v) for v in sys.argv[1:3]) if len(sys.argv) > 2 else (4096, 4096)
    dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.float32
    torch.manual_seed(0)
    x = torch.randn(rows, cols).to(dtype)
    nbytes = 2 * x.numel() * x.element_size()
    print(f"{rows} x {cols} {dtype}, {torch.get_num_threads()} threads")
    for name, spec, hb in CASES:
        if spec is None:
            def run():
                return lowprec.block_hadamard(x, hb, backend="cpu")
        else:
            def run():
                return lowprec.fake_quant(x, spec, 1, hadamard_block=hb, backend="cpu")
        run()
        copy, fq = [], []
        for _ in range(15):
            t0 = time.perf_counter()
            torch.empty_like(x).copy_(x)
            copy.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run()
            fq.append(time.perf_counter() - t0)
        c, f = statistics.median(copy), statistics.median(fq)
        print(f"{name:28s} {f * 1e3:7.2f} ms ({nbytes / f / 1e9:5.1f} GB/s)   "
              f"copy {c * 1e3:6.2f} ms ({nbytes / c / 1e9:5.1f} GB/s)   ratio {c / f:4.2f}")


if __name__ == "__main__":
    main()
