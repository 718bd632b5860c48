"""Tools plugged in by import path in the tool environment's tests (`rollout.tools:
[python, agent_tools:lookup, ...]`)."""

import asyncio
from typing import Literal, Optional

WORDS = {"sandbox": "a box of sand; a place where code cannot harm its host"}


def lookup(
    word: str, limit: int = 1, style: Literal["short", "long"] = "short", tags: Optional[list[str]] = None
) -> str:
    """Looks a word up in the dictionary.

    Args:
        word: the word to look up
        limit: how many senses to return,
            at most
        style: how much to say
        tags: labels to filter by
    """
    if word not in WORDS:
        raise KeyError(f"no entry for {word!r}")
    return WORDS[word]


async def wait(seconds: float) -> dict:
    """Sleeps, then says how long.

    :param seconds: how long to sleep
    """
    await asyncio.sleep(seconds)
    return {"slept": seconds}


def splat(*values):
    """A function the model could not be told how to call."""
