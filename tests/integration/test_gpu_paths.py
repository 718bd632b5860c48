"""Decisions that only matter on GPUs, checked on CPU: device binding, server GPUs, environment, fusions."""

import pytest

from real_megatron.actor.distributed import cuda_device_index, gpu_environment_warnings, trainer_environment
from real_megatron.config import load_config
from real_megatron.rollout.engine_setup import launched_server_gpus
from real_megatron.rollout.sglang_fleet import FleetError, split_gpus, visible_gpus

QUICKSTART = "configs/quickstart.yaml"


def test_one_visible_gpu_is_device_zero_whatever_the_local_rank():
    # srun --gpus-per-task=1: task with SLURM_LOCALID=5 sees one GPU, as device 0
    assert cuda_device_index(5, 1) == 0
    # the node's 8 GPUs all visible: local rank i takes GPU i
    assert [cuda_device_index(i, 8) for i in range(8)] == list(range(8))
    with pytest.raises(RuntimeError, match="local rank 4 has no GPU of its own: this process sees 4 GPUs"):
        cuda_device_index(4, 4)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        cuda_device_index(0, 0)


def test_triton_interpreter_on_a_gpu_machine_is_reported():
    assert gpu_environment_warnings(True, {"TRITON_INTERPRET": "1"})[0].startswith("TRITON_INTERPRET is set")
    assert gpu_environment_warnings(False, {"TRITON_INTERPRET": "1"}) == []  # CPU runs need it
    assert gpu_environment_warnings(True, {"TRITON_INTERPRET": "0"}) == []


def test_trainer_environment_on_gpus():
    cfg = load_config(QUICKSTART, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.gpus_per_node=2"])
    assert trainer_environment(cfg, cuda=True) == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    }
    assert trainer_environment(load_config(QUICKSTART), cuda=True) == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"
    }
    assert trainer_environment(cfg, cuda=False) == {}


def test_servers_get_disjoint_gpus_after_the_trainers():
    assert split_gpus(["0", "1", "2", "3"], 2, 2) == [["0", "1"], ["2", "3"]]
    with pytest.raises(FleetError, match="need 6 GPUs; only 4"):
        split_gpus(["0", "1", "2", "3"], 3, 2)
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "4,5, 6,7"}) == ["4", "5", "6", "7"]
    cfg = load_config(QUICKSTART, ["rollout.backend=sglang", "rollout.num_servers=2", "parallel.gpus_per_node=4"])
    eight = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert launched_server_gpus(cfg, eight) == ["4", "5", "6", "7"]  # ranks 0-3 train on GPUs 0-3
    # ids are as this process sees them: under CUDA_VISIBLE_DEVICES=2,3,6,7 index 2 is physical GPU 6
    cfg = load_config(QUICKSTART, ["rollout.backend=sglang", "rollout.server_gpus=[2,3]"])
    assert launched_server_gpus(cfg, {"CUDA_VISIBLE_DEVICES": "2,3,6,7"}) == ["6", "7"]
    with pytest.raises(ValueError, match=r"rollout.server_gpus names GPU\(s\) \[3\]; this process sees 2"):
        launched_server_gpus(
            load_config(QUICKSTART, ["rollout.backend=sglang", "rollout.server_gpus=[0,3]"]),
            {"CUDA_VISIBLE_DEVICES": "0,1"},
        )
    assert launched_server_gpus(cfg, {"CUDA_VISIBLE_DEVICES": ""}) is None  # no GPU: nothing to assign


def test_gpu_configs_turn_on_the_fusions_megatron_validates():
    """The GPU TransformerConfig passes megatron-core's own validation with the fusions on; which
    depend on TE / Apex follows what is importable (neither is on this machine)."""
    from megatron.core.tensor_parallel import layers

    from real_megatron.actor.model import ArchSpec, fusions, transformer_config

    spec = ArchSpec.from_hf(
        dict(
            model_type="qwen2",
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    cpu, gpu = (
        transformer_config(spec, on_gpu=False),
        transformer_config(spec, on_gpu=True, dtype=__import__("torch").bfloat16),
    )
    assert not any(fusions(False).values())
    assert not cpu.bias_activation_fusion and not cpu.gradient_accumulation_fusion
    assert gpu.bias_activation_fusion and gpu.bias_dropout_fusion
    assert gpu.gradient_accumulation_fusion == layers._grad_accum_fusion_available
    assert gpu.apply_rope_fusion is False  # no Transformer Engine here: its RoPE kernel is absent


def test_float32_takes_the_local_spec_even_where_transformer_engine_is(monkeypatch):
    """TE has no float32 attention for packed (THD) sequences: an fp32 run on a GPU with TE uses the
    local spec (the quickstart's dtype); bf16 takes TE's. CUDA and TE are made present here."""
    import sys
    import types

    import torch

    from real_megatron.actor import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    assert model.use_transformer_engine(torch.bfloat16) is True
    assert model.use_transformer_engine(torch.float32) is False


def test_transformer_engine_linears_keep_their_weight_gradient_fusion_without_apex():
    """TE linears (fuse_wgrad_accumulation) get their fusion; megatron's own linears, which would need
    Apex's kernel, keep theirs off."""
    import torch

    from real_megatron.actor.model import fuse_te_weight_gradients

    class TELinear(torch.nn.Linear):  # TE's attribute, as transformer_engine.pytorch.Linear has it
        fuse_wgrad_accumulation = False

    class MegatronLinear(torch.nn.Linear):
        gradient_accumulation_fusion = False

    model = torch.nn.Sequential(TELinear(4, 4), torch.nn.Sequential(TELinear(4, 4), MegatronLinear(4, 4)))
    assert fuse_te_weight_gradients(model) == 2
    assert model[0].fuse_wgrad_accumulation and model[1][0].fuse_wgrad_accumulation
    assert model[1][1].gradient_accumulation_fusion is False and not hasattr(model[1][1], "fuse_wgrad_accumulation")


def test_float16_is_refused_at_load_with_the_reason():
    from real_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="model.dtype=float16: float16 training has no loss scaling"):
        load_config(QUICKSTART, ["model.dtype=float16"])


def test_gpu_memory_metrics_come_from_the_cuda_runtime_of_the_current_device(monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=3 the process's device 0 is physical GPU 3: NVML by index 0 would
    read another GPU. The metric is the CUDA runtime's free/total of the current device."""
    import torch

    from real_megatron.actor.actor import device_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * 2**30, 141 * 2**30))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7 * 2**30)
    assert device_memory() == {"gpu_peak_allocated_gb": 7.0, "gpu_used_gb": 111.0}


def _host_checks_body(rank, world_size):
    import dataclasses

    from tiny_actor import TINY, tiny_rollouts

    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.distributed import init_distributed
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict
    from real_megatron.config import AlgorithmConfig
    from real_megatron.objectives import objective_from_config

    init_distributed(timeout_s=60)
    spec = ArchSpec.from_hf(TINY)
    actor = Actor(
        spec,
        ActorSettings(groups_per_mini_batch=4, actor=ActorConfig(prompts_per_micro_batch=2)),
        objective_from_config(AlgorithmConfig(name="real")),
        init_hf_state_dict(spec, seed=0).__getitem__,
    )
    rollouts = tiny_rollouts()
    bad_id = list(rollouts)
    bad_id[5] = dataclasses.replace(rollouts[5], response_ids=[3, 96, 4])
    with pytest.raises(
        ValueError, match=r"step 7: rollout 5 \(group 1\) has token id 96 outside the vocabulary \[0, 96\)"
    ):
        actor.train_step(bad_id, step=7)
    bad_label = list(rollouts)
    bad_label[2] = dataclasses.replace(rollouts[2], reward=0.5)
    with pytest.raises(ValueError, match=r"rollout 2 \(group 0\) has reward 0.5; REAL's objectives take 0/1"):
        actor.train_step(bad_label, step=7)
    assert actor.optimizer_steps == 0
    assert actor.train_step(rollouts, step=7)["skipped_updates"] == 0  # valid ones train


def test_token_ids_and_labels_are_checked_on_the_host_before_the_step():
    """The kernels and REAL's loss skip their value checks on GPUs (a device sync per micro-batch);
    the actor checks every rollout on the host first, with an error naming the rollout."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
    from multiprocess import run_processes

    run_processes(_host_checks_body, 1)


def _recompute_body(rank, world_size):
    import torch
    from tiny_actor import TINY, tiny_rollouts

    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.distributed import init_distributed
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict, unwrap
    from real_megatron.config import AlgorithmConfig, OptimConfig
    from real_megatron.objectives import objective_from_config

    init_distributed(timeout_s=60)
    spec = ArchSpec.from_hf(dict(TINY, num_hidden_layers=4))
    params = {}
    for name, on, layers in (("none", False, None), ("block", True, 2), ("full", True, None)):
        settings = ActorSettings(
            groups_per_mini_batch=4,
            actor=ActorConfig(prompts_per_micro_batch=2),
            recompute_activations=on,
            recompute_layers=layers,
            optim=OptimConfig(lr=1e-3, clip_grad=0.0),
        )
        actor = Actor(
            spec,
            settings,
            objective_from_config(AlgorithmConfig(name="real")),
            init_hf_state_dict(spec, seed=0).__getitem__,
        )
        method = (actor.config.recompute_method, actor.config.recompute_num_layers)
        assert method == {"none": (None, None), "block": ("block", 2), "full": ("uniform", 1)}[name], (name, method)
        actor.train_step(tiny_rollouts(), step=1)
        params[name] = {n: p.detach().clone() for c in actor.chunks for n, p in unwrap(c).named_parameters()}
    init = init_hf_state_dict(spec, seed=0)
    assert not torch.equal(params["none"]["decoder.final_layernorm.weight"], init["model.norm.weight"])  # it trained
    for name in ("block", "full"):  # recompute changes memory, never numbers (fp32, CPU)
        assert all(torch.equal(params[name][k], params["none"][k]) for k in params["none"]), name


def test_block_recompute_of_some_layers_trains_exactly_as_without():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
    from multiprocess import run_processes

    run_processes(_recompute_body, 1)
