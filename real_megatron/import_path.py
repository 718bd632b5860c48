"""`module.path:name` strings, as configs name users' code (reward functions, tools, environments)."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(spec: str, *, who: str, what: str = "callable", form: str = "module.path:function") -> Any:
    """The callable `name` of `module.path`; errors start with `who` (the key and its value) and say
    what was expected (`form`, and `what` the name should be)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{who}: expected the form {form}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{who}: cannot import {module_name!r} ({exc})") from exc
    found = getattr(module, attr, None)
    if found is None or not callable(found):
        raise ValueError(f"{who}: {module_name!r} has no {what} {attr!r}")
    return found
