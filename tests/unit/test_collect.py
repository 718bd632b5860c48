"""One step's rollout batch with the embedded engine for real: dynamic sampling's rounds, the data
position it leaves, its exactness on a repeat, and the handling of truncated responses."""

import logging

import pytest
from tiny_models import tiny_qwen2_config

from real_megatron.config import Config
from real_megatron.data import PromptDataset
from real_megatron.rollout.collect import collect_rollouts, handle_truncated, overlong_penalty
from real_megatron.rollout.local import LocalEngine
from real_megatron.tasks import arithmetic as task
from real_megatron.tasks.inputs import Inputs


def odd_length(response: str, truth) -> float:
    """A reward function by rule (as a user's custom one): 1 for an odd-length response."""
    return float(len(response) % 2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    train, _, _ = task.split(200, 10, seed=2, max_operand=20)
    tok = task.build_tokenizer(root / "tok", [p + s for p, s, _ in train], 40)
    task.write_jsonl(root / "train.jsonl", train)
    config = tiny_qwen2_config(len(tok), hidden=16, positions=64, tie_word_embeddings=True)
    engine = LocalEngine(config, pad_token_id=tok.pad_token_id, seed=0)
    return root, tok, engine


def inputs(setup, reward_fn=odd_length):
    root, tok, _ = setup
    dataset = PromptDataset([root / "train.jsonl"], tok, seed=1, max_prompt_tokens=10_000)
    return Inputs(root, tok, dataset, {}, reward_fn, (tok.eos_token_id,))


def config(**algorithm) -> Config:
    cfg = Config()
    cfg.train.prompts_per_step, cfg.rollout.n_samples, cfg.rollout.max_new_tokens = 6, 2, 6
    cfg.rollout.temperature = 1.0
    for key, value in algorithm.items():
        setattr(cfg.algorithm, key, value)
    return cfg


def signature(batch):
    return [(r.group, tuple(r.prompt_ids), tuple(r.response_ids), r.reward) for r in batch]


def test_dynamic_sampling_fills_the_batch_with_informative_groups_and_counts_every_prompt(setup):
    engine = setup[2]
    cfg = config(dynamic_sampling=True, max_sampling_rounds=10)
    data = inputs(setup)
    batch, metrics = collect_rollouts(engine, data, cfg, step=1)
    rounds = metrics["sampling_rounds"]
    assert rounds >= 2, "the first round already had 6 informative groups; the test needs a harder round"
    assert metrics["prompts_generated"] == 6 * rounds
    assert data.train_set.state_dict()["position"] == 6 * rounds  # every prompt drawn is consumed, kept or not
    assert metrics["informative_groups"] == 6 and len(batch) == 12
    assert [r.group for r in batch] == [g for g in range(6) for _ in range(2)]
    for g in range(6):  # each group: one prompt, both labels
        members = batch[2 * g : 2 * g + 2]
        assert members[0].prompt_ids == members[1].prompt_ids and {r.reward for r in members} == {0.0, 1.0}

    # a repeat from the same data position samples exactly the same batch (a resumed step)
    again = inputs(setup)
    repeat, repeat_metrics = collect_rollouts(engine, again, cfg, step=1)
    assert signature(repeat) == signature(batch) and repeat_metrics["sampling_rounds"] == rounds
    # without the filter: one round, uniform groups included and counted
    plain, plain_metrics = collect_rollouts(engine, inputs(setup), config(), step=1)
    assert plain_metrics["sampling_rounds"] == 1 and plain_metrics["prompts_generated"] == 6
    assert plain_metrics["informative_groups"] < 6 and len(plain) == 12


def test_dynamic_sampling_stops_at_its_round_limit_and_says_so(setup, caplog):
    engine = setup[2]
    data = inputs(setup, reward_fn=lambda response, truth: 1.0)  # every group uniform
    with caplog.at_level(logging.WARNING, logger="real_megatron.rollout.collect"):
        batch, metrics = collect_rollouts(engine, data, config(dynamic_sampling=True, max_sampling_rounds=3), step=7)
    assert metrics["sampling_rounds"] == 3 and metrics["prompts_generated"] == 18 and metrics["informative_groups"] == 0
    assert len(batch) == 12 and data.train_set.state_dict()["position"] == 18
    assert (
        "step 7: 0 of 6 prompt groups informative after 3 sampling rounds (algorithm.max_sampling_rounds=3)"
        in caplog.text
    )


def test_truncated_responses_keep_negative_exclude(setup):
    engine = setup[2]
    cfg = config()
    batch, metrics = collect_rollouts(engine, inputs(setup, reward_fn=lambda response, truth: 1.0), cfg, step=2)
    truncated = [r.truncated for r in batch]
    assert any(truncated) and not all(truncated), "the tiny model should stop early sometimes"
    assert metrics["truncated_ratio"] == sum(truncated) / len(batch)
    cfg.algorithm.truncated = "negative"
    handle_truncated(batch, cfg.algorithm, cfg.rollout.max_new_tokens)
    assert [r.reward for r in batch] == [0.0 if t else 1.0 for t in truncated] and all(r.in_loss for r in batch)
    cfg.algorithm.truncated = "exclude"
    excluded, metrics = collect_rollouts(engine, inputs(setup, reward_fn=lambda response, truth: 1.0), cfg, step=2)
    assert [not r.in_loss for r in excluded] == truncated and metrics["excluded_ratio"] == sum(truncated) / len(batch)


def test_overlong_penalty_is_dapos_soft_punishment():
    # max 100 tokens, buffer 20: nothing up to 80, then linear to -factor at 100
    assert [overlong_penalty(n, 100, 20, 1.0) for n in (50, 80, 85, 90, 100)] == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(95, 100, 20, 0.5) == pytest.approx(-0.375)
