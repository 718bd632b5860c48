"""Named points where a crash-consistency test kills the trainer with SIGKILL, deterministically.

`REAL_MEGATRON_KILL_AT=<point>:<step>` (one point, e.g. `checkpoint_shards:4`) makes the process
that reaches that point at that step send itself SIGKILL: no handler, no flush, no cleanup, exactly
what `kill -9` or an out-of-memory kill does. Unset (always, outside tests), each point is a dict
lookup. The points are listed where they sit: train.py (the loop) and actor/checkpoint.py.
"""

from __future__ import annotations

import os
import signal

ENV = "REAL_MEGATRON_KILL_AT"


def kill_point(name: str, step: int) -> None:
    if os.environ.get(ENV) == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
