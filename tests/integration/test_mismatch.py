"""The actor measures the train-inference mismatch on every step: its recomputed pi_old (at the
sampling temperature) against the engine's log-probs, over two data-parallel ranks, equal to
figures computed from transformers' model directly; the first update's s̄ is 0, and a warning names
the step when it is not."""

import logging

import pytest
import torch
from multiprocess import run_processes
from tiny_actor import TINY, tiny_rollouts

pytestmark = [pytest.mark.distributed]
TEMPERATURE = 0.7


def _with_engine_logprobs(spec, state):
    """tiny_rollouts with engine log-probs = transformers' own at TEMPERATURE + a known offset per
    token: +0.8 on every third token, -0.1 on the others."""
    import transformers

    config = transformers.AutoConfig.for_model(**TINY)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    model.load_state_dict(state, strict=False)
    rollouts, offsets = tiny_rollouts(), []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1] / TEMPERATURE
            exact = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(r.response_ids)[:, None])[:, 0]
            offset = torch.tensor(
                [0.8 if t % 3 == 0 else -0.1 for t in range(len(r.response_ids))], dtype=torch.float64
            )
            r.engine_logprobs = (exact + offset).tolist()
            offsets.append(offset)
    return rollouts, torch.cat(offsets)


def _body(rank, world_size):
    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.distributed import init_distributed
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict
    from real_megatron.config import AlgorithmConfig, OptimConfig
    from real_megatron.objectives import objective_from_config

    init_distributed(timeout_s=60)  # two data-parallel ranks
    spec = ArchSpec.from_hf(TINY)
    state = init_hf_state_dict(spec, seed=0)
    rollouts, offsets = _with_engine_logprobs(spec, state)
    settings = ActorSettings(
        groups_per_mini_batch=4,
        actor=ActorConfig(prompts_per_micro_batch=2),
        logprob_temperature=TEMPERATURE,
        mismatch_threshold=0.5,
        optim=OptimConfig(lr=1e-3),
    )
    actor = Actor(
        spec,
        settings,
        objective_from_config(AlgorithmConfig(name="real", importance_correction="tis")),
        state.__getitem__,
    )
    metrics = actor.train_step(rollouts, step=1)
    d = -offsets  # log pi_old - log pi_engine
    assert metrics["mismatch_frac"] == pytest.approx((offsets.abs() > 0.5).double().mean().item(), abs=1e-12)
    assert metrics["mismatch_abs_mean"] == pytest.approx(offsets.abs().mean().item(), abs=2e-5), metrics
    assert metrics["mismatch_abs_max"] == pytest.approx(0.8, abs=2e-5)
    assert metrics["mismatch_kl"] == pytest.approx((torch.expm1(d) - d).mean().item(), abs=2e-5)
    assert (
        metrics["first_update_score_abs_max"] < 1e-6 and metrics["skipped_updates"] == 0
    )  # s̄ = 0 at pi_theta = pi_old

    # pi_old recomputed wrongly (here: shifted on purpose): the first update's s̄ is not 0 -> a warning naming the step
    recompute = actor.compute_old_logprobs

    def shifted(mini):
        recompute(mini)
        for mb in mini.micro_batches:
            mb.old_logprobs = mb.old_logprobs + 0.01

    actor.compute_old_logprobs = shifted
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("real_megatron.actor.actor").addHandler(handler)
    metrics = actor.train_step(rollouts, step=2)
    assert metrics["first_update_score_abs_max"] == pytest.approx(0.01, abs=1e-5)
    warnings = [r.getMessage() for r in records if "first update" in r.getMessage()]
    assert (len(warnings) == 1) == (rank == 0), warnings
    if rank == 0:
        assert warnings[0].startswith("step 2: at the first update max |s̄| = 0.01"), warnings

    # a rollout without the engine's log-probs: the same error on every rank, before any collective
    rollouts[5].engine_logprobs = None
    with pytest.raises(
        ValueError,
        match=r"step 3: algorithm.importance_correction=tis needs the engine's log-prob "
        r"of every response token; 1 of 16 rollouts lack them \(e.g. rollout 5, group 1\)",
    ):
        actor.train_step(rollouts, step=3)


def test_mismatch_metrics_and_the_first_update_check_over_two_ranks():
    run_processes(_body, 2)
