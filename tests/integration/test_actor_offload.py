"""The actor's offload to host memory (actor/offload.py, the colocated layout): a cycle out and back
is bit-identical for parameters and optimizer state, the device storages are really released while
out, and a run that offloads between steps equals one that does not, step for step; with the
distributed optimizer (parameters in megatron-core's DDP buffers, moved by their own
offload_to_cpu/reload_from_cpu) and without it (parameters standalone)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _actor(distributed_optimizer: bool):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_actor import TINY

    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict
    from real_megatron.config import OptimConfig
    from real_megatron.objectives import build_objective

    spec = ArchSpec.from_hf(TINY)
    weights = init_hf_state_dict(spec, 0)
    settings = ActorSettings(
        optim=OptimConfig(lr=1e-2, use_distributed_optimizer=distributed_optimizer),
        groups_per_mini_batch=2,
        total_steps=10,
        actor=ActorConfig(prompts_per_micro_batch=2),
    )
    return Actor(spec, settings, build_objective("real"), weights.__getitem__)


def _state(actor) -> dict:
    from real_megatron.actor.offload import _torch_optimizers

    out = {f"param.{n}": p.detach().clone() for chunk in actor.chunks for n, p in chunk.named_parameters()}
    for i, opt in enumerate(_torch_optimizers(actor.optimizer)):
        for j, p in enumerate(q for g in opt.param_groups for q in g["params"]):
            out[f"main.{i}.{j}"] = p.detach().clone()
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"state.{i}.{j}.{k}"] = v.detach().clone()
    return out


def _cycles(rank, world_size, out):
    from tiny_actor import tiny_rollouts

    from real_megatron.actor.distributed import init_distributed
    from real_megatron.actor.offload import HostOffload

    init_distributed(tp=1, pp=1, timeout_s=120, seed=1)
    result = {}
    for dist_opt in (True, False):
        plain, moved = _actor(dist_opt), _actor(dist_opt)
        host = HostOffload(moved.chunks, moved.optimizer)
        held = host.bytes_on_device()
        record = {"held": held, "identical_cycle": [], "out_bytes": [], "equal_steps": []}
        for step in (1, 2, 3):
            a = plain.train_step(tiny_rollouts(), step=step)
            b = moved.train_step(tiny_rollouts(), step=step)
            before = _state(moved)
            host.offload(params=False)  # the colocated order: gradients and state first, then parameters
            host.offload(params=True)
            record["out_bytes"].append(host.bytes_on_device())
            host.onload()
            after = _state(moved)
            record["identical_cycle"].append(
                before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
            )
            p, m = _state(plain), _state(moved)
            record["equal_steps"].append(
                a["loss"] == b["loss"] and p.keys() == m.keys() and all(torch.equal(p[k], m[k]) for k in p)
            )
        record["state_tensors"] = sum(k.startswith("state.") for k in _state(moved))
        result[dist_opt] = record
    torch.save(result, f"{out}.{rank}")


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [1, 2])
def test_offload_cycles_are_bit_identical_and_change_no_step(tmp_path, world_size):
    """One process, and DP=2 (the distributed optimizer's state sharded over the two ranks)."""
    from multiprocess import run_processes

    out = tmp_path / "offload.pt"
    run_processes(_cycles, world_size, str(out))
    for dist_opt, r in (kv for rank in range(world_size) for kv in torch.load(f"{out}.{rank}").items()):
        assert r["state_tensors"] > 0, dist_opt  # Adam's moments exist and were compared
        assert r["held"] > 0 and r["out_bytes"] == [0, 0, 0], (dist_opt, r)  # every storage released while out
        assert r["identical_cycle"] == [True] * 3, (dist_opt, r)
        assert r["equal_steps"] == [True] * 3, (dist_opt, r)
