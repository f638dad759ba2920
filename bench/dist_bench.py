#!/usr/bin/env python
"""lowbit optimizers under FSDP2 on CPU / gloo: optimizer-state bytes per rank for 32/8/4-bit
states at 1, 2 and 4 ranks (they should fall as 1 / world size), and the per-step cost of the
one all-reduce of the gradient statistics (its payload in bytes, its measured time) next to the
whole optimizer step.

Each world size is one set of spawned processes on loopback, every rank on one thread; the
model is lowbit.examples.model's decoder with each block and the root wrapped by fully_shard.
Ranks beyond the core count share cores, so times at 4 ranks on a 2-core machine say little;
the bytes are exact. The all-reduce's time includes waiting for the slowest rank to arrive.

Usage: python bench/dist_bench.py [--quick] [--worlds 1,2,4] [--steps S] [--out DIR]
"""
import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
BITS = (32, 8, 4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and 2 steps (smoke run)")
    p.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10, --quick 2)")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="output directory")
    a = p.parse_args(argv)
    a.worlds = [int(w) for w in a.worlds.split(",") if w.strip()]
    a.steps = a.steps if a.steps is not None else (2 if a.quick else 10)
    return a


def _config(quick):
    from lowbit.examples.model import DecoderConfig
    if quick:
        return DecoderConfig(dim=64, n_layers=1, n_heads=2, seq_len=16)
    return DecoderConfig(dim=256, n_layers=4, n_heads=4, seq_len=64)


def _state_bytes(opt):
    """Bytes of every tensor in the optimizer state on this rank (the local shards)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def _rank(rank, world, port, quick, steps, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lowbit.optim as lo
    from lowbit.examples.model import Decoder, lm_loss
    from lowbit.optim import _sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = _config(quick)
        mesh = init_device_mesh("cpu", (world,))
        # time and payload of the statistics all-reduce: ShardReducer.sums is the step's one
        # collective (the maxima are reduced only for the policies that read them: none here)
        spent = {"s": 0.0, "bytes": 0, "calls": 0}
        real_reduce = _sharding.ShardReducer._reduce

        def timed(self, x, cols, op, rows=None):
            t0 = time.perf_counter()
            out = real_reduce(self, x, cols, op, rows)
            spent["s"] += time.perf_counter() - t0
            # the rows of sharded parameters, `cols` columns of float64
            nrows = sum(len(m) for m in self._rows.values())
            spent["bytes"] += nrows * (len(cols) if cols is not None else 1) * 8
            spent["calls"] += 1
            return out

        _sharding.ShardReducer._reduce = timed
        result = {}
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, 256, (steps + 2, 8, cfg.seq_len + 1), generator=g)
        for bits in BITS:
            torch.manual_seed(0)
            model = Decoder(cfg)
            if world > 1:
                for block in model.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
            opt = lo.AdamW(model.parameters(), lr=1e-3, state_bits=bits)
            times = []
            for s in range(steps + 2):
                x = data[s, rank::world] if world > 1 else data[s]
                loss = lm_loss(model(x[:, :-1]), x[:, 1:])
                loss.backward()
                if s == 2:  # after warm-up: count this configuration's steps only
                    spent.update(s=0.0, bytes=0, calls=0)
                t0 = time.perf_counter()
                opt.step()
                if s >= 2:
                    times.append(time.perf_counter() - t0)
                opt.zero_grad(set_to_none=True)
            times.sort()
            result[bits] = {"state_bytes": _state_bytes(opt),
                            "params": sum(p.numel() for p in model.parameters()),
                            "step_s": times[len(times) // 2],
                            "allreduce_s": spent["s"] / steps, "allreduce_bytes":
                            spent["bytes"] // steps, "allreduce_calls": spent["calls"] / steps}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # skip interpreter finalization: a gloo worker thread may still free a collective's tensors
    # then and abort the rank (see tests/dist_helpers.py exit_now)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, quick, steps):
    """{bits: per-rank dicts} of one world size (spawned processes, reaped on every path)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_rank, args=(world, _free_port(), quick, steps, tmp),
                                 nprocs=world, join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=300):
                pass
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    return {bits: [r[bits] for r in ranks] for bits in BITS}


def collect(args):
    """{world: {bits: [rank dicts]}} for every world size asked."""
    return {w: run_world(w, args.quick, args.steps) for w in args.worlds}


def summary(res):
    """(bits, world, state MB per rank (the largest rank's), that over the first world size's
    total, rank 0's dict) per measured configuration."""
    out = []
    for bits in BITS:
        base = None
        for world, per_bits in res.items():
            ranks = per_bits[bits]
            mb = max(r["state_bytes"] for r in ranks) / 2**20
            base = base if base is not None else mb * world
            out.append((bits, world, mb, mb / base, ranks[0]))
    return out


def table(res):
    """Markdown lines: one row per (bits, world)."""
    lines = ["| state bits | ranks | state MB per rank (max) | x 1 rank | all-reduce B/step | "
             "all-reduce ms/step | step ms (median, rank 0) |", "|---|---|---|---|---|---|---|"]
    for bits, world, mb, ratio, r0 in summary(res):
        lines.append(f"| {bits} | {world} | {mb:.3f} | {ratio:.3f} | {r0['allreduce_bytes']} | "
                     f"{r0['allreduce_s'] * 1e3:.3f} | {r0['step_s'] * 1e3:.2f} |")
    return lines


def main(args):
    res = collect(args)
    params = res[args.worlds[0]][32][0]["params"]
    text = "\n".join([f"lowbit AdamW under FSDP2 (gloo, CPU), a {params / 1e6:.2f} M-parameter "
                      f"decoder, {args.steps} timed steps (`python bench/dist_bench.py"
                      f"{' --quick' if args.quick else ''}`).", ""] + table(res))
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dist_report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "dist_results.json"), "w") as f:
        json.dump({str(w): {str(b): v for b, v in r.items()} for w, r in res.items()}, f,
                  indent=1)


if __name__ == "__main__":
    main(parse_args())
