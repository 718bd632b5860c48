"""Optimizer CPU offload (optim.cpu_offload: megatron-core's HybridDeviceOptimizer): a tiny model
trained a few steps with the optimizer in host memory (all of it, or half with the overlapped
copies) ends at the plain optimizer's parameters, on one process (fp32, the plain optimizer) and at
DP=2 over gloo (bf16 weights, the distributed optimizer; there also all of it offloaded with the
precision-aware optimizer). DP=2 runs through cpu_compat.hybrid_optimizer_fp32_shards_as_leaves:
without it megatron-core's DistributedOptimizer rebuilds the hybrid optimizer over the fp32
parameters' shards (the local spec's norm weights here) as non-leaf views, which torch refuses.

Tolerance: both sides run torch's AdamW, the hybrid one fused (megatron-core passes fused=True), the
plain one not; the fused kernel's different rounding of the same fp32 math leaves differences of a
few ulps per step, so the parameters must agree to 1e-5 (relative and absolute) after 3 steps, while
one step's update at lr 1e-2 moves them by ~1e-2. At DP=2 the bf16 weights are rounded from those
fp32 main parameters and agree to the same 1e-5 (measured: no element one bf16 rounding apart)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

VARIANTS = {
    "plain": {},
    "offload all": {"cpu_offload": True},
    "offload half, overlapped": {
        "cpu_offload": True,
        "cpu_offload_fraction": 0.5,
        "overlap_cpu_optimizer_d2h_h2d": True,
    },
}


def _actor(distributed_optimizer: bool, dtype: torch.dtype, **optim):
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
        optim=OptimConfig(lr=1e-2, use_distributed_optimizer=distributed_optimizer, **optim),
        dtype=dtype,
        groups_per_mini_batch=2,
        total_steps=10,
        actor=ActorConfig(prompts_per_micro_batch=2),
    )
    return Actor(spec, settings, build_objective("real"), weights.__getitem__)


def _train(rank, world_size, out):
    from tiny_actor import tiny_rollouts

    from real_megatron.actor.distributed import init_distributed

    init_distributed(tp=1, pp=1, timeout_s=120, seed=1)
    variants = dict(VARIANTS)
    if world_size > 1:
        variants["offload all, precision-aware"] = {"cpu_offload": True, "use_precision_aware_optimizer": True}
    result = {}
    for name, optim in variants.items():
        # DP=2: bf16 weights, fp32 main parameters in the distributed optimizer
        actor = _actor(world_size > 1, torch.bfloat16 if world_size > 1 else torch.float32, **optim)
        inner = [o.optimizer for o in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])]
        result[name] = {
            "optimizer": [type(o).__name__ for o in inner],
            # where the hybrid optimizer put the parameters: host optimizers, and whether a device one remains
            "split": [
                (len(o.cpu_optimizers), o.gpu_optimizer is not None) for o in inner if hasattr(o, "cpu_optimizers")
            ],
            "losses": [actor.train_step(tiny_rollouts(), step=step)["loss"] for step in (1, 2, 3)],
            "params": {n: p.detach().float().clone() for c in actor.chunks for n, p in c.named_parameters()},
        }
    torch.save(result, f"{out}.{rank}")


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [1, 2])
def test_cpu_offloaded_optimizer_trains_to_the_plain_parameters(tmp_path, world_size):
    from multiprocess import run_processes

    out = tmp_path / "optim.pt"
    run_processes(_train, world_size, str(out))
    for rank in range(world_size):
        result = torch.load(f"{out}.{rank}")
        plain = result.pop("plain")
        assert plain["optimizer"] == ["AdamW"]
        for name, r in result.items():
            assert r["optimizer"] == ["HybridDeviceOptimizer"], (name, r["optimizer"])
            ((host, device),) = r["split"]
            if "half" in name:  # overlapped: one host optimizer per parameter, the rest stepped on the device
                assert host > 1 and device, (name, r["split"])
            else:
                assert host >= 1 and not device, (name, r["split"])
            assert r["losses"] == pytest.approx(plain["losses"], rel=1e-5, abs=1e-6), name
            for k, p in plain["params"].items():
                torch.testing.assert_close(r["params"][k], p, rtol=1e-5, atol=1e-5, msg=f"{name}: {k}")
