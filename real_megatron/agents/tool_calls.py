"""Tool calls in a model's reply, in the format of Qwen2.5's and Qwen3's chat templates (and of
Hermes-style templates generally):

    <tool_call>
    {"name": "python", "arguments": {"code": "print(2**10)"}}
    </tool_call>

A reply may hold several calls. Calls inside a `<think>...</think>` block are drafts and are not
run. A call whose JSON cannot be read, that names no tool, or whose arguments are not an object
comes back with `error` set: the environment answers it with an error message, never raises. A
last call without its closing tag is run if its JSON is complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S)


@dataclass
class ToolCall:
    name: Optional[str]
    arguments: dict = field(default_factory=dict)
    error: Optional[str] = None  # why the call could not be read (then name/arguments may be empty)
    text: str = ""  # the call as written, for error messages


def parse_tool_calls(reply: str) -> list[ToolCall]:
    """Every `<tool_call>` of `reply` outside its thinking, in order."""
    reply = _THINK.sub("", reply)
    calls, at = [], 0
    while True:
        start = reply.find(OPEN, at)
        if start < 0:
            return calls
        end = reply.find(CLOSE, start + len(OPEN))
        if end < 0:
            body = reply[start + len(OPEN) :]
            calls.append(_parse_one(body, unclosed=True))
            return calls
        calls.append(_parse_one(reply[start + len(OPEN) : end]))
        at = end + len(CLOSE)


def _parse_one(body: str, unclosed: bool = False) -> ToolCall:
    text = body.strip()
    try:
        data = json.loads(text)
    except ValueError as exc:
        why = f"the call is not valid JSON ({exc})"
        if unclosed:
            why = f"the call has no closing {CLOSE} and " + why
        return ToolCall(None, error=why, text=text)
    if not isinstance(data, dict):
        return ToolCall(None, error='a call is a JSON object {"name": ..., "arguments": {...}}', text=text)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall(None, error='the call names no tool ("name")', text=text)
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return ToolCall(name, error=f"the arguments of {name} are not a JSON object", text=text)
    return ToolCall(name, arguments, text=text)


def tool_message(name: Optional[str], content: str) -> dict:
    """A tool's result as the chat message that follows the model's turn."""
    message = {"role": "tool", "content": content}
    if name:
        message["name"] = name
    return message
