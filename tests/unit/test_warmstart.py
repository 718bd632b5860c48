"""The task's warm-start stops on a dev pass@1 band, not a step count: checks, the finer checks
near the band, the rollback when a check lands past it, the errors, and the cached record."""

import json

import pytest

from real_megatron.tasks import arithmetic as task

MODEL = dict(
    model_type="qwen2",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    bos_token_id=None,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    train, held, dev = task.split(300, 40, seed=5, max_operand=20, n_dev=16)
    assert not {p for p, _, _ in dev} & {p for p, _, _ in train + held}  # dev steers; it never trains or scores RL
    tok = task.build_tokenizer(root / "tok", [p + s for p, s, _ in train], 40)
    config = dict(MODEL, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return train, dev, tok, config


def scripted(monkeypatch, scores: dict):
    """dev pass@1 by step: the decision logic under test, fed known scores."""
    seen = []

    def fake(model, tokenizer, dev, k, max_new_tokens, seed):
        seen.append(step := fake.trainer_step())
        return scores[step]

    monkeypatch.setattr(task, "dev_pass1", fake)
    return fake, seen


def test_stops_in_the_band_going_back_when_a_check_lands_past_it(setup, tmp_path, monkeypatch):
    train, dev, tok, config = setup
    steps = {}
    original = task._Trainer.one_step

    def counted(self):
        steps["now"] = self.step + 1
        return original(self)

    monkeypatch.setattr(task._Trainer, "one_step", counted)
    # every 40 steps while far below the band; 0.40 is within 0.2 of it -> every 10; 0.80 at 130 is
    # past it -> back to step 120, every 5 (the floor); 0.62 at 125 is in the band
    scores = {40: 0.05, 80: 0.30, 120: 0.40, 130: 0.80, 125: 0.62}
    fake, seen = scripted(monkeypatch, scores)
    fake.trainer_step = lambda: steps["now"]
    plan = task.WarmStartPlan(max_steps=400, batch=4, lr=1e-3, target=(0.55, 0.65), check_every=40)
    record = task.warm_start(tmp_path / "ws", config, tok, train, dev, plan, seed=5, progress=False)
    assert seen == [40, 80, 120, 130, 125]
    assert record["steps"] == 125 and record["dev_pass1"] == 0.62
    assert json.loads((tmp_path / "ws" / "warmstart.json").read_text())["steps"] == 125
    assert (tmp_path / "ws" / "model.safetensors").exists() and not (tmp_path / "ws.tmp").exists()
    # cached: a second call trains nothing and returns the record
    monkeypatch.setattr(task._Trainer, "one_step", lambda self: pytest.fail("retrained a cached warm-start"))
    assert task.warm_start(tmp_path / "ws", config, tok, train, dev, plan, seed=5, progress=False)["steps"] == 125


def test_the_rollback_restores_the_training_state(setup):
    train, dev, tok, config = setup
    plan = task.WarmStartPlan(max_steps=10, batch=4, lr=1e-3)
    a = task._Trainer(config, tok, train, plan, seed=3)
    for _ in range(3):
        a.one_step()
    snap = a.snapshot()
    ahead = [a.one_step() for _ in range(3)]
    a.restore(snap)
    assert a.step == 3 and [a.one_step() for _ in range(3)] == ahead  # same examples, same weights, same Adam


def test_errors_name_the_setting_to_change(setup, tmp_path, monkeypatch):
    train, dev, tok, config = setup
    plan = task.WarmStartPlan(max_steps=30, batch=4, lr=1e-3, target=(0.9, 1.0), check_every=10)
    with pytest.raises(
        task.WarmStartError,
        match=r"did not reach the target band 0.90-1.00 within "
        r"task.warmstart_max_steps=30 steps \(last checks: 10: 0.000",
    ):
        task.warm_start(tmp_path / "a", config, tok, train, dev, plan, seed=5, progress=False)
    assert not (tmp_path / "a").exists()  # nothing cached from a failed warm-start
    plan = task.WarmStartPlan(max_steps=30, batch=4, lr=1e-3, target=(-1.0, -0.5), check_every=10)
    with pytest.raises(task.WarmStartError, match=r"past the target band.*task.warmstart_target"):
        task.warm_start(tmp_path / "b", config, tok, train, dev, plan, seed=5, progress=False)


def test_without_a_target_it_trains_exactly_max_steps(setup, tmp_path):
    train, dev, tok, config = setup
    plan = task.WarmStartPlan(max_steps=7, batch=4, lr=1e-3, target=None)
    record = task.warm_start(tmp_path / "ws", config, tok, train, [], plan, seed=5, progress=False)
    assert record["steps"] == 7 and record["dev_checks"] == [] and record["dev_pass1"] is None
