"""Rewards: the math verifier, and reward functions of your own named by import path.

A reward function named by `data.reward_fn` ("module:function") is called one of two ways, told
apart by its signature:
- `fn(response, ground_truth)`, as the math verifier is;
- verl's `compute_score(data_source, solution_str, ground_truth, extra_info)` (extra_info only if
  it takes it), with the row's `data_source` and `extra_info`.
The ground truth reaches it as the data file holds it (a string, a number, a list, a dict). It runs
in worker processes (pool.py) with the verifier's deadline per response (`data.verifier_timeout_s`:
past it, the response scores 0, logged); one that raises stops the run with the function, the row
and the error named. It returns a number (or verl's dict with a "score"); REAL takes 0/1 labels
only: another value is refused at the first batch, unless `data.reward_threshold` turns scores into
labels (score >= threshold is 1).
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import isfinite, nan
from typing import Literal

from ..data.settings import DataConfig
from ..errors import UserError
from ..import_path import import_object
from .answers import extract_answer
from .math import math_reward, math_rewards
from .pool import TIMED_OUT, WorkerPool

log = logging.getLogger(__name__)

RewardFn = Callable[..., float]


class RewardError(UserError):
    """A reward function's failure that must stop the run (it raised, or returned what cannot be a label)."""

    kind = "reward error"


def call_style(fn: Callable) -> Literal["plain", "verl"]:
    """ "verl" for compute_score(data_source, solution_str, ground_truth, extra_info), else "plain"."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "plain"
    return "verl" if "solution_str" in params or (params and params[0] == "data_source") else "plain"


def _call(fn: Callable, style: str, response: str, truth, data_source: str, extra_info) -> tuple[tuple, dict]:
    """The (args, kwargs) of one call of fn."""
    if style == "plain":
        return (response, truth), {}
    kwargs = {"data_source": data_source, "solution_str": response, "ground_truth": truth}
    params = inspect.signature(fn).parameters
    if "extra_info" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs["extra_info"] = extra_info
    return (), kwargs


_pools: dict[str, WorkerPool] = {}


def _pool_for(path: str) -> WorkerPool:
    if path not in _pools:
        _pools[path] = WorkerPool(workers=max(1, min(4, os.cpu_count() or 1)), fn=path)
        atexit.register(_pools[path].close)
    return _pools[path]


@dataclass
class Reward:
    """The run's reward: the function, how it is called, where it runs, and what it may return.
    `labels`: the objective takes 0/1 labels (REAL); `threshold`: score >= threshold is 1, else 0."""

    fn: Callable
    path: str = ""  # module:function; a user's function named so runs in worker processes
    threshold: float | None = None
    labels: bool = False
    require_think_close: bool = False
    style: str = field(init=False)

    def __post_init__(self):
        self.style = call_style(self.fn)

    @property
    def name(self) -> str:
        return self.path or getattr(self.fn, "__qualname__", repr(self.fn))

    def __call__(self, response: str, ground_truth, timeout_s: float = DataConfig.verifier_timeout_s) -> float:
        return self.score([response], [ground_truth], timeout_s=timeout_s)[0]

    def score(
        self,
        texts: Sequence[str],
        truths: Sequence,
        *,
        data_sources: Sequence[str] | None = None,
        extra_infos: Sequence | None = None,
        sources: Sequence[str] | None = None,
        timeout_s: float = DataConfig.verifier_timeout_s,
    ) -> list[float]:
        n = len(texts)
        data_sources = data_sources or [""] * n
        extra_infos = extra_infos or [None] * n
        sources = sources or [f"response {i}" for i in range(n)]
        if self.fn is math_reward:
            return math_rewards(texts, truths, require_think_close=self.require_think_close, timeout_s=timeout_s)
        calls = [_call(self.fn, self.style, *row) for row in zip(texts, truths, data_sources, extra_infos)]
        if self.path and not (getattr(self.fn, "__module__", None) or "").startswith("real_megatron."):
            replies = _pool_for(self.path).run(calls, timeout_s)
        else:  # the package's own (a task's exact match) and functions without an import path run here
            replies = []
            for args, kwargs in calls:
                try:
                    replies.append({"value": self.fn(*args, **kwargs)})
                except Exception as exc:  # noqa: BLE001 - named below, with the row
                    replies.append({"error": f"{type(exc).__name__}: {exc}"})
        return [self._label(reply, source, timeout_s) for reply, source in zip(replies, sources)]

    def _label(self, reply, source: str, timeout_s: float) -> float:
        if reply is TIMED_OUT or reply is None:
            log.warning("reward function %s timed out after %.1fs on %s: scored 0", self.name, timeout_s, source)
            return 0.0
        if "error" in reply:
            raise RewardError(
                f"reward function {self.name} raised on {source}: {reply['error']}; it must return a number for "
                "every response (catch what it cannot score and return 0)"
            )
        value = reply["value"]
        if isinstance(value, dict) and "score" in value:  # verl's {"score": ..., "acc": ...}
            value = value["score"]
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = nan
        if not isfinite(number) or isinstance(value, str):
            raise RewardError(
                f"reward function {self.name} returned {value!r} on {source}: expected a finite number "
                "(or verl's dict with a 'score')"
            )
        if self.threshold is not None:
            return 1.0 if number >= self.threshold else 0.0
        if self.labels and number not in (0.0, 1.0):
            raise RewardError(
                f"reward function {self.name} returned {value!r} on {source}: REAL's rewards are class "
                "labels (0 or 1); return 0/1, or set data.reward_threshold to make labels of the scores "
                "(score >= threshold is 1)"
            )
        return number


def load_reward_fn(
    path: str, *, threshold: float | None = None, labels: bool = False, require_think_close: bool = False
) -> Reward:
    """`module:function` -> the Reward that calls it (its signature says how)."""
    fn = import_object(path, who=f"reward function {path!r}")
    if require_think_close and fn is not math_reward:
        raise ValueError(f"data.require_think_close is the math verifier's; {path} reads responses its own way")
    return Reward(fn, path, threshold=threshold, labels=labels, require_think_close=require_think_close)


def score_responses(
    fn: RewardFn | Reward,
    texts: list[str],
    truths: list,
    timeout_s: float = DataConfig.verifier_timeout_s,
    **rows,
) -> list[float]:
    """fn over (response, ground truth) pairs; rows: data_sources, extra_infos, sources (file:row)."""
    reward = fn if isinstance(fn, Reward) else Reward(fn)
    return reward.score(texts, truths, timeout_s=timeout_s, **rows)


def score_groups(
    groups, examples, tokenizer, reward_fn, timeout_s: float = DataConfig.verifier_timeout_s
) -> list[float]:
    """The verifier's label of every sample of every group (groups[i] answers examples[i]), flat."""
    texts = [tokenizer.decode(s.output_ids, skip_special_tokens=True) for g in groups for s in g]
    rows = [ex for ex, g in zip(examples, groups) for _ in g]
    return score_responses(
        reward_fn,
        texts,
        [ex.ground_truth for ex in rows],
        timeout_s,
        data_sources=[ex.data_source for ex in rows],
        extra_infos=[getattr(ex, "extra_info", None) for ex in rows],
        sources=[ex.source for ex in rows],
    )


__all__ = [
    "Reward",
    "RewardError",
    "call_style",
    "extract_answer",
    "load_reward_fn",
    "math_reward",
    "math_rewards",
    "score_groups",
    "score_responses",
]
