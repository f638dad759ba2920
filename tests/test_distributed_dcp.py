"""torch.distributed.checkpoint (DCP) with lowbit optimizers under FSDP2 (CPU, gloo, loopback):
save on 2 ranks and resume on 1 and on 2, save on 1 and resume on 2, and the full (unsharded)
optimizer state dict loaded by a single-process lowbit optimizer and by torch.optim.AdamW.
lowbit.optim._checkpoint documents the reshardable state-dict form this exercises.

The model's matrices are [64, 256]: on 2 ranks every shard holds 32 rows = 8192 elements, a
multiple of both block sizes (256 for 8-bit, 128 for 4-bit), so the shard-local blocks of the
saving and of the loading side are the unsharded parameter's blocks. Then a load is exact: the
quantized states after the load are bit-identical to the saved ones (sliced or concatenated to
the new shards), and so is everything after. 2 -> 2 resumes are compared with the uninterrupted
2-rank run bit for bit (losses, parameters). A resume in another world size continues the
saved states exactly (checked bit for bit on the states), and then computes its gradients in the
new world's reduction order: its losses equal the uninterrupted run of the saving world's within
fp32 reduction-order tolerance (test_distributed_fsdp2's bound). A model with [33, 100]
matrices (256-blocks: rank 1's shard starts inside a block) shows what holds without alignment:
2 -> 2 still bit for bit, other world sizes within a quantization step.

Spawns: the 2-rank save (with its 2 -> 2 resume), a 1-rank save (with the 2 -> 1 resume), and the
1 -> 2 resume (with the full state dict loaded on 2 ranks); every configuration runs inside each
spawn.
"""
import copy
import os

import pytest
import torch

import lowbit.optim as lo
from lowbit.optim._checkpoint import carry_absmax
from lowbit.reference import optim as ref

from dist_helpers import MLP, mean_over_ranks, run_ranks

STEPS, SAVE_AT, BATCH, DIM, ROWS, SPIKE = 5, 2, 8, 256, 64, 3
LR = 1e-2


# the model: MLP(ROWS, DIM) of dist_helpers, [64, 256] matrices whose shards are block-aligned
CONFIGS = {
    "AdamW8bit": lambda ps: lo.AdamW8bit(ps, lr=LR, seed=1),
    "AdamW4bit": lambda ps: lo.AdamW4bit(ps, lr=LR, seed=1),
    # per-tensor clip states (AdaClip's max EMA, AdaGN's moments) and the clip clock
    "StableSPAM8bit": lambda ps: lo.StableSPAM8bit(ps, lr=LR, seed=1),
}
# [33, 100] matrices with 256-blocks: rank 1's shard starts at element 1700, inside a block
UNALIGNED = {"AdamW8bit@unaligned": lambda ps: lo.AdamW8bit(ps, lr=LR, seed=1,
                                                            min_quant_numel=256)}
ALL = {**CONFIGS, **UNALIGNED}
SHAPE = {name: (33, 100) if name in UNALIGNED else (ROWS, DIM) for name in ALL}


def _batch(step, dim=DIM):
    target = torch.randn(dim, dim, generator=torch.Generator().manual_seed(7)) / dim ** 0.5
    x = torch.randn(BATCH, dim, generator=torch.Generator().manual_seed(100 + step))
    if step == SPIKE:  # a gradient spike after the resume: AdaClip acts on its saved EMA
        x = 4 * x
    return x, x @ target


def _model(world, name, seed=0):
    """The MLP under fully_shard over all ranks (a world of 1 too: DCP reshards DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = MLP(*SHAPE[name])
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def _steps(model, opt, steps, rank, world):
    losses = []
    for step in steps:
        x, y = _batch(step, model.w1.shape[1])
        loss = ((model(x[rank::world]) - y[rank::world]) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss, world))
    return losses


def _local(t):
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _snapshot(model, opt):
    """This rank's parameters (local shards) and raw optimizer states (codes, absmax, ...)."""
    params = dict(model.named_parameters())
    return {"params": {n: _local(p) for n, p in params.items()},
            "states": {n: {k: _local(v) for k, v in opt.state[p].items()}
                       for n, p in params.items()},
            "clip_step": opt._clip_step}


def _ckpt(root, name, world):
    return os.path.join(root, f"{name}-w{world}")


def _save(rank, world, root):
    """Per configuration: the uninterrupted run, saving model and optimizer with DCP after
    SAVE_AT steps; the snapshot at the save, the losses and the final snapshot; on a world > 1
    also the full (unsharded) state dicts, gathered to rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, get_state_dict)
    out = {}
    for name, make in ALL.items():
        model = _model(world, name)
        opt = make(model.parameters())
        losses = _steps(model, opt, range(SAVE_AT), rank, world)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=_ckpt(root, name, world))
        run = {"at_save": _snapshot(model, opt)}
        if world > 1:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0 only
            # copies: "step" and the clip states are the live 0-dim tensors (as torch.optim's
            # state_dict() holds them), which the steps below advance
            run["full_optim"] = copy.deepcopy(get_optimizer_state_dict(model, opt, options=full))
            run["full_model"] = copy.deepcopy(get_model_state_dict(model, options=full))
            run["export"] = {k: {n: (type(v).__name__, tuple(v.shape)) for n, v in st.items()}
                             for k, st in opt.export_state_dict()["state"].items()}
        # the save changed nothing: the run goes on as if it had not happened
        run["losses"] = losses + _steps(model, opt, range(SAVE_AT, STEPS), rank, world)
        run["final"] = _snapshot(model, opt)
        out[name] = run
    return out


def _resume(rank, world, root, src_world):
    """Per configuration: a model and optimizer built afresh (another initialisation) load the
    checkpoint of `src_world` ranks with DCP (the documented state_dict API), then train the
    remaining steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    out = {}
    for name, make in ALL.items():
        model = _model(world, name, seed=123)
        opt = make(model.parameters())
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=_ckpt(root, name, src_world))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        loaded = _snapshot(model, opt)
        losses = _steps(model, opt, range(SAVE_AT, STEPS), rank, world)
        out[name] = {"loaded": loaded, "losses": losses, "final": _snapshot(model, opt)}
    return out


def _resume_then_full(rank, world, root, src_world, full_model, full_optim):
    """_resume, then AdamW8bit loading the full (unsharded) state dicts through
    set_state_dict(full_state_dict=True), which hands each rank its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    out = {"resume": _resume(rank, world, root, src_world)}
    model = _model(world, "AdamW8bit", seed=123)
    opt = CONFIGS["AdamW8bit"](model.parameters())
    set_state_dict(model, opt, model_state_dict=full_model, optim_state_dict=full_optim,
                   options=StateDictOptions(full_state_dict=True))
    out["full"] = _snapshot(model, opt)
    return out


def _save_then_resume(rank, world, root, src_world):
    return {"save": _save(rank, world, root), "resume": _resume(rank, world, root, src_world)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dcp_ckpt"))
    two = run_ranks(_save_then_resume, 2, tmp_path_factory.mktemp("dcp2"), root, 2)
    one = run_ranks(_save_then_resume, 1, tmp_path_factory.mktemp("dcp1"), root, 2)
    full = two[0]["save"]["AdamW8bit"]
    one_to_two = run_ranks(_resume_then_full, 2, tmp_path_factory.mktemp("dcp12"), root, 1,
                           full["full_model"], full["full_optim"])
    return {"save2": [r["save"] for r in two], "2to2": [r["resume"] for r in two],
            "save1": one[0]["save"], "2to1": one[0]["resume"],
            "1to2": [r["resume"] for r in one_to_two], "full2": [r["full"] for r in one_to_two]}


def _assert_equal_snapshots(got, want):
    assert got["clip_step"] == want["clip_step"]
    for n, p in want["params"].items():
        assert torch.equal(got["params"][n], p), n
    for n, st in want["states"].items():
        assert got["states"][n].keys() == st.keys(), n
        for k, v in st.items():
            assert torch.equal(got["states"][n][k], v), (n, k)


def _joined(snaps):
    """The 2 ranks' snapshots as one unsharded snapshot: parameters and 32-bit states
    concatenated along dim 0; codes and absmax too (the blocks are aligned, so the unsharded
    blocks are the shards' blocks in order); 0-dim entries (step, clip states) are the same on
    both ranks. The 1-element gain: rank 1's shard is empty."""
    a, b = snaps
    for n in a["states"]:
        for k, v in a["states"][n].items():
            if v.dim() == 0:
                assert torch.equal(v, b["states"][n][k]), (n, k)
    cat = lambda x, y: x if x.dim() == 0 else torch.cat([x, y])
    return {"clip_step": a["clip_step"],
            "params": {n: cat(p, b["params"][n]) for n, p in a["params"].items()},
            "states": {n: {k: cat(v, b["states"][n][k]) for k, v in st.items()}
                       for n, st in a["states"].items()}}


@pytest.mark.parametrize("name", ALL)  # unaligned too: the same world cuts the same blocks
def test_dcp_2_to_2_resume_is_bit_identical(runs, name):
    for rank in range(2):
        saved, resumed = runs["save2"][rank][name], runs["2to2"][rank][name]
        _assert_equal_snapshots(resumed["loaded"], saved["at_save"])
        assert resumed["losses"] == saved["losses"][SAVE_AT:]
        _assert_equal_snapshots(resumed["final"], saved["final"])
    assert runs["save2"][0][name]["losses"][-1] < runs["save2"][0][name]["losses"][0]


@pytest.mark.parametrize("name", CONFIGS)
def test_dcp_2_to_1_resume(runs, name):
    saved = [r[name] for r in runs["save2"]]
    resumed = runs["2to1"][name]
    # the 2-rank states, requantized on one rank, are exactly the concatenated shard states
    _assert_equal_snapshots(resumed["loaded"], _joined([s["at_save"] for s in saved]))
    assert resumed["loaded"]["states"]["w1"]["exp_avg_codes"].numel() > 0  # quantized
    # then one rank sums the gradients in another order than two
    torch.testing.assert_close(torch.tensor(resumed["losses"]),
                               torch.tensor(saved[0]["losses"][SAVE_AT:]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_dcp_1_to_2_resume(runs, name):
    saved = runs["save1"][name]
    resumed = [r[name] for r in runs["1to2"]]
    _assert_equal_snapshots(_joined([r["loaded"] for r in resumed]), saved["at_save"])
    assert resumed[0]["losses"] == resumed[1]["losses"]
    torch.testing.assert_close(torch.tensor(resumed[0]["losses"]),
                               torch.tensor(saved["losses"][SAVE_AT:]), rtol=1e-5, atol=0)


def _plain_model(full_model):
    model = MLP(ROWS, DIM)
    model.load_state_dict(full_model)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_full_state_dict_loads_into_single_process_lowbit(runs, name):
    saved = runs["save2"][0][name]
    full = saved["full_optim"]
    # fp32 states of the unsharded shapes, keyed by parameter name (DCP's form)
    assert full["state"]["w1"]["exp_avg"].shape == (ROWS, DIM)
    assert full["state"]["w1"]["exp_avg"].dtype == torch.float32
    model = _plain_model(saved["full_model"])
    opt = CONFIGS[name](model.parameters())
    opt.load_state_dict(full)  # a single process: plain parameters, no process group
    joined = _joined([r[name]["at_save"] for r in runs["save2"]])
    _assert_equal_snapshots(_snapshot(model, opt), joined)
    # lowbit's export of the FSDP2 optimizer: DTensors with the parameters' global shapes
    assert saved["export"][0] == {"step": ("Tensor", ()), "exp_avg": ("DTensor", (ROWS, DIM)),
                                  "exp_avg_sq": ("DTensor", (ROWS, DIM))}


def test_full_state_dict_loads_into_torch_adamw(runs):
    saved = runs["save2"][0]["AdamW8bit"]
    full = saved["full_optim"]
    model = _plain_model(saved["full_model"])
    torch_opt = torch.optim.AdamW(model.parameters(), lr=LR)
    torch_opt.load_state_dict(full)
    params = dict(model.named_parameters())
    # torch holds the dequantized unsharded states and the step
    joined = _joined([r["AdamW8bit"]["at_save"] for r in runs["save2"]])
    st = torch_opt.state[params["w1"]]
    codes, absmax = (joined["states"]["w1"]["exp_avg_" + k] for k in ("codes", "absmax"))
    m = carry_absmax(ref.dequantize_state(codes, absmax, 0, 8, (ROWS, DIM)), codes, absmax, 0,
                     (8, 256))
    assert torch.equal(st["exp_avg"], m)
    assert st["step"].item() == SAVE_AT
    g = torch_opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (LR, (0.9, 0.999), 0.01)
    # and its next step is the 32-bit lowbit AdamW's from the same state, to fp32 rounding
    twin = _plain_model(saved["full_model"])
    lowbit32 = lo.AdamW(twin.parameters(), lr=LR)
    lowbit32.load_state_dict(full)
    for m, o in ((model, torch_opt), (twin, lowbit32)):
        x, y = _batch(SAVE_AT)
        ((m(x) - y) ** 2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _dequantized(snaps, name, key):
    """State `key` of w1 dequantized from each rank's own blocks, concatenated."""
    parts = []
    for snap in snaps:
        st = snap["states"][name]
        parts.append(ref.dequantize_state(st[key + "_codes"], st[key + "_absmax"],
                                          key == "exp_avg_sq", 8, st[key + "_codes"].shape,
                                          256))
    return torch.cat([p.reshape(-1) for p in parts])


def test_dcp_unaligned_shards_resume_within_a_quantization_step(runs):
    """Shards starting inside a block (2 ranks, [33, 100], 256-blocks): a resume in another
    world size requantizes values cut into other blocks, so its states differ from the saved
    ones by up to a quantization step (not bit for bit), and the run goes on as closely."""
    name = "AdamW8bit@unaligned"
    pairs = (([r[name]["at_save"] for r in runs["save2"]], [runs["2to1"][name]["loaded"]]),
             ([runs["save1"][name]["at_save"]], [r[name]["loaded"] for r in runs["1to2"]]))
    for saved, loaded in pairs:
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = _dequantized(saved, "w1", key), _dequantized(loaded, "w1", key)
            assert not torch.equal(a, b)
            # the largest code gap of the 8-bit maps is 1/128 of the absmax (near +-1): half a
            # gap from the first rounding plus half from the second, of the larger absmax
            assert ((a - b).abs() <= a.abs().max() / 128).all(), key
    for resumed, uninterrupted in ((runs["2to1"][name], runs["save2"][0][name]),
                                   (runs["1to2"][0][name], runs["save1"][name])):
        torch.testing.assert_close(torch.tensor(resumed["losses"]),
                                   torch.tensor(uninterrupted["losses"][SAVE_AT:]),
                                   rtol=1e-3, atol=0)


def test_full_state_dict_loads_into_fsdp2_ranks(runs):
    """The full export of the 2-rank run, loaded on 2 ranks with set_state_dict
    (full_state_dict=True): each rank gets exactly the states it had at the save."""
    for rank in range(2):
        _assert_equal_snapshots(runs["full2"][rank], runs["save2"][rank]["AdamW8bit"]["at_save"])
