"""The typed config tree: YAML in, overrides, strict errors that name key/file/reason, YAML out."""

from pathlib import Path

import pytest
import yaml

from real_megatron.config import Config, ConfigError, config_to_dict, load_config, save_config
from real_megatron.parallel_layout import rank_places

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.parallel.dp >= 1


def test_defaults_are_the_papers_recipe():
    cfg = load_config(None)
    assert (cfg.algorithm.name, cfg.algorithm.tau, cfg.rollout.n_samples) == ("real", 0.5, 8)
    assert (cfg.train.prompts_per_step, cfg.train.prompts_per_mini_batch) == (128, 32)
    assert (cfg.optim.weight_decay, cfg.rollout.temperature, cfg.algorithm.kl) == (0.01, 0.6, "none")


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rate: 1.0e-6\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "optim.learning_rate" in msg and str(path) in msg
    path = write(tmp_path, "optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'optim.weight_decay'"):
        load_config(path)
    path = write(tmp_path, "algorithim:\n  tau: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'algorithim'; did you mean 'algorithm'"):
        load_config(path)


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    cases = {
        "train:\n  steps: ten\n": ("train.steps", "expects int", "'ten'"),
        "parallel:\n  tp: 2.5\n": ("parallel.tp", "expects int", "2.5"),
        "logging:\n  plot: 1\n": ("logging.plot", "expects bool", "1"),
        "algorithm:\n  name: ppo\n": ("algorithm.name", "one of 'real'", "'ppo'"),
        "data:\n  train_files: a.parquet\n": ("data.train_files", "list of str", "'a.parquet'"),
        "rollout:\n  stop_token_ids: [1, x]\n": ("rollout.stop_token_ids[1]", "expects int", "'x'"),
        "model: 3\n": ("model", "mapping", "3"),
        "algorithm:\n  clip_low: low\n": ("algorithm.clip_low", "float or null", "'low'"),
    }
    for text, needles in cases.items():
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        for needle in needles + (str(path),):
            assert needle in str(err.value), (text, str(err.value))


def test_ints_are_accepted_as_floats_and_yaml_exponents_are_numbers(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-6\n  clip_grad: 2\n"))
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.clip_grad, float)


@pytest.mark.parametrize(
    "text,reason",
    [
        ("parallel:\n  gpus_per_node: 6\n  tp: 4\n", r"not divisible by tp\*pp\*cp"),
        ("train:\n  prompts_per_step: 100\n  prompts_per_mini_batch: 32\n", "not divisible into mini-batches"),
        ("train:\n  prompts_per_mini_batch: 32\n  prompts_per_micro_batch: 5\n", "every group inside one micro-batch"),
        (
            "parallel:\n  nodes: 4\n  gpus_per_node: 8\ntrain:\n  prompts_per_micro_batch: 1\nrollout:\n  n_samples: 4\n",
            "fewer than the 32 data-parallel ranks",
        ),
        ("rollout:\n  n_samples: 1\n", "every group would be skipped"),
        ("algorithm:\n  name: grpo\nrollout:\n  n_samples: 1\n", "needs rollout.n_samples >= 2"),
        ("algorithm:\n  kl: reference\n", "needs algorithm.kl_coef > 0"),
        ("algorithm:\n  kl_coef: 0.1\n", "has no effect"),
        ("parallel:\n  sequence_parallel: true\n", "needs parallel.tp >= 2"),
        ("parallel:\n  vpp: 2\n", "needs parallel.pp >= 2"),
        ("train:\n  max_tokens_per_micro_batch: 100\n", "cannot hold one prompt group at its longest"),
        (
            "parallel:\n  gpus_per_node: 4\nrollout:\n  n_samples: 2\ntrain:\n  max_tokens_per_micro_batch: 99999\n",
            "would leave ranks without data",
        ),
        ("train:\n  steps: 0\n", "train.steps must be > 0"),
        ("optim:\n  lr: 1.0e-6\n  min_lr: 1.0e-5\n  lr_schedule: cosine\n", "above optim.lr"),
        ("rollout:\n  temperature: 0\n", r"rollout.temperature must be > 0, got 0.0: greedy .* uniform"),
        ("rollout:\n  temperature: -1\n", "rollout.temperature must be > 0"),
        ("rollout:\n  top_p: 1.5\n", r"rollout.top_p must lie in \(0, 1\], got 1.5"),
        ("rollout:\n  top_p: 0\n", r"rollout.top_p must lie in \(0, 1\]"),
        ("optim:\n  clip_grad: -1\n", "optim.clip_grad must be >= 0"),
        ("optim:\n  weight_decay: -0.1\n", "optim.weight_decay must be >= 0"),
        ("eval:\n  k: 0\n", "eval.k must be > 0, got 0"),
        ("data:\n  max_prompt_tokens: 0\n", "data.max_prompt_tokens must be > 0"),
        ("data:\n  reward_fn: just_a_module\n", "expected the form module.path:function"),
        # the dominant cause alone: 16 trainer processes on an 8-GPU node, not the token budget that follows
        (
            "parallel:\n  gpus_per_node: 16\nrollout:\n  n_samples: 8\nactor:\n  max_tokens_per_micro_batch: 99999\n",
            r"^[^;]*parallel.gpus_per_node=16 exceeds parallel.node_gpus=8 \(the GPUs of one node\)$",
        ),
    ],
)
def test_impossible_combinations_say_why(tmp_path, text, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=reason) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_overrides(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-6\n")
    cfg = load_config(
        path,
        [
            "optim.lr=2e-6",
            "parallel.gpus_per_node=4",
            "parallel.tp=2",
            "data.train_files=[a.parquet, b.jsonl]",
            "model.path=null",
            "algorithm.name=gspo",
            "model.hf_config_overrides.hidden_size=64",
            "train.output_dir=runs/x",
        ],
    )
    assert cfg.optim.lr == 2e-6 and cfg.parallel.dp == 2
    assert cfg.data.train_files == ["a.parquet", "b.jsonl"] and cfg.model.path is None
    assert cfg.algorithm.name == "gspo" and cfg.model.hf_config_overrides == {"hidden_size": 64}
    # key=null clears an inherited mapping (a model of one's own on a shipped config)
    paper = ROOT / "configs" / "real_r1distill_qwen_1p5b.yaml"
    assert load_config(paper).model.hf_config_overrides["hidden_size"] == 1536
    assert load_config(paper, ["model.hf_config_overrides=null"]).model.hf_config_overrides == {}
    with pytest.raises(
        ConfigError, match=r"with overrides optim.lrr=1: unknown key 'optim.lrr'; did you mean 'optim.lr'"
    ):
        load_config(path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'"):
        load_config(path, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"expected the form section.key=value"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"'optim.lr' expects float, got 'fast'"):
        load_config(path, ["optim.lr=fast"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "real_r1distill_qwen_7b.yaml", ["optim.lr=3e-7"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load(out.read_text())["optim"]["lr"] == 3e-7


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(write(tmp_path, "# nothing but a comment\n"))


def test_parallel_layout_follows_megatron_order():
    cfg = load_config(None, ["parallel.nodes=2", "parallel.gpus_per_node=4", "parallel.tp=2", "parallel.pp=2"])
    places = rank_places(cfg.parallel)
    assert cfg.parallel.dp == 2
    # tp fastest, then dp, then pp ("tp-cp-ep-dp-pp"); every (tp, dp, pp) exactly once
    assert [(p.tp, p.dp, p.pp) for p in places[:4]] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert {(p.tp, p.dp, p.pp) for p in places} == {(t, d, q) for t in range(2) for d in range(2) for q in range(2)}
    assert [p.node for p in places] == [0, 0, 0, 0, 1, 1, 1, 1]
