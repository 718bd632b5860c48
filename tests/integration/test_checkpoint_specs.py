"""One checkpoint layout for both layer specs: what the local spec writes (the converter, any CPU
job) loads into a model with Transformer Engine's parameter names, and the reverse: the same
logits, and for a trainer checkpoint the same next update (optimizer state included)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from multiprocess import run_processes

pytestmark = [pytest.mark.distributed]
SUPPORT = str(Path(__file__).resolve().parents[1] / "support")
TINY = dict(
    model_type="qwen2",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _rollouts(seed):
    from real_megatron.rollout.types import Rollout

    gen = torch.Generator().manual_seed(seed)
    return [
        Rollout(
            torch.randint(1, 96, (4,), generator=gen).tolist(),
            torch.randint(1, 96, (2 + k,), generator=gen).tolist(),
            float(k % 2),
            g,
        )
        for g in range(4)
        for k in range(4)
    ]


def _body(rank, world_size, out_dir):
    sys.path.insert(0, SUPPORT)
    from megatron.core import dist_checkpointing
    from te_named_spec import te_named_layer_spec

    import real_megatron.actor.model as model_module
    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.checkpoint import load_checkpoint, save_checkpoint
    from real_megatron.actor.distributed import init_distributed
    from real_megatron.actor.model_state import load_model_weights, model_sharded_state_dict
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict, load_hf_weights
    from real_megatron.config import AlgorithmConfig, OptimConfig
    from real_megatron.objectives import objective_from_config

    init_distributed(timeout_s=60)
    spec = model_module.ArchSpec.from_hf(TINY)
    local_spec = model_module.layer_spec

    def build(te_names: bool):
        model_module.layer_spec = (lambda s, *_: te_named_layer_spec(local_spec(s))) if te_names else local_spec
        try:
            return model_module.build_model_chunks(spec, model_module.transformer_config(spec))
        finally:
            model_module.layer_spec = local_spec

    def logits(chunks):
        tokens = torch.arange(1, 13).view(2, 6)
        with torch.no_grad():
            return chunks[0](tokens, torch.arange(6).expand(2, -1), None)

    out = Path(out_dir)
    local, te = build(False), build(True)
    te_names = {n for n, _ in te[0].named_parameters()}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te_names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te_names)
    assert any(k.endswith("core_attention._extra_state") for k in te[0].state_dict())
    report = {}
    for name, (src, dst, seed) in {"local_to_te": (local, te, 0), "te_to_local": (te, local, 1)}.items():
        load_hf_weights(src, spec, init_hf_state_dict(spec, seed=seed, bias_std=0.02).__getitem__)
        path = out / name
        path.mkdir()
        dist_checkpointing.save(model_sharded_state_dict(src), str(path))
        load_model_weights(dst, path)
        report[name] = float((logits(src) - logits(dst)).abs().max())

    # a trainer checkpoint (model, distributed optimizer, scheduler) across the specs
    weights = init_hf_state_dict(spec, seed=2, bias_std=0.02)
    settings = ActorSettings(
        groups_per_mini_batch=4, actor=ActorConfig(prompts_per_micro_batch=2), optim=OptimConfig(lr=1e-3)
    )
    objective = objective_from_config(AlgorithmConfig(name="real"))
    actors = []
    for te_names in (True, False):
        model_module.layer_spec = (lambda s, *_: te_named_layer_spec(local_spec(s))) if te_names else local_spec
        try:
            actors.append(Actor(spec, settings, objective, weights.__getitem__))
        finally:
            model_module.layer_spec = local_spec
    writer, reader = actors
    writer.train_step(_rollouts(0))
    save_checkpoint(writer, out / "trainer", {"step": 1})
    load_checkpoint(reader, out / "trainer")
    for actor in (writer, reader):
        actor.train_step(_rollouts(1))
    after = [dict((k, v.clone()) for k, v in a.hf_tensors()) for a in (writer, reader)]
    # the cheap per-rank format refuses a model that orders its parameters differently, by name
    save_checkpoint(writer, out / "flat", {"step": 2}, optimizer_format="dp_reshardable")
    try:
        load_checkpoint(reader, out / "flat")
        report["dp_reshardable_across_specs"] = "loaded"
    except RuntimeError as exc:
        report["dp_reshardable_across_specs"] = str(exc)
    model_module.layer_spec = lambda s, *_: te_named_layer_spec(local_spec(s))
    try:
        same = Actor(spec, settings, objective, weights.__getitem__)
    finally:
        model_module.layer_spec = local_spec
    load_checkpoint(same, out / "flat")  # ...and loads into the same spec
    report["dp_reshardable_same_spec"] = max(
        float((a - b).abs().max()) for (_, a), (_, b) in zip(same.hf_tensors(), writer.hf_tensors())
    )
    report["trainer_next_update"] = max(float((after[0][k] - after[1][k]).abs().max()) for k in after[0])
    report["trainer_moved"] = max(float((after[0][k] - weights[k]).abs().max()) for k in after[0])
    (out / "report.json").write_text(json.dumps(report))


def test_checkpoints_move_between_local_and_transformer_engine_namings(tmp_path):
    run_processes(_body, 1, str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["local_to_te"] == 0.0 and report["te_to_local"] == 0.0, report
    assert report["trainer_moved"] > 1e-4  # the updates did something...
    # ...and the same thing after the move, up to fp32 rounding of the gradient norm, which sums the
    # parameters in each spec's registration order (a wrongly mapped Adam state gives NaN or 1e13)
    assert report["trainer_next_update"] <= 1e-7, report
    assert "dp_reshardable format" in report["dp_reshardable_across_specs"], report
    assert "checkpoint.optimizer_format=fully_reshardable" in report["dp_reshardable_across_specs"]
    assert report["dp_reshardable_same_spec"] == 0.0
