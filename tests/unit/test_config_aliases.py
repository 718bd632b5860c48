"""Keys that moved to their owner's section keep their old names: in files, in `a.b=c` overrides
and in `base:` chains, each logging its new name once; a saved config carries the new names."""

import logging

import pytest
import yaml

from real_megatron import config as config_module
from real_megatron.config import (
    MOVED_KEYS,
    ConfigError,
    config_to_dict,
    key_default,
    key_value,
    load_config,
    save_config,
)


def _value(key: str):
    """A valid value other than the key's default."""
    default = key_default(key)
    if isinstance(default, bool):
        return not default
    if isinstance(default, str):  # a choice: another of the field's values
        return {"rollout": "none"}[default]
    if default is None:  # max_tokens_per_micro_batch: a budget that holds one group at the default lengths
        return 8 * 9216
    return default * 2 if key.endswith("prompts_per_micro_batch") else default + 1  # still divides a mini-batch


@pytest.fixture(autouse=True)
def fresh_log():
    config_module._told.clear()  # each test sees the first use in a process
    yield


@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_an_old_name_sets_the_new_key_and_says_so_once(old, tmp_path, caplog):
    new, value = MOVED_KEYS[old], _value(MOVED_KEYS[old])
    section, name = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", section: {name: value}}))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"algorithm": {"kl": "reference", "kl_coef": 0.1}}))
    with caplog.at_level(logging.WARNING, logger="real_megatron.config"):
        from_file = load_config(path)
        from_override = load_config(
            None,
            [
                f"{old}={yaml.safe_dump(value, default_flow_style=True).split()[0]}",
                "algorithm.kl=reference",
                "algorithm.kl_coef=0.1",
            ],
        )
    assert key_value(from_file, new) == value and key_value(from_override, new) == value
    told = [r.getMessage() for r in caplog.records if old in r.getMessage()]
    assert told == [f"config key {old} is now {new}; the old name still works"], told  # once, naming the new key
    saved = save_config(from_file, tmp_path / "run" / "config.yaml")
    written = yaml.safe_load(saved.read_text())
    assert name not in written[section] and written[new.split(".")[0]][new.split(".")[1]] == value
    assert config_to_dict(load_config(saved)) == config_to_dict(from_file)


def test_an_override_by_the_old_name_beats_the_file_by_the_new_one(tmp_path):
    path = tmp_path / "new.yaml"
    path.write_text(yaml.safe_dump({"actor": {"prompts_per_micro_batch": 4}}))
    assert load_config(path, ["train.prompts_per_micro_batch=2"]).actor.prompts_per_micro_batch == 2
    assert load_config(path, []).actor.prompts_per_micro_batch == 4


def test_a_base_by_the_old_name_and_a_child_by_the_new_one_merge(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"train": {"prompts_per_micro_batch": 2, "steps": 7}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "actor": {"prompts_per_micro_batch": 4}}))
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.actor.prompts_per_micro_batch == 4 and cfg.train.steps == 7  # the child's key wins, as any key


def test_both_names_in_one_file_are_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump({"train": {"pack_sequences": False}, "actor": {"pack_sequences": True}}))
    with pytest.raises(ConfigError, match="'train.pack_sequences' and 'actor.pack_sequences' are the same key"):
        load_config(path)


def test_every_moved_key_has_a_home_and_no_old_name_is_still_a_key():
    sections = config_to_dict(load_config(None))
    for old, new in MOVED_KEYS.items():
        (o_section, o_name), (n_section, n_name) = old.split("."), new.split(".")
        assert n_name in sections[n_section] and o_name not in sections[o_section], (old, new)
