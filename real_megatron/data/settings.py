"""The data's settings: the `data` section (prompt files, their keys, the reward function and its
verifier's deadline) and its defaults."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # verl parquet or jsonl
    prompt_key: str = "prompt"
    answer_key: str = "reward_model.ground_truth"
    max_prompt_tokens: int = 1024
    skip_malformed: bool = False  # default: a malformed row is an error naming file and row
    shuffle: bool = True
    reward_fn: str = "real_megatron.rewards:math_reward"  # module:function
    verifier_timeout_s: float = 5.0  # per response, training and evaluation alike (a timeout scores 0)
