"""Phases that only rank 0 runs (generation, evaluation, a task's warm-start, starting servers,
loading weights into them), with the other ranks waiting for them without a collective deadline.

A collective's deadline (`parallel.timeout_s`) must stay short enough to catch a hang inside the
training step, yet a baseline evaluation at the paper's scale takes far longer. So ranks > 0 do
not wait in a collective: they poll the job's rendezvous store for the phase's end, and give up
only when rank 0 stops showing signs of life. Rank 0 runs a heartbeat thread that bumps a counter
in the store every few seconds; a waiting rank fails when the counter has not moved for
`timeout_s` (rank 0 frozen, killed, out of memory, its node gone) or the store is unreachable,
with an error naming the phase and rank 0. A phase that raises on rank 0 is reported to the
waiting ranks too. Once rank 0 is done, everyone meets in one collective to share the result.

Rank 0's own waits (HTTP requests, server start) carry their own deadlines, so a phase whose main
thread hangs on the network still ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from .errors import UserError

log = logging.getLogger(__name__)
PREFIX = "real_megatron/"
BEAT_KEY = PREFIX + "rank0_heartbeat"


class _Heartbeat(threading.Thread):
    def __init__(self, store, interval_s: float):
        super().__init__(name="rank0-heartbeat", daemon=True)
        self.store, self.interval_s = store, interval_s
        self.phase, self.count = "startup", 0
        self.stopped = threading.Event()
        self.beat()

    def beat(self) -> None:
        self.count += 1
        self.store.set(BEAT_KEY, f"{self.count} {self.phase}")

    def run(self) -> None:
        failures = 0
        while not self.stopped.wait(self.interval_s):
            try:
                self.beat()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a blip is retried; a store gone for good ends it
                failures += 1
                if failures == 1:
                    log.warning("rank 0 heartbeat: the rendezvous store did not answer (%s); retrying", exc)
                if failures >= 10:
                    return


class Rank0Failed(RuntimeError):
    """On a rank > 0: rank 0 failed in a phase. user_error: with a mistake of the user's (a
    UserError: a reward function that raised, a bad row), which rank 0 reports as one line."""

    def __init__(self, message: str, user_error: bool):
        super().__init__(message)
        self.user_error = user_error


_heartbeat: _Heartbeat | None = None
_phase_number = 0


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _multi_rank() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def start_heartbeat(timeout_s: float) -> None:
    """On rank 0, after the process group exists: beat often enough for `timeout_s`."""
    global _heartbeat
    if not _multi_rank() or dist.get_rank() != 0 or _heartbeat is not None:
        return
    _heartbeat = _Heartbeat(_store(), interval_s=max(0.2, min(5.0, timeout_s / 5)))
    _heartbeat.start()


def stop_heartbeat() -> None:
    global _heartbeat, _phase_number
    if _heartbeat is not None:
        _heartbeat.stopped.set()
        _heartbeat.join(timeout=10)
    _heartbeat, _phase_number = None, 0


def on_rank0(phase: str, fn: Callable[[], Any], *, timeout_s: float, share: bool = True) -> Any:
    """Run `fn` on rank 0 while the other ranks wait (see above); every rank must call this, in the
    same order. share: broadcast rank 0's result to every rank (else the others get None)."""
    global _phase_number
    if not _multi_rank():
        return fn()
    _phase_number += 1
    done_key = f"{PREFIX}phase{_phase_number}"
    store = _store()
    if dist.get_rank() == 0:
        if _heartbeat is not None:
            _heartbeat.phase = phase
        try:
            result = fn()
        except BaseException as exc:
            user = "user " if isinstance(exc, UserError) else ""
            store.set(done_key, f"failed {user}{type(exc).__name__}: {exc}"[:1000])
            _linger_until_read(store, done_key, min(timeout_s, 60.0))  # the store dies with this process
            raise
        finally:
            if _heartbeat is not None:
                _heartbeat.phase = f"after {phase}"
        store.set(done_key, "done")
    else:
        _wait_for_rank0(store, done_key, phase, timeout_s)
        result = None
    if share:
        holder = [result]
        dist.broadcast_object_list(holder, src=0)
        result = holder[0]
    return result


def _linger_until_read(store, done_key: str, limit_s: float) -> None:
    """Keep rank 0 (and the store it hosts) up until every waiting rank has read its failure."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if store.add(done_key + "/read", 0) >= dist.get_world_size() - 1:
                return
        except Exception:  # noqa: BLE001
            return
        time.sleep(0.1)


def _wait_for_rank0(store, done_key: str, phase: str, timeout_s: float) -> None:
    """Poll the store from a helper thread, judge from this one: the store's server runs inside
    rank 0 (Slurm/env:// rendezvous), so a frozen rank 0 leaves store calls blocked, not failing."""
    me = dist.get_rank()
    poll_s = max(0.05, min(1.0, timeout_s / 20))
    seen: dict = {"status": None, "beat": None, "error": None}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                status = store.get(done_key).decode() if store.check([done_key]) else None
                seen["beat"] = store.get(BEAT_KEY).decode() if store.check([BEAT_KEY]) else None
            except Exception as exc:  # noqa: BLE001 - reported by the waiting thread
                seen["error"] = exc
                return
            seen["status"] = status
            if status is not None:
                return
            stop.wait(poll_s)

    threading.Thread(target=poll, name="rank0-phase-poll", daemon=True).start()
    start = last_change = time.monotonic()
    last_beat = None
    try:
        while True:
            time.sleep(poll_s)
            status, beat, error = seen["status"], seen["beat"], seen["error"]
            if status == "done":
                return
            if status is not None:
                try:
                    store.add(done_key + "/read", 1)
                except Exception:  # noqa: BLE001 - rank 0 is gone already; the reason is known
                    pass
                reason = status.removeprefix("failed ")
                raise Rank0Failed(
                    f"rank {me}: rank 0 failed in phase '{phase}': {reason.removeprefix('user ')}",
                    user_error=reason.startswith("user "),
                )
            if error is not None:
                raise RuntimeError(
                    f"rank {me} lost contact with rank 0 while waiting for its phase '{phase}' after "
                    f"{time.monotonic() - start:.0f}s (rank 0 or its node is gone?): {error}"
                )
            now = time.monotonic()
            if beat != last_beat:
                last_beat, last_change = beat, now
            elif now - last_change > timeout_s:
                raise TimeoutError(
                    f"rank {me} waited {now - start:.0f}s for rank 0 in phase '{phase}': no heartbeat from rank 0 "
                    f"for {timeout_s:.0f}s (parallel.timeout_s; its last: '{beat}'): rank 0 is hung or gone"
                )
    finally:
        stop.set()
