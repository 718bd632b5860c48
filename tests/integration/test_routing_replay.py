"""Routing replay (actor.routing_replay) on a tiny Qwen3-MoE: the embedded engine reports the experts
transformers routed each token to; SGLang's report decodes to the same layout; the actor replays
them and measures where its own routers disagree.

The replay test perturbs the actor's last MoE router in its forward-only passes (as a recomputation
whose numerics differ from the engine's and from the training forward's would): there, every token
also scores its least likely expert +50, so the actor's own top-k differs from the engine's on
every token of that layer and on none of the first: routing_mismatch_frac = 1/2 exactly, replay or
not. Without replay pi_old is computed on the perturbed routing: it moves away from the engine's
log-probs and the first update's s̄ is not 0. With replay the old log-probs use the engine's
experts (they equal the engine's log-probs to fp32 rounding) and s̄ = 0.
"""

import base64
from pathlib import Path

import pytest
import torch
from moe_models import make_moe_checkpoint
from multiprocess import run_processes

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [20, 21, 22, 23]]


def _engine(path):
    import transformers

    from real_megatron.rollout.local import LocalEngine

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return model, LocalEngine(model=model, pad_token_id=0, seed=0)


def _teacher_forced_routing(model, layers, ids):
    """transformers' experts of one full sequence, [tokens, MoE layers, k] (as sets: sorted)."""
    seen = {}
    handles = [
        model.model.layers[i].mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[2]))
        for i in layers
    ]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return torch.stack([seen[i] for i in layers], 1).sort(-1).values


def test_the_embedded_engine_reports_the_experts_transformers_routed_each_fed_token_to(tmp_path):
    from real_megatron.rollout.types import SamplingParams

    # 3 layers, the middle one dense: two MoE layers are reported, in order
    path = make_moe_checkpoint(tmp_path / "m", "qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])
    model, engine = _engine(path)
    assert engine.routing.moe_layers == (0, 2) and engine.routing.dtype == torch.uint8
    groups = engine.generate(
        PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=(3, 4), seed=7)
    )
    rows = 0
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            ids = prompt + sample.output_ids
            got = sample.routed_experts
            # one row per token the engine fed: the prompt and every response token but the last
            assert tuple(got.shape) == (len(ids) - 1, 2, 2)
            expected = _teacher_forced_routing(model, (0, 2), ids)[:-1]
            assert torch.equal(got.long().sort(-1).values, expected)
            rows += got.shape[0]
    assert rows > 40


def test_sglang_routed_experts_decode_to_the_moe_layers_and_bad_reports_are_named():
    from real_megatron.rollout.routing import RoutingShape, from_sglang

    shape = RoutingShape(num_layers=3, moe_layers=(0, 2), top_k=2, num_experts=4)
    table = torch.arange(5 * 3 * 2, dtype=torch.int32).reshape(5, 3, 2) % 4  # 3 prompt + 3 response tokens - 1
    encoded = base64.b64encode(table.numpy().tobytes()).decode()
    got = from_sglang(encoded, shape, prompt_tokens=3, response_tokens=3)
    assert got.dtype == torch.uint8 and torch.equal(got.long(), table[:, [0, 2]].long())
    assert torch.equal(from_sglang(table.tolist(), shape, 3, 3), got)  # a plain list decodes the same
    with pytest.raises(ValueError, match=r"server 1: routed_experts holds 30 ids, expected 6 tokens x 3 layers"):
        from_sglang(encoded, shape, prompt_tokens=3, response_tokens=4, where="server 1")
    with pytest.raises(ValueError, match=r"experts outside \[0, 4\)"):
        from_sglang((table + 4).tolist(), shape, 3, 3)


def _rollouts(engine):
    from real_megatron.rollout.types import Rollout, SamplingParams

    groups = engine.generate(PROMPTS, 4, SamplingParams(temperature=1.0, max_new_tokens=6, seed=11))
    return [
        Rollout(
            PROMPTS[g], s.output_ids, float(k % 2 == 0), g, engine_logprobs=s.logprobs, routed_experts=s.routed_experts
        )
        for g, group in enumerate(groups)
        for k, s in enumerate(group)
    ]


def _perturb_last_router_when_not_training(actor):
    """In forward-only passes (no grad) the last MoE router scores each token's least likely expert +50."""
    from real_megatron.actor.moe import moe_layers

    ((_, layer),) = [item for item in moe_layers(actor.chunks) if item[0] == max(actor.spec.moe.moe_layers)]
    router, gating = layer.router, layer.router.gating

    def perturbed(hidden):
        logits = gating(hidden)
        if torch.is_grad_enabled():
            return logits
        return logits.scatter_add(-1, logits.argmin(-1, keepdim=True), torch.full_like(logits[..., :1], 50.0))

    router.gating = perturbed


def _replay_body(rank, world_size, path):
    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.distributed import init_distributed
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.config import AlgorithmConfig, OptimConfig
    from real_megatron.convert.hf_io import HFCheckpointReader
    from real_megatron.objectives import objective_from_config

    init_distributed(timeout_s=60)  # two data-parallel ranks
    spec = ArchSpec.from_pretrained(path)
    _, engine = _engine(path)
    rollouts = _rollouts(engine)  # the same on both ranks (seeded)
    results = {}
    for mode in ("none", "rollout"):
        settings = ActorSettings(
            groups_per_mini_batch=4,
            optim=OptimConfig(lr=1e-3),
            actor=ActorConfig(prompts_per_micro_batch=2, routing_replay=mode),
        )
        actor = Actor(
            spec, settings, objective_from_config(AlgorithmConfig(name="real")), HFCheckpointReader(path, spec).get
        )
        _perturb_last_router_when_not_training(actor)
        results[mode] = actor.train_step(rollouts, step=1)
    off, on = results["none"], results["rollout"]
    # the last of two MoE layers disagrees on every token the engine routed, the first on none
    assert off["routing_mismatch_frac"] == 0.5 and on["routing_mismatch_frac"] == 0.5, (off, on)
    # without replay pi_old follows the perturbed routing: far from the engine, and s̄ != 0 at the first update
    assert off["mismatch_abs_max"] > 1e-2 and off["first_update_score_abs_max"] > 1e-3, off
    # with replay pi_old used the engine's experts: the engine's log-probs to rounding, and s̄ = 0
    assert on["mismatch_abs_max"] < 1e-4 and on["first_update_score_abs_max"] < 1e-6, on

    # replay needs every rollout's routing: the same error on every rank, before any collective
    rollouts[5].routed_experts = None
    with pytest.raises(
        ValueError,
        match=r"step 2: actor.routing_replay=rollout needs the engine's routed experts of "
        r"every rollout; 1 of 16 lack them \(e.g. rollout 5, group 1\)",
    ):
        actor.train_step(rollouts, step=2)


@pytest.mark.distributed
def test_replay_gives_the_old_logprobs_the_engines_experts_and_the_metric_sees_the_mismatch(tmp_path):
    path = make_moe_checkpoint(tmp_path / "m", "qwen3_moe")
    run_processes(_replay_body, 2, str(path))


def test_routing_replay_is_refused_for_a_dense_model_and_on_by_default_for_moe():
    from real_megatron.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    with pytest.raises(
        ConfigError,
        match=r"actor.routing_replay='none' replays mixture-of-experts routing, and the "
        r"model is dense",
    ):
        load_config(root / "quickstart.yaml", ["actor.routing_replay=none"])
    assert load_config(root / "quickstart_moe.yaml").actor.routing_replay == "rollout"
    assert load_config(root / "quickstart_moe.yaml", ["actor.routing_replay=none"]).actor.routing_replay == "none"
