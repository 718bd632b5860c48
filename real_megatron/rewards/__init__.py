"""Rewards: the math verifier, and custom reward functions named by import path."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..data.settings import DataConfig
from .math import extract_answer, math_reward, math_rewards

RewardFn = Callable[..., float]


def load_reward_fn(path: str) -> RewardFn:
    """`module:function` -> the function; same signature as math_reward(response, ground_truth, ...)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {path!r}: expected the form module.path:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {path!r}: cannot import {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {path!r}: {module_name!r} has no callable {attr!r}")
    return fn


def score_responses(
    fn: RewardFn, texts: list[str], truths: list, timeout_s: float = DataConfig.verifier_timeout_s
) -> list[float]:
    """fn over (response, ground truth) pairs; the math verifier scores all of them in parallel."""
    if fn is math_reward:
        return math_rewards(texts, truths, timeout_s=timeout_s)  # every verifier worker at once
    return [float(fn(text, truth)) for text, truth in zip(texts, truths)]


def score_groups(
    groups, examples, tokenizer, reward_fn, timeout_s: float = DataConfig.verifier_timeout_s
) -> list[float]:
    """The verifier's label of every sample of every group (groups[i] answers examples[i]), flat."""
    texts = [tokenizer.decode(s.output_ids, skip_special_tokens=True) for g in groups for s in g]
    truths = [ex.ground_truth for ex, g in zip(examples, groups) for _ in g]
    return score_responses(reward_fn, texts, truths, timeout_s)


__all__ = ["extract_answer", "load_reward_fn", "math_reward", "math_rewards", "score_groups", "score_responses"]
