"""FSDP2 (torch.distributed.fsdp.fully_shard on a CPU DeviceMesh, gloo, 2 processes on
loopback): lowbit optimizers step the local shards of DTensor parameters, pick each state format
from the full parameter, and reduce the gradient statistics across shards
(lowbit.optim._sharding documents the rules).

The model's matrices are [33, 256]: dim 0 does not split evenly (rank 0 holds 17 rows, rank 1
16), and every shard starts at a multiple of 256 elements (the 8-bit block; 4-bit's is 128), so
the shard-local quantization blocks are exactly the unsharded ones and an FSDP2 run must equal
the single-process run on the same data up to the order in which the gradients are reduced
(FSDP2 reduce-scatters the two half-batch gradients, the single process sums the whole batch).
That order changes gradient elements by a few fp32 ulp; observed: losses within 1.2e-7 relative
and gradient norms within 2e-7 over 4 steps. The bound is 1e-5: a code that flips between the
two runs changes one element's update by at most ~lr / 50, which moves the loss by ~1e-6. A
missing reduction costs far more (no MAX reduction for AdaClip: 5e-4, no UpdateClip sum
reduction: 4e-3; local instead of global norms: the norms differ by ~30%).
All configurations train inside ONE spawn of the two ranks (spawning costs more than the
training), and the single-process runs happen once per module.
"""
import math

import pytest
import torch
from torch import nn
from torch.distributed.tensor import distribute_tensor

import lowbit.optim as lo
from lowbit.clip import NormClip

from dist_helpers import MLP, mean_over_ranks, run_ranks

STEPS, BATCH, DIM, HIDDEN, SPIKE = 4, 8, 256, 33, 2
LR = 1e-2


# MLP(HIDDEN, DIM): two [33, 256] matrices (8448 elements: quantized; shards of 17 and 16
# rows), a bias of 33 (32-bit states) and a one-element gain (rank 1's shard of it is empty)


def _batch(step):
    # a learnable target (a fixed random linear map) on one batch (over a few steps, the
    # differences between random batches hide the training progress the tests check), scaled
    # by 4 at step SPIKE: a gradient spike, so that AdaClip and UpdateClip act (they only act
    # on spikes) and the reductions they depend on are exercised
    target = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(7)) / DIM ** 0.5
    x = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(100))
    if step == SPIKE:
        x = 4 * x
    return x, x @ target


# name -> optimizer over the model's parameters
CONFIGS = {
    "AdamW": lambda ps: lo.AdamW(ps, lr=LR, seed=1),
    "AdamW8bit": lambda ps: lo.AdamW8bit(ps, lr=LR, seed=1),
    "AdamW4bit": lambda ps: lo.AdamW4bit(ps, lr=LR, seed=1),
    # max_norm below the gradient norm (~1): every step clips, by the global norm
    "AdamW8bit+NormClip": lambda ps: lo.AdamW8bit(ps, lr=LR, seed=1, clip=NormClip(0.3)),
    # AdaClip reads max |g| (the MAX all-reduce), AdaGN the reduced second statistics pass
    "StableSPAM8bit": lambda ps: lo.StableSPAM8bit(ps, lr=LR, seed=1),
    # AdaGC: global-norm warmup for 2 steps, then per-tensor norms against their EMA
    "AdaGC8bit": lambda ps: lo.AdaGC8bit(ps, lr=LR, seed=1, warmup_steps=2, lambda_abs=0.3),
    # UpdateClip's per-tensor RMS sums, reduced per fused call
    "StableAdamW8bit": lambda ps: lo.StableAdamW8bit(ps, lr=LR, seed=1),
}


def _shard(model, world, hsdp=False):
    """fully_shard over all ranks; hsdp: HSDP on a (1, world) mesh (placements (Replicate(),
    Shard(0)): the statistics are reduced over mesh dimension 1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = (init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")) if hsdp
            else init_device_mesh("cpu", (world,)))
    fully_shard(model, mesh=mesh)
    return model


def _loss(model, step, rank, world):
    x, y = _batch(step)
    x, y = x[rank::world], y[rank::world]  # each rank its half of the batch
    return ((model(x) - y) ** 2).mean()


def _train(rank, world, name):
    """Losses of the whole batch per step (the ranks' mean) and per-step telemetry; a name
    ending in "@HSDP" shards over a 2-D mesh."""
    torch.manual_seed(0)
    model = MLP(HIDDEN, DIM)
    if world > 1:
        _shard(model, world, hsdp=name.endswith("@HSDP"))
    opt = CONFIGS[name.split("@")[0]](model.parameters())
    losses, norms, clip_norms = [], [], []
    for step in range(STEPS):
        loss = _loss(model, step, rank, world)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss, world))
        norms.append(opt.last_step_info[0]["grad_norm"])
        if "clip_norm" in opt.last_clip_info:
            clip_norms.append(float(opt.last_clip_info["clip_norm"]))
    return {"losses": losses, "grad_norms": norms, "clip_norms": clip_norms}


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _formats(rank, world):
    """State formats and layouts after one step: w1 with min_quant_numel between its shard's and
    its full size; w2 (the default 4096 > its shards) also quantized; and the shard-local blocks
    of a parameter whose shard starts mid-block, against a plain (unsharded) optimizer stepping
    that shard alone."""
    torch.manual_seed(0)
    model = _shard(MLP(HIDDEN, DIM), world)
    opt = lo.AdamW8bit([{"params": [model.w1], "min_quant_numel": 5000},
                        {"params": [model.w2, model.b1, model.gain]}], lr=LR, seed=1)
    _loss(model, 0, rank, world).backward()
    opt.step()
    # a state dict saved on each rank loads back under the same sharding, states untouched
    again = lo.AdamW8bit([{"params": [model.w1], "min_quant_numel": 5000},
                          {"params": [model.w2, model.b1, model.gain]}], lr=LR, seed=1)
    again.load_state_dict(opt.state_dict())
    out = {"reloaded": all(torch.equal(v, again.state[p][k]) for p in model.parameters()
                           for k, v in opt.state[p].items()),
           "exported": {k: (type(v).__name__, tuple(v.shape), tuple(_local(v).shape))
                        for k, v in opt.export_state_dict()["state"][0].items() if k != "step"}}
    for name in ("w1", "w2", "b1"):
        p = getattr(model, name)
        st = opt.state[p]
        out[name] = {"local_numel": _local(p).numel(), "full_numel": p.numel(),
                     **{k: (v.dtype, v.numel()) for k, v in st.items() if k != "step"}}
    # a [9, 100] matrix (min_quant_numel 256): rank 0's 5 rows = 500 elements, so rank 1's
    # shard starts at element 500, inside the second 256-block of the unsharded parameter
    torch.manual_seed(1)
    odd = _shard(nn.Linear(100, 9, bias=False), world)
    grad = torch.randn(9, 100)
    start, stop = (0, 5) if rank == 0 else (5, 9)
    odd.weight.grad = distribute_tensor(grad, odd.weight.device_mesh, odd.weight.placements)
    plain = nn.Parameter(_local(odd.weight).detach().clone())
    plain.grad = grad[start:stop].clone()
    a = lo.AdamW8bit([odd.weight], lr=LR, min_quant_numel=256, seed=1)
    b = lo.AdamW8bit([plain], lr=LR, min_quant_numel=256, seed=1)
    # the plain optimizer would keep 32-bit states for a shard below 256 elements: none is
    a.step()
    b.step()
    out["shard_blocks"] = {
        "equal": {k: torch.equal(v, b.state[plain][k]) for k, v in a.state[odd.weight].items()},
        "param": torch.equal(_local(odd.weight), plain.detach()),
        "absmax": a.state[odd.weight]["exp_avg_absmax"].numel()}
    out["sr"] = _bf16_rounding(rank, world)
    return out


def _bf16_rounding(rank, world):
    """bf16 stochastic rounding: a sharded parameter draws the bits a plain optimizer stepping
    its local shard alone draws (counters from the shard-local index); a replicated (Replicate
    DTensor) parameter draws the same bits on every rank."""
    from torch.distributed.tensor import Replicate
    torch.manual_seed(2)
    full, grad = torch.randn(9, 100).bfloat16(), torch.randn(9, 100).bfloat16()
    sharded = _shard(nn.Linear(100, 9, bias=False, dtype=torch.bfloat16), world).weight
    with torch.no_grad():
        _local(sharded).copy_(full.chunk(world)[rank])
    sharded.grad = distribute_tensor(grad, sharded.device_mesh, sharded.placements)
    plain = nn.Parameter(full.chunk(world)[rank].clone())
    plain.grad = grad.chunk(world)[rank].clone()
    replicated = nn.Parameter(distribute_tensor(full, sharded.device_mesh, [Replicate()]))
    replicated.grad = distribute_tensor(grad, sharded.device_mesh, [Replicate()])
    for p in (sharded, plain, replicated):
        lo.AdamW([p], lr=LR, seed=3).step()  # 32-bit states, stochastic rounding (the default)
    return {"sharded_is_local": torch.equal(_local(sharded), plain.detach()),
            "replicated": _local(replicated).detach().clone()}


def _nonfinite(rank, world):
    """A NaN in rank 1's shard of w2's gradient only: every rank skips (nonfinite='skip'), and
    every rank raises (nonfinite='raise')."""
    torch.manual_seed(0)
    model = _shard(MLP(HIDDEN, DIM), world)
    opt = lo.AdamW8bit(model.parameters(), lr=LR, seed=1)
    before = [_local(p).detach().clone() for p in model.parameters()]
    _loss(model, 0, rank, world).backward()
    if rank == 1:
        _local(model.w2.grad)[3, 5] = math.nan
    local_finite = bool(torch.isfinite(_local(model.w2.grad)).all())
    opt.step()
    out = {"local_finite": local_finite, "info": opt.last_step_info,
           "skipped_steps": opt.param_groups[0]["skipped_steps"],
           "unchanged": all(torch.equal(b, _local(p)) for b, p in zip(before,
                                                                      model.parameters()))}
    strict = lo.AdamW8bit(model.parameters(), lr=LR, seed=1, nonfinite="raise")
    try:
        strict.step()
        out["raised"] = None
    except FloatingPointError as e:
        out["raised"] = str(e)
    # rank-1 second moments of sharded parameters: a clear error on every rank
    rank1 = lo.AdamW4bit(model.parameters(), lr=LR, second_moment_norm="rank1")
    opt.zero_grad()
    _loss(model, 1, rank, world).backward()
    try:
        rank1.step()
        out["rank1"] = None
    except NotImplementedError as e:
        out["rank1"] = str(e)
    try:  # Hessian-vector products of DTensor parameters: not done, said at construction
        lo.SophiaH(model.parameters())
        out["curvature"] = None
    except NotImplementedError as e:
        out["curvature"] = str(e)
    return out


TRAINED = list(CONFIGS) + ["AdamW8bit+NormClip@HSDP"]


def _all(rank, world):
    return {"train": {name: _train(rank, world, name) for name in TRAINED},
            "formats": _formats(rank, world), "nonfinite": _nonfinite(rank, world)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks = run_ranks(_all, 2, tmp_path_factory.mktemp("fsdp2"), timeout=100.0)
    single = {name: _train(0, 1, name) for name in CONFIGS}
    return ranks, single


@pytest.mark.parametrize("name", TRAINED)
def test_fsdp2_matches_one_process(runs, name):
    ranks, single = runs
    a, b, one = ranks[0]["train"][name], ranks[1]["train"][name], single[name.split("@")[0]]
    assert a["losses"] == b["losses"]
    # the statistics the ranks saw are the unsharded model's: the same on both ranks, and equal
    # to one process's up to the gradients' fp32 reduction order (float64 sums of squares)
    assert a["grad_norms"] == b["grad_norms"] and a["clip_norms"] == b["clip_norms"]
    torch.testing.assert_close(torch.tensor(a["grad_norms"]), torch.tensor(one["grad_norms"]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(a["clip_norms"]), torch.tensor(one["clip_norms"]),
                               rtol=1e-5, atol=0)
    # losses: module docstring (observed ~1e-7 relative; 1e-5 leaves room for a flipped code)
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-5, atol=0)
    assert one["losses"][-1] < one["losses"][0]
    if name.startswith("AdamW8bit+NormClip"):  # the clip was active: norm above max_norm
        assert min(one["clip_norms"]) > 0.3


def test_fsdp2_format_from_full_parameter(runs):
    ranks, _ = runs
    for rank, r in enumerate(ranks):
        f = r["formats"]
        w1 = f["w1"]
        # full 8448 >= min_quant_numel 5000 > local (4352 / 4096): quantized, for the shard
        assert w1["full_numel"] == 8448 and w1["local_numel"] < 5000
        assert w1["exp_avg_codes"] == (torch.uint8, w1["local_numel"])
        assert w1["exp_avg_sq_codes"] == (torch.uint8, w1["local_numel"])
        assert w1["exp_avg_absmax"] == (torch.float32, -(-w1["local_numel"] // 256))
        assert f["w2"]["exp_avg_codes"][0] == torch.uint8  # default 4096 > both shards
        assert f["b1"]["exp_avg"] == (torch.float32, f["b1"]["local_numel"])
        assert f["reloaded"]
        # export_state_dict gives fp32 DTensors laid out like the parameter (test_distributed_dcp
        # has the full export and the resharding)
        rows = 17 if rank == 0 else 16
        assert f["exported"] == {k: ("DTensor", (33, 256), (rows, 256))
                                 for k in ("exp_avg", "exp_avg_sq")}
        # a shard starting mid-block: its states are its elements quantized alone, blocks from
        # the shard's first element (rank 0: 500 elements, 2 blocks; rank 1: 400, 2 blocks)
        blocks = f["shard_blocks"]
        assert blocks["absmax"] == 2
        assert all(blocks["equal"].values()), blocks["equal"]
        assert blocks["param"], rank
        assert f["sr"]["sharded_is_local"], rank
    assert torch.equal(ranks[0]["formats"]["sr"]["replicated"],
                       ranks[1]["formats"]["sr"]["replicated"])


def test_fsdp2_nonfinite_shard_skips_every_rank(runs):
    ranks, _ = runs
    assert [r["nonfinite"]["local_finite"] for r in ranks] == [True, False]
    for r in ranks:
        n = r["nonfinite"]
        assert n["info"][0]["skipped"] and n["info"][0]["nonfinite_tensors"] == 1
        assert n["skipped_steps"] == 1 and n["unchanged"]
        assert n["raised"] and "1 gradient tensor(s)" in n["raised"]
        assert n["rank1"] and "rank1" in n["rank1"] and "FSDP2" in n["rank1"]
        assert n["curvature"] and "SophiaH" in n["curvature"]

