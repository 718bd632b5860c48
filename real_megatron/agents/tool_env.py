"""The tool environment: what `rollout.tools: [python, my_pkg.tools:lookup]` runs, one instance per
trajectory.

reset: the data row's prompt (chat messages, or a string as one user message). step: the tool
calls of the model's reply (tool_calls.py) run concurrently, each within `tool_timeout_s`, at most
`tool_max_calls_per_turn` of them; their results come back as `tool` messages, each cut to
`tool_max_result_chars`. A reply without a tool call ends the trajectory with reward None: the
run's verifier labels that final answer. A malformed call, an unknown tool, bad arguments, a tool
that raises or runs past its deadline: an error message to the model, never an exception.

Python calls share the trajectory's interpreter (sandbox.py), so those of one turn run one after
the other, in the order written; the other tools run beside them. A plain function tool runs in
a worker thread: past its deadline the model is told it timed out, but the thread cannot be
stopped and finishes in the background (make long-running tools `async def`, or give them their
own deadline).

`stats` counts per trajectory, read by the rollout loop for the step's metrics: tool_calls (calls
written, malformed ones included), tool_errors (malformed, unknown tool, bad arguments, raised,
timed out, or a python cell that raised) and sandbox_timeouts (python cells stopped by the wall
clock or the CPU limit).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Optional

from .sandbox import LocalSandbox, RemoteSandbox, cut
from .tool_calls import ToolCall, parse_tool_calls, tool_message
from .tools import PYTHON, load_tools


class ToolEnvironment:
    def __init__(
        self,
        tools: list[str],
        tool_timeout_s: float = 10.0,
        tool_max_calls_per_turn: int = 8,
        tool_max_result_chars: int = 4000,
        sandbox_cpu_s: float = 10.0,
        sandbox_memory_mb: int = 1024,
        sandbox_isolation: str = "auto",
        sandbox_url: Optional[str] = None,
    ):
        if not tools:
            raise ValueError("rollout.tools is empty: the tool environment needs at least one tool")
        self.registry = load_tools(list(tools))
        self.timeout_s = tool_timeout_s
        self.max_calls = tool_max_calls_per_turn
        self.max_chars = tool_max_result_chars
        self._sandbox_args = dict(
            cpu_s=sandbox_cpu_s, memory_mb=sandbox_memory_mb, isolation=sandbox_isolation, url=sandbox_url
        )
        self.sandbox = None
        self.stats = {"tool_calls": 0, "tool_errors": 0, "sandbox_timeouts": 0}

    def tools(self) -> list[dict]:
        """The tools' JSON schemas, for the chat template's `tools=`."""
        return [tool.schema for tool in self.registry.values()]

    async def reset(self, example: dict) -> list[dict]:
        self.stats = {"tool_calls": 0, "tool_errors": 0, "sandbox_timeouts": 0}
        prompt = example.get("prompt")
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        if isinstance(prompt, (list, tuple)) and prompt:
            return [dict(m) for m in prompt]
        raise ValueError(f"ToolEnvironment.reset: the row's prompt is neither text nor chat messages: {prompt!r:.200}")

    async def step(self, reply_text: str) -> tuple[list[dict], bool, Optional[float]]:
        calls = parse_tool_calls(reply_text)
        if not calls:
            return [], True, None
        self.stats["tool_calls"] += len(calls)
        jobs = [self._run(call) for call in calls[: self.max_calls]]
        results = list(await asyncio.gather(*jobs))
        for call in calls[self.max_calls :]:
            results.append(self._error(call, f"at most {self.max_calls} tool calls per turn: this one was not run"))
        return [tool_message(name, text) for name, text in results], False, None

    def _cut(self, text: str) -> str:
        return cut(text, self.max_chars)

    def _error(self, call: ToolCall, why: str) -> tuple[Optional[str], str]:
        self.stats["tool_errors"] += 1
        return call.name, f"Error: {why}"

    async def _run(self, call: ToolCall) -> tuple[Optional[str], str]:
        if call.error:
            return self._error(
                call, f'{call.error}. Write a call as <tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>'
            )
        tool = self.registry.get(call.name)
        if tool is None:
            return self._error(call, f"there is no tool {call.name!r}; the tools are {', '.join(self.registry)}")
        if tool.name == PYTHON:
            return await self._python(call)
        signature = inspect.signature(tool.fn)
        unknown = sorted(set(call.arguments) - set(signature.parameters))
        if unknown:
            names = ", ".join(signature.parameters)
            return self._error(
                call, f"{call.name} has no argument {', '.join(map(repr, unknown))} (its arguments: {names})"
            )
        try:
            bound = signature.bind(**call.arguments)
        except TypeError as exc:
            return self._error(call, f"{call.name}: {exc}")
        try:
            if inspect.iscoroutinefunction(tool.fn):
                value = await asyncio.wait_for(tool.fn(*bound.args, **bound.kwargs), self.timeout_s)
            else:
                value = await asyncio.wait_for(asyncio.to_thread(tool.fn, *bound.args, **bound.kwargs), self.timeout_s)
        except TimeoutError:
            return self._error(call, f"{call.name} did not answer within {self.timeout_s:g} s")
        except Exception as exc:  # noqa: BLE001 - a failing tool is the model's error message
            return self._error(call, f"{call.name} raised {type(exc).__name__}: {exc}")
        if not isinstance(value, str):
            try:
                value = json.dumps(value, default=str)
            except (TypeError, ValueError):
                value = str(value)
        return call.name, self._cut(value)

    async def _python(self, call: ToolCall) -> tuple[Optional[str], str]:
        code = call.arguments.get("code")
        if not isinstance(code, str):
            return self._error(call, 'python takes one argument, "code": the Python source to run, as a string')
        if self.sandbox is None:
            args = self._sandbox_args
            if args["url"]:
                self.sandbox = RemoteSandbox(args["url"], self.timeout_s, args["memory_mb"], self.max_chars)
            else:
                self.sandbox = LocalSandbox(
                    self.timeout_s, args["cpu_s"], args["memory_mb"], args["isolation"], self.max_chars
                )
        result = await self.sandbox.run(code)
        if result.timed_out:
            self.stats["sandbox_timeouts"] += 1
        if result.error:
            self.stats["tool_errors"] += 1
        return PYTHON, result.output if result.output else "(no output: print what you want to see)"

    async def close(self) -> None:
        if self.sandbox is not None:
            sandbox, self.sandbox = self.sandbox, None
            await sandbox.close()
