"""What a multi-turn environment is, and how a run finds the one its config names.

An environment is a class; the run makes one instance per trajectory:

    class MyEnv:
        def __init__(self, **environment_args): ...
        def reset(self, example: dict) -> list[dict]:
            # example: the data row, {"prompt", "ground_truth", "data_source", "extra_info"}
            # returns the conversation's first chat messages ({"role": ..., "content": ...})
        def step(self, reply_text: str) -> tuple[list[dict], bool, float | None]:
            # reply_text: the model's turn, decoded (for reading only: the tokens trained on are
            # the sampled ones, never this text re-encoded)
            # returns (the messages that follow it, done, reward); reward None: the run's verifier
            # labels the final answer (the model's last turn) against the row's ground truth
        def tools(self) -> list[dict]:        # optional: JSON schemas offered through the chat
            ...                               # template's `tools=` argument
        def close(self) -> None: ...          # optional: called once the trajectory ends

`reset` and `step` may be `async def`. `rollout.environment: my_pkg.envs:MyEnv` names the class
(with `rollout.environment_args` passed to its constructor); `rollout.tools: [python, ...]` without
an environment means `real_megatron.agents.tool_env:ToolEnvironment` with the tools and the tool
settings as its arguments (tool_env.py).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from ..import_path import import_object

TOOL_ENVIRONMENT = "real_megatron.agents.tool_env:ToolEnvironment"


class Environment(Protocol):
    def reset(self, example: dict) -> list[dict]: ...

    def step(self, reply_text: str) -> tuple[list[dict], bool, Optional[float]]: ...


@dataclass
class StepResult:
    """What one `step` returned, checked."""

    messages: list[dict]
    done: bool
    reward: Optional[float]


def load_environment_factory(spec: str, args: Optional[dict] = None, key: str = "rollout.environment") -> Callable:
    """`module.path:ClassName` -> a function that makes one environment (with `args`) per call.
    `key` names the config key in errors."""
    cls = import_object(spec, who=f"{key}={spec!r}", what="class or callable", form="module.path:ClassName")
    attr = spec.partition(":")[2]
    for method in ("reset", "step"):
        if isinstance(cls, type) and not callable(getattr(cls, method, None)):
            raise ValueError(
                f"{key}={spec!r}: {attr} has no {method}() method (see real_megatron/agents/environment.py)"
            )
    args = dict(args or {})

    def make():
        try:
            return cls(**args)
        except TypeError as exc:
            raise ValueError(f"{key}={spec!r} with rollout.environment_args {sorted(args)}: {exc}") from exc

    make.spec = spec  # type: ignore[attr-defined]
    return make


def environment_spec(rollout) -> tuple[Optional[str], dict]:
    """(the environment's import path, its constructor arguments) for a `rollout` section: the
    named environment, the tool environment when only tools are named, or (None, {}) for a
    single-turn run."""
    if rollout.environment:
        return rollout.environment, dict(rollout.environment_args)
    if rollout.tools:
        return TOOL_ENVIRONMENT, {"tools": list(rollout.tools), **tool_settings(rollout)}
    return None, {}


def tool_settings(rollout) -> dict:
    """The tool environment's settings from the `rollout` section (the keys starting `tool_` or
    `sandbox_`), as keyword arguments of ToolEnvironment."""
    if callable(own := getattr(rollout, "tool_settings", None)):
        return own()
    return {
        name: getattr(rollout, name)
        for name in vars(rollout)
        if name.startswith(("tool_", "sandbox_")) and name != "tools"
    }


class EnvironmentHandle:
    """One trajectory's environment, called the same whether its methods are plain or `async def`
    (those run on an event loop of the handle's own, kept for the trajectory: an environment may
    hold async resources from one turn to the next). Results are checked, errors name the class."""

    def __init__(self, env):
        self.env = env
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    @property
    def name(self) -> str:
        return type(self.env).__name__

    def _run(self, value: Any) -> Any:
        if not inspect.isawaitable(value):
            return value
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(_await(value))

    def reset(self, example: dict) -> list[dict]:
        messages = self._run(self.env.reset(example))
        _check_messages(messages, self.name, "reset")
        if not messages:
            raise ValueError(f"{self.name}.reset() returned no messages: the conversation needs a first turn")
        return list(messages)

    def step(self, reply_text: str) -> StepResult:
        out = self._run(self.env.step(reply_text))
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise ValueError(f"{self.name}.step() must return (messages, done, reward), got {out!r:.200}")
        messages, done, reward = out
        messages = list(messages or [])
        _check_messages(messages, self.name, "step")
        return StepResult(messages, bool(done), None if reward is None else float(reward))

    def tools(self) -> Optional[list[dict]]:
        fn = getattr(self.env, "tools", None)
        schemas = self._run(fn()) if callable(fn) else None
        return list(schemas) if schemas else None

    def close(self) -> None:
        try:
            fn = getattr(self.env, "close", None)
            if callable(fn):
                self._run(fn())
        finally:
            if self._loop is not None:
                self._loop.close()
                self._loop = None


async def _await(value):
    return await value


def _check_messages(messages, name: str, method: str) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"{name}.{method}() must return a list of chat messages, got {type(messages).__name__}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"{name}.{method}() returned {m!r:.200}: each message is a dict with a 'role'")
