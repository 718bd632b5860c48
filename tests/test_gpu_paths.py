"""Decisions that only matter on GPUs, checked on CPU: device binding, server GPUs, environment, fusions."""

import pytest

from real_megatron.actor.distributed import cuda_device_index, gpu_environment_warnings, trainer_environment
from real_megatron.config import load_config
from real_megatron.rollout.sglang_fleet import FleetError, split_gpus, visible_gpus
from real_megatron.rollout.engine_setup import launched_server_gpus

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
    assert trainer_environment(cfg, cuda=True) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                                   "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert trainer_environment(load_config(QUICKSTART), cuda=True) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
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
        launched_server_gpus(load_config(QUICKSTART, ["rollout.server_gpus=[0,3]"]), {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert launched_server_gpus(cfg, {"CUDA_VISIBLE_DEVICES": ""}) is None  # no GPU: nothing to assign


def test_gpu_configs_turn_on_the_fusions_megatron_validates():
    """The GPU TransformerConfig passes megatron-core's own validation with the fusions on; which
    depend on TE / Apex follows what is importable (neither is on this machine)."""
    from megatron.core.tensor_parallel import layers

    from real_megatron.actor.model import ArchSpec, fusions, transformer_config

    spec = ArchSpec.from_hf(dict(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    cpu, gpu = transformer_config(spec, on_gpu=False), transformer_config(spec, on_gpu=True, dtype=__import__("torch").bfloat16)
    assert not any(fusions(False).values())
    assert not cpu.bias_activation_fusion and not cpu.gradient_accumulation_fusion
    assert gpu.bias_activation_fusion and gpu.bias_dropout_fusion
    assert gpu.gradient_accumulation_fusion == layers._grad_accum_fusion_available
    assert gpu.apply_rope_fusion is False  # no Transformer Engine here: its RoPE kernel is absent
