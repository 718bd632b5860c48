#!/usr/bin/env python
"""The colocated layout's actor offload on one GPU: one rank of DeepSeek-R1-Distill-Qwen-1.5B's shape
(random weights, bf16, distributed optimizer), after one short training step so Adam's state exists,
moved to host memory and back (actor/offload.py) as a colocated step does: gradients and optimizer
state first, then the parameters; then everything back.

    python tools/gpu_offload_check.py [--json out.json]
    python tools/gpu_offload_check.py --tiny        # the same path at toy size (CPU dry run)

Prints and checks: seconds of each move, the GPU memory the device reports free before, after the
offload (torch's cache emptied) and after the reload, the bytes freed against the actor's own count
of what it holds, and that parameters and optimizer state are bit-identical after the cycle. Exit
code 1 when a check fails. A GPU check item of its own: `tools/gpu_check.sh` may run it as
`"$py" tools/gpu_offload_check.py --json "$out/gpu_offload.json"` (about a minute on an H100).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def _snapshot(actor) -> dict:
    from real_megatron.actor.offload import _torch_optimizers

    out = {f"p.{n}": p.detach().clone().cpu() for c in actor.chunks for n, p in c.named_parameters()}
    for i, opt in enumerate(_torch_optimizers(actor.optimizer)):
        for j, p in enumerate(q for g in opt.param_groups for q in g["params"]):
            out[f"m.{i}.{j}"] = p.detach().clone().cpu()
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"s.{i}.{j}.{k}"] = v.detach().clone().cpu()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy model (runs on CPU)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from gpu_step import R1_DISTILL_QWEN_1P5B, TINY

    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.distributed import init_distributed, shutdown
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.offload import HostOffload
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict
    from real_megatron.config import AlgorithmConfig, OptimConfig
    from real_megatron.objectives import objective_from_config
    from real_megatron.rollout.types import Rollout

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    init_distributed(timeout_s=600)
    spec = ArchSpec.from_hf(TINY if args.tiny else R1_DISTILL_QWEN_1P5B)
    weights = init_hf_state_dict(spec, seed=0, dtype=dtype, device="cuda" if cuda else "cpu")
    settings = ActorSettings(
        dtype=dtype, optim=OptimConfig(lr=1e-6), groups_per_mini_batch=1, actor=ActorConfig(prompts_per_micro_batch=1)
    )
    actor = Actor(spec, settings, objective_from_config(AlgorithmConfig(name="real")), weights.__getitem__)
    del weights
    gen = torch.Generator().manual_seed(0)
    rollouts = [
        Rollout(torch.randint(0, spec.vocab_size, (32,), generator=gen).tolist(), [1, 2, 3, 4], float(k % 2), 0)
        for k in range(2)
    ]
    actor.train_step(rollouts)

    def free_gb() -> float | None:
        if not cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0] / 2**30

    host = HostOffload(actor.chunks, actor.optimizer)
    held = host.bytes_on_device()
    before = _snapshot(actor)
    free_before = free_gb()
    timings = {}
    for name, work in (
        ("offload_state_s", lambda: host.offload(params=False)),
        ("offload_params_s", lambda: host.offload(params=True)),
    ):
        start = time.perf_counter()
        work()
        timings[name] = time.perf_counter() - start
    free_out = free_gb()
    left = host.bytes_on_device()
    start = time.perf_counter()
    host.onload()
    timings["onload_s"] = time.perf_counter() - start
    free_back = free_gb()
    after = _snapshot(actor)
    identical = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    out = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "held_gb": held / 2**30,
        "left_on_device_bytes": left,
        **timings,
        "gpu_free_before_gb": free_before,
        "gpu_free_offloaded_gb": free_out,
        "gpu_free_reloaded_gb": free_back,
        "freed_gb": None if not cuda else free_out - free_before,
        "bit_identical": identical,
    }
    ok = identical and left == 0 and (not cuda or out["freed_gb"] >= 0.9 * out["held_gb"])
    out["ok"] = ok
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
