"""FSDP2 (torch.distributed.fsdp.fully_shard) and DTensor parameters in the fused optimizers.

A DTensor parameter is stepped through its local shard: the fused kernels read and write
p.to_local() and p.grad.to_local() and never see a DTensor (lowbit's custom ops register no
DTensor sharding strategy: the update is element-wise on the shard, and the only quantities that
cross shards are the per-tensor gradient statistics, reduced here). The rules:

- The state format comes from the FULL parameter. 32-bit vs quantized (min_quant_numel), the
  block size and the rank-1 view of the second moment are decided from the parameter's global
  shape (DTensor.shape / numel()), so every rank picks the same format, the one the unsharded
  model gets. (bitsandbytes #2080 and torchao decide on the local shard, so a matrix can get
  8-bit states unsharded and 32-bit ones under FSDP, or differ between ranks.)
- States are allocated for the local shard, as plain tensors (not DTensors): fp32 states shaped
  like the local shard; a quantized state is the local shard quantized on its own — flat codes
  of its elements in row-major order and one absmax per block of B elements counted from the
  shard's FIRST element (the shard's last block may be short). A block never spans two ranks,
  so a step needs no communication beyond the statistics. When every shard starts at a multiple
  of B elements (fully_shard's Shard(0) gives rank r the rows from r * ceil(size(0) / world), so:
  when ceil(size(0) / world) * (numel / size(0)) is a multiple of B), these blocks are exactly
  the unsharded parameter's and the states equal the unsharded run's up to the gradients'
  reduction order; otherwise blocks near the shard starts are cut differently and the states
  differ from the unsharded run's at the quantization-error level.
- Checkpoints (lowbit.optim._checkpoint): state_dict() presents the states of DTensor parameters
  as fp32 DTensors laid out like the parameter (torch.optim.AdamW's FSDP2 form), so
  torch.distributed.checkpoint saves on N ranks and loads on M, and full_state_dict=True gathers
  whole tensors; load_state_dict() quantizes each loaded local shard into this rank's blocks.
  With block-aligned shards on both sides the loaded codes and absmax are bit-identical to the
  saved ones.
- Statistics (lowbit.ops.grad_stats: sum of squares, non-finite count, max |g|, NaN count) run
  per rank on the local shards; the rows of sharded parameters are partial and are reduced over
  the process group of the sharding mesh dimension: per step ONE all-reduce (SUM, float64) of
  the stacked [rows, 3] sums and counts of every sharded gradient of every group, and one small
  all-reduce (MAX) of the [rows] maxima only when a clip policy reads max |g| (NormClip with
  norm_type=inf, AdaClip), at the point it reads them. Rows of replicated parameters (plain
  tensors, Replicate-only DTensors) are left alone: each rank already holds their full
  gradient. So every rank sees the statistics of the unsharded model: global-norm clipping
  equals the unsharded model's, and a non-finite gradient on any shard skips the step on every
  rank. Policies that need another statistics pass (ValueClip, AdaGN after AdaClip) reduce it
  the same way (SUM and MAX); AdaClip + AdaGN take that pass instead of the element capture
  under sharding (the capture's overflow decision is per rank). UpdateClip's per-tensor RMS sums
  are reduced (SUM) per fused call, over the full parameter's numel.
- Not supported, with a clear error: the rank-1 second moment of a sharded parameter (its column
  maxima span all shards, and the kernel needs them before it writes any code), placements other
  than Replicate and Shard on at most one mesh dimension (Partial, _StridedShard, 2-D sharding),
  non-contiguous local shards, and the curvature optimizers (SophiaH/G, AdaHessian).
- Stochastic rounding of bf16/fp16 parameters draws its Philox counters from the element's index
  in the LOCAL tensor (key = sr_key(seed, parameter index, step), as without sharding): a
  replicated parameter draws the same bits on every rank, a sharded one draws different bits
  than the unsharded run would (element i of rank r's shard uses counter i, not its global
  index), so bf16 runs agree with the unsharded run in distribution, not bit for bit.
"""
import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without DTensor: nothing here is ever sharded
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself, not a copy: in-place writes land in the
    parameter), or t unchanged."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():  # without grad, to_local() returns the local tensor itself
        return t.to_local()


def shard_group(p, where: str = "parameter"):
    """The process group over which p is sharded, or None when every rank holds all of it (a
    plain tensor or a Replicate-only DTensor)."""
    if not is_dtensor(p):
        return None
    sharded = []
    for dim, placement in enumerate(p.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard():
            raise NotImplementedError(
                f"{where}: DTensor placement {placement} is not supported by lowbit's "
                "optimizers (Replicate and Shard on one mesh dimension are: fully_shard's "
                "layouts, HSDP included)")
        sharded.append(dim)
    if len(sharded) > 1:
        raise NotImplementedError(
            f"{where}: a parameter sharded over {len(sharded)} mesh dimensions "
            f"({p.placements}) is not supported yet; shard it over one (fully_shard / HSDP)")
    return p.device_mesh.get_group(sharded[0]) if sharded else None


def check_dtensor_grad(p, g, where: str):
    """(local p, local grad) of a DTensor parameter, after checking that the gradient is laid out
    like it (raises on what the local step cannot handle)."""
    if not is_dtensor(g):
        raise RuntimeError(f"{where}: the parameter is a DTensor but its gradient is a "
                           f"{type(g).__name__}; the fused step needs both sharded alike")
    if g.shape != p.shape or tuple(g.placements) != tuple(p.placements) \
            or g.device_mesh != p.device_mesh:
        raise RuntimeError(f"{where}: gradient {tuple(g.shape)} {g.placements} is not laid out "
                           f"like the parameter {tuple(p.shape)} {p.placements}")
    shard_group(p, where)
    lp, lg = local(p), local(g)
    if not lp.is_contiguous() or not lg.is_contiguous():
        raise NotImplementedError(f"{where}: the local shard of this DTensor parameter (or of "
                                  "its gradient) is not contiguous; lowbit steps contiguous "
                                  "shards (fully_shard's Shard(0) is)")
    return lp, lg


class ShardReducer:
    """Reduces, across the ranks that shard them, the statistics rows of the given parameters
    (row i belongs to params[i]); rows of replicated parameters are left alone. Every rank must
    call the same reductions in the same order (they do: the rows follow param_groups)."""

    SUM_COLS = (0, 1, 3)  # grad_stats columns: sum of squares, non-finite count, NaN count
    MAX_COL = 2           # largest finite |g|

    def __init__(self, params):
        self._rows = {}  # process group -> row indices, in first-seen order (same on all ranks)
        for i, p in enumerate(params):
            group = shard_group(p)
            if group is not None:
                self._rows.setdefault(group, []).append(i)

    def __bool__(self):
        return bool(self._rows)

    def _reduce(self, x, cols, op, rows=None):
        """x [n] or [n, k] (a new tensor when anything is reduced): the rows of sharded
        parameters (restricted to `rows`, x's rows being those ctx rows in order) all-reduced
        with `op` over their group, in columns `cols` (None: a 1-D x)."""
        pos = None if rows is None else {r: k for k, r in enumerate(rows)}
        out = x
        for group, members in self._rows.items():
            idx = members if pos is None else [pos[r] for r in members if r in pos]
            if not idx:
                continue
            index = torch.tensor(idx, device=x.device)
            part = x.index_select(0, index)
            if cols is not None:
                part = part[:, list(cols)]
            part = part.contiguous()
            dist.all_reduce(part, op=op, group=group)
            if out is x:
                out = x.clone()
            if cols is None:
                out.index_copy_(0, index, part)
            else:
                for k, c in enumerate(cols):
                    out[:, c].index_copy_(0, index, part[:, k])
        return out

    def sums(self, stats):
        """grad_stats rows with the sums and counts over every shard (maxima still local)."""
        return self._reduce(stats, self.SUM_COLS, dist.ReduceOp.SUM)

    def maxima(self, stats):
        """grad_stats rows with the max |g| over every shard (the rest untouched)."""
        return self._reduce(stats, (self.MAX_COL,), dist.ReduceOp.MAX)

    def row_sums(self, values, rows):
        """values [len(rows)]: per-row partial sums of the rows `rows`, summed over shards."""
        return self._reduce(values, None, dist.ReduceOp.SUM, rows)


def like_param(t: torch.Tensor, p) -> torch.Tensor:
    """A state tensor t laid out like p's local shard, as a DTensor with p's mesh, placements and
    global shape (t itself, no copy, inside it): the form torch.optim keeps its states in under
    FSDP2, which torch.distributed.checkpoint reshards and gathers."""
    with torch.no_grad():
        return DTensor.from_local(t.view(local(p).shape), p.device_mesh, p.placements,
                                  run_check=False, shape=p.shape, stride=p.stride())


def local_like(t: torch.Tensor, p) -> torch.Tensor:
    """The part of a loaded state tensor t that p's local shard owns: a DTensor laid out like p
    gives its local shard (a DTensor laid out otherwise is redistributed first); a DTensor state
    of a plain parameter is gathered whole; a plain tensor is taken as it is."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        if not is_dtensor(p):
            return t.full_tensor()
        if t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):
            t = t.redistribute(p.device_mesh, p.placements)
        return t.to_local()
