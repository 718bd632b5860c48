"""The data's settings: the `data` section (prompt files, their keys, the reward function, its
deadline and what it may return) and its defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
    # the math verifier reads the answer after </think> only: a response without it (reasoning cut
    # off by the token limit) scores 0; for R1-style models, whose responses are a think block
    require_think_close: bool = False
    # a reward function's score >= threshold is label 1, else 0 (REAL takes 0/1 labels only)
    reward_threshold: Optional[float] = None

    def check(self) -> list[str]:
        errors = []
        if self.max_prompt_tokens <= 0:
            errors.append(
                f"data.max_prompt_tokens must be > 0 (prompts longer are dropped), got {self.max_prompt_tokens}"
            )
        if self.verifier_timeout_s <= 0:
            errors.append(f"data.verifier_timeout_s must be > 0, got {self.verifier_timeout_s}")
        module, sep, function = self.reward_fn.partition(":")
        if not (sep and module and function):
            errors.append(f"data.reward_fn={self.reward_fn!r}: expected the form module.path:function")
        return errors
