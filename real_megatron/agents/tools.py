"""Tools by name: `python` (the sandboxed interpreter, built in) or `module.path:function`, each
offered to the model with a JSON schema made from the function's signature and docstring.

    def lookup(word: str, limit: int = 3) -> str:
        '''Looks a word up in the dictionary.

        Args:
            word: the word to look up
            limit: how many senses to return
        '''

becomes {"type": "function", "function": {"name": "lookup", "description": "Looks a word up in the
dictionary.", "parameters": {"type": "object", "properties": {"word": {"type": "string",
"description": "the word to look up"}, "limit": {"type": "integer", "description": ..., "default": 3}},
"required": ["word"]}}}, the form chat templates take as `tools=`. Annotations map to JSON types
(str, int, float, bool, list[...], dict, Optional[...], Literal[...]); parameter descriptions come
from a Google-style `Args:` section or `:param name:` lines. A function may be `async def`.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from ..import_path import import_object

PYTHON = "python"
PYTHON_SCHEMA = {
    "type": "function",
    "function": {
        "name": PYTHON,
        "description": (
            "Runs Python code in a sandboxed interpreter and returns what it prints, or the value of the "
            "last expression. Variables persist between calls of one conversation. No network, no files "
            "outside the working directory; numpy and sympy may be imported when installed."
        ),
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "the Python code to run"}},
            "required": ["code"],
        },
    },
}

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


@dataclass
class Tool:
    name: str
    schema: dict  # {"type": "function", "function": {...}}
    fn: Optional[Callable] = None  # None for the built-in python tool (run by the environment's sandbox)

    @property
    def builtin(self) -> bool:
        return self.fn is None


def json_type(annotation: Any) -> dict:
    """The JSON schema of a parameter annotation ({} where it says nothing usable)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        schema = {"enum": list(args)}
        kinds = {_JSON_TYPES.get(type(a)) for a in args}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
        return schema
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return json_type(rest[0]) if len(rest) == 1 else {"anyOf": [json_type(a) for a in rest]}
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple, set):
        schema = {"type": "array"}
        if args and args[-1] is not Ellipsis:
            schema["items"] = json_type(args[0])
        return schema
    if origin is dict or annotation is dict:
        return {"type": "object"}
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    return {}


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(the description: the docstring before its parameter section, the parameters' descriptions)."""
    doc = inspect.cleandoc(doc or "")
    params: dict[str, str] = {}
    for name, text in re.findall(r"^\s*:param\s+(?:\w+\s+)?(\w+):\s*(.+)$", doc, re.M):
        params[name] = text.strip()
    lines, description, section = doc.splitlines(), [], None
    for line in lines:
        stripped = line.strip()
        if re.match(r"^(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?):\s*$", stripped):
            section = stripped.rstrip(":")
            continue
        if stripped.startswith(":param") or stripped.startswith(":return"):
            section = "rst"
            continue
        if section is None:
            description.append(line)
        elif section in ("Args", "Arguments", "Parameters"):
            match = re.match(r"^\s+(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
            if match:
                params[match.group(1)] = match.group(2).strip()
                last = match.group(1)
            elif stripped and params and line.startswith((" ", "\t")):
                params[last] += " " + stripped
    return "\n".join(description).strip(), params


def function_schema(fn: Callable, name: Optional[str] = None) -> dict:
    """The tool schema of `fn` (see the module docstring); a ValueError for *args or **kwargs."""
    name = name or fn.__name__
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to what the signature holds
        hints = {}
    description, docs = _docstring_parts(fn.__doc__ or "")
    properties, required = {}, []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"tool {name}: *{param.name} cannot be described to the model; name each parameter")
        schema = json_type(hints.get(param.name, param.annotation))
        if param.name in docs:
            schema["description"] = docs[param.name]
        if param.default is param.empty:
            required.append(param.name)
        elif param.default is None or isinstance(param.default, (str, int, float, bool, list, dict)):
            schema["default"] = param.default
        properties[param.name] = schema
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description or name,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def load_tool(spec: str, key: str = "rollout.tools") -> Tool:
    """`python`, or `module.path:function` (imported, its schema made); errors name the key."""
    if spec == PYTHON:
        return Tool(PYTHON, PYTHON_SCHEMA)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{key}: {spec!r} is neither 'python' nor of the form module.path:function")
    fn = import_object(spec, who=f"{key}: {spec!r}", what="function")
    try:
        return Tool(attr, function_schema(fn, attr), fn)
    except ValueError as exc:
        raise ValueError(f"{key}: {spec!r}: {exc}") from exc


def load_tools(specs: list[str], key: str = "rollout.tools") -> dict[str, Tool]:
    """The tools of `specs` by name, in order; two tools of one name are an error."""
    tools: dict[str, Tool] = {}
    for spec in specs:
        tool = load_tool(spec, key)
        if tool.name in tools:
            raise ValueError(f"{key}: two tools are named {tool.name!r}")
        tools[tool.name] = tool
    return tools
