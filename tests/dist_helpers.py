"""Multi-process helpers for the distributed tests: gloo on loopback, spawned workers that
report through a file, reaped on every exit path."""
import os
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


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
