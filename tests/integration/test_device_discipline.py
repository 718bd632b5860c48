"""Every tensor the actor feeds its model, kernels, loss and metric collectives is on the actor's device.

On a CPU-only machine batches and model share one device, so a forgotten transfer is invisible.
Here the actor's model is moved to the `meta` device after it is built: a micro-batch left on the
host, a host scalar stacked with device metrics, or any op that mixes devices is then caught (torch
raises for most, and a function mode records the rest, such as 0-dim host tensors, which torch lets
through on CPU and NCCL rejects on a GPU).
"""

import pytest
import torch
from multiprocess import run_processes
from tiny_actor import TINY, tiny_rollouts
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

pytestmark = [pytest.mark.distributed]


class MixedDevices(TorchFunctionMode):
    """Records every torch call whose tensor arguments sit on more than one device."""

    def __init__(self, exempt_storages=()):
        super().__init__()
        self.mixed = []
        self.exempt = set(exempt_storages)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        devices = {
            t.device.type
            for t in leaves
            if isinstance(t, torch.Tensor) and (t.is_meta or t.untyped_storage().data_ptr() not in self.exempt)
        }
        name = getattr(func, "__name__", str(func))
        if len(devices) > 1 and name not in ("to", "copy_", "__set__", "__get__"):  # transfers mix by design
            self.mixed.append(f"{name}: {sorted(devices)}")
        return func(*args, **kwargs)


def _actor_on_meta(rank, world_size, results):
    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.batching import build_mini_batches
    from real_megatron.actor.distributed import init_distributed
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict, unwrap
    from real_megatron.config import AlgorithmConfig
    from real_megatron.objectives import objective_from_config

    init_distributed(timeout_s=60)
    spec = ArchSpec.from_hf(TINY)
    weights = init_hf_state_dict(spec, seed=0)
    actor = Actor(
        spec,
        ActorSettings(groups_per_mini_batch=4, actor=ActorConfig(prompts_per_micro_batch=2)),
        objective_from_config(AlgorithmConfig(name="real")),
        weights.__getitem__,
    )
    assert actor.device == torch.device("cpu")
    for chunk in actor.chunks:
        model = unwrap(chunk).to("meta")
        # megatron keeps RoPE's inverse frequencies as a plain attribute made on the model's device
        model.rotary_pos_emb.inv_freq = model.rotary_pos_emb.inv_freq.to("meta")
    actor.device = torch.device("meta")
    (mini,) = build_mini_batches(tiny_rollouts(engine_logprobs=True), 4, 2, dp_size=1, dp_rank=0)
    assert all(mb.tokens.device.type == "cpu" for mb in mini.micro_batches)  # built on the host
    # The model's inputs are checked at its boundary; the loss path (kernels, objective, metric
    # records) and the metric reduction op by op. (megatron's own scratch tensors inside the model
    # follow torch.cuda.current_device(): the bound GPU on a cluster, the CPU here.)
    check = MixedDevices()

    def checked(fn):
        def run(*args, **kwargs):
            with check:
                return fn(*args, **kwargs)

        return run

    actor._loss, actor._metric_tensors = checked(actor._loss), checked(actor._metric_tensors)
    actor._mismatch_partials = checked(actor._mismatch_partials)
    model_inputs = set()
    for chunk in actor.chunks:
        unwrap(chunk).register_forward_pre_hook(
            lambda module, args: model_inputs.update(a.device.type for a in args if isinstance(a, torch.Tensor))
        )
    actor.compute_old_logprobs(mini)
    records = actor._schedule(mini, forward_only=True, mode="train")
    mismatch = actor._mismatch_partials([mini])  # engine log-probs (host) against pi_old (the actor's device)
    sums, mins, maxs = actor._metric_tensors(records, records, mismatch)
    results["model_inputs"] = sorted(model_inputs)
    results["mixed"] = check.mixed[:10]
    results["old_logprobs"] = sorted({mb.old_logprobs.device.type for mb in mini.micro_batches})
    results["records"] = sorted({v.device.type for r in records for v in r.values()})
    results["metrics"] = sorted({sums.device.type, mins.device.type, maxs.device.type, mismatch.device.type})


def _entry(rank, world_size, path):
    import json

    results = {}
    try:
        _actor_on_meta(rank, world_size, results)
    except Exception:  # noqa: BLE001 - the traceback is the finding
        import traceback

        results["error"] = traceback.format_exc()[-3000:]
    with open(path, "w") as f:
        json.dump(results, f)


def test_actor_step_keeps_every_tensor_on_the_actors_device(tmp_path):
    import json

    out = tmp_path / "result.json"
    run_processes(_entry, 1, str(out))
    results = json.loads(out.read_text())
    assert "error" not in results, results["error"]
    assert results["model_inputs"] == ["meta"]
    assert results["mixed"] == [], results["mixed"]
    assert results["old_logprobs"] == ["meta"]
    assert results["records"] == ["meta"]
    assert results["metrics"] == ["meta"]
