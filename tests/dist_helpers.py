"""Multi-process helpers for the distributed tests: gloo on loopback, spawned workers that
report through a file, reaped on every exit path."""
import os
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    exit_now()


def exit_now():
    """End a rank that has written its result without finalizing the interpreter. A gloo
    worker thread can still hold the last reference to a finished collective's tensors after
    destroy_process_group; freeing them takes the GIL, and a thread that asks for the GIL while
    the interpreter finalizes aborts the process ("terminate called without an active
    exception", SIGABRT; seen in about 1 of 4 runs of a 2-rank FSDP2 job on a 2-core machine).
    Nothing is left to clean up here: the result file is closed and the group destroyed."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int, out_dir, *args, timeout: float = 90.0) -> list:
    """fn(rank, world, *args) on `world` spawned processes (module-level fn, picklable args);
    returns each rank's torch.save-able result, or raises with the failing rank's traceback."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, str(out_dir)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish in {timeout:.0f} s")
    except Exception as e:
        errs = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir))
                if f.endswith(".err")]
        raise RuntimeError("\n".join(errs) or str(e)) from e
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]


def mean_over_ranks(t, world: int) -> float:
    """The mean of a scalar tensor over the ranks (each rank's value as is with one rank)."""
    import torch.distributed as dist
    total = t.detach().clone()
    if world > 1:
        dist.all_reduce(total)
    return total.item() / world


class MLP(nn.Module):
    """The FSDP2 / DCP tests' model: two [rows, dim] matrices (quantized states), a bias of
    `rows` (32-bit states) and a one-element gain (on 2 ranks, rank 1's shard of it is empty)."""

    def __init__(self, rows, dim):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(rows, dim) / dim ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(rows))
        self.w2 = nn.Parameter(torch.randn(rows, dim) / rows ** 0.5)
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return (torch.tanh(x @ self.w1.T + self.b1) @ self.w2) * self.gain
