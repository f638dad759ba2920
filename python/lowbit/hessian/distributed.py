"""Curvature operators under data parallelism (DDP): products averaged across ranks.

Each rank holds a full copy of the model and its own slice of the batch. The Hessian of the
global loss (the mean of the ranks' losses, as DDP averages gradients) is the mean of the ranks'
Hessians, so H v is each rank's local product all-reduced and divided by the world size. DDP
itself does not do this: `torch.autograd.grad`, which every product uses, bypasses DDP's
gradient hooks, so a product through a DDP model is the rank's own, un-averaged one (and the
hooks then wait for a reduction that never comes; research/hessian.md §1.4). So:

    op = hessian.across_ranks(hessian.HessianOperator(local_loss, ddp_model.module))

with local_loss computing this rank's loss through the plain module (`ddp_model.module`), and
every estimator (Hutchinson, Lanczos, power iteration, SLQ, SharpnessMonitor) takes `op` as it
is. Probe vectors come from the Philox stream by seed, so every rank draws the same ones; each
product is one all-reduce of the flat vector, after which every rank holds the same bits and
runs the same estimator arithmetic: the estimates agree across ranks and equal a single
process's on the whole batch, up to the reduction's summation order.

FSDP2 (parameters sharded as DTensors) is not covered: the second backward reaches parameters
that were resharded after the first one (pytorch/pytorch#172543); set
`model.set_reshard_after_backward(False)` for the products, or use the finite-difference route,
which needs only gradients.
"""
import torch
import torch.distributed as dist

from .operator import LinearOperator, as_operator


def across_ranks(op, group=None) -> LinearOperator:
    """op's products averaged over the ranks of `group` (default: the whole world), as a
    LinearOperator: the curvature of the mean of the ranks' losses (module docstring). Without
    an initialised process group, or with one rank, the products are op's own."""
    op = as_operator(op)
    if not dist.is_available() or not dist.is_initialized():
        return op
    world = dist.get_world_size(group)
    if world == 1:
        return op

    def mv(v):
        out = op(v)
        # one collective per product: the tensors flattened into one buffer (float64 when any
        # of them is: the sum is then taken in the operator's dtype)
        flat = torch.cat([t.reshape(-1).to(op.dtype) for t in out])
        dist.all_reduce(flat, group=group)
        flat /= world
        parts = flat.split([t.numel() for t in out])
        return [p.reshape(t.shape).to(t.dtype) for p, t in zip(parts, out)]

    avg = LinearOperator(mv, op.like, device=op.device, name=f"{op.name} averaged over {world} "
                         "ranks")
    avg.inner = op
    avg.release = op.release
    return avg
