"""Reward worker processes: jobs in, scores out, each job under its own deadline.

The workers run verifier_worker.py (math-verify, or a reward function named by import path). A job
starts when a worker is free and has `timeout_s` from then: a job that hangs is killed with its
worker (it scores 0.0, logged, and a new worker takes its place) while the other workers go on
with the rest, so one hanging answer costs one deadline of one worker, not a round of all of them.
A worker that dies is replaced and its job tried once more.

The workers are plain subprocesses, not multiprocessing children, so nothing of the caller's main
module is re-imported: a script without a __main__ guard, a notebook and threads all work. A
process forked from one that holds a pool starts its own workers.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

WORKER_SCRIPT = str(Path(__file__).with_name("verifier_worker.py"))
TIMED_OUT = object()  # a job's reply when its deadline passed


def encode(obj) -> bytes:
    return base64.b64encode(pickle.dumps(obj)) + b"\n"


def decode(line: bytes):
    return pickle.loads(base64.b64decode(line))


def _boot(fn: str | None) -> str:
    """The worker's command line. The math worker runs without the current or the script's
    directory on sys.path (this folder holds a math.py); a reward function's worker gets the
    caller's sys.path, so it imports what the caller can."""
    if fn is None:
        path = "sys.path = [p for p in sys.path if p not in ('', '.')]"
    else:
        paths = [os.path.abspath(p or ".") for p in sys.path if Path(p or ".").resolve() != Path(WORKER_SCRIPT).parent]
        path = f"sys.path = {paths!r}"
    return f"import runpy, sys; {path}; sys.argv = ['verifier_worker', {str(fn)!r}]; runpy.run_path({WORKER_SCRIPT!r}, run_name='__main__')"


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, fn: str | None, startup_timeout_s: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _boot(fn)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self._buffer = b""
        self._fn, self._startup_timeout_s = fn, startup_timeout_s

    def wait_ready(self) -> None:
        reply = self.read(self._startup_timeout_s)
        if not isinstance(reply, dict) or not reply.get("ready"):
            self.kill()
            what = f"the reward function {self._fn}" if self._fn else "math-verify"
            detail = reply.get("error") if isinstance(reply, dict) else None
            raise RuntimeError(
                f"the reward worker ({sys.executable} {WORKER_SCRIPT}) did not start within "
                f"{self._startup_timeout_s:.0f}s: " + (detail or f"is {what} importable in this environment?")
            )

    def send(self, job) -> bool:
        try:
            self.proc.stdin.write(encode(job))
            return True
        except (BrokenPipeError, OSError):
            return False

    def has_reply(self) -> bool:
        return b"\n" in self._buffer

    def read(self, timeout_s: float):
        """The next reply; None on timeout; "dead" if the process ended."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = max(0.0, deadline - time.monotonic())  # 0: look once, do not wait
            if not select.select([self.proc.stdout], [], [], remaining)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return "dead"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return decode(line)
        except Exception:  # noqa: BLE001 - a garbled line: the worker printed something of its own
            return self.read(max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the worker ends at end of input
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.proc.stdout.close()


class WorkerPool:
    """`workers` processes answering jobs for math-verify (fn=None) or the reward function `fn`
    ("module:function"), each job under its own deadline."""

    def __init__(self, workers: int = 1, startup_timeout_s: float = 120.0, fn: str | None = None):
        self._size, self._startup_timeout_s, self.fn = max(1, workers), startup_timeout_s, fn
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _ready_workers(self) -> list[_Worker]:
        if self._pid != os.getpid():  # forked: the parent's pipes are not ours to use
            self._workers, self._pid = [], os.getpid()
        fresh = [_Worker(self.fn, self._startup_timeout_s) for _ in range(self._size - len(self._workers))]
        for worker in fresh:  # started together, each importing its libraries
            worker.wait_ready()
        self._workers += fresh
        return self._workers

    def _replace(self, index: int) -> None:
        self._workers[index].kill()
        self._workers[index] = _Worker(self.fn, self._startup_timeout_s)
        self._workers[index].wait_ready()

    def run(self, jobs: Sequence, timeout_s: float) -> list:
        """Each job's reply (a dict from the worker), TIMED_OUT, or None for a job that is None;
        every worker busy while jobs wait, each job with timeout_s from its start."""
        with self._lock:
            workers = self._ready_workers()
            replies: list = [None] * len(jobs)
            queue = deque((i, 1) for i, job in enumerate(jobs) if job is not None)  # (job, retries left)
            busy: dict[int, tuple[int, int, float]] = {}  # worker -> (job, retries, deadline)
            while queue or busy:
                for w in range(len(workers)):
                    if w not in busy and queue:
                        i, retries = queue.popleft()
                        if workers[w].send(jobs[i]):
                            busy[w] = (i, retries, time.monotonic() + timeout_s)
                        else:
                            self._died(w, i, retries, queue)
                if not busy:
                    continue
                waiting = [w for w in busy if not workers[w].has_reply()]
                if len(waiting) == len(busy):
                    wait = max(0.0, min(deadline for _, _, deadline in busy.values()) - time.monotonic())
                    select.select([workers[w].proc.stdout for w in waiting], [], [], wait)
                for w, (i, retries, deadline) in list(busy.items()):
                    reply = workers[w].read(0.0)
                    if reply == "dead":
                        del busy[w]
                        self._died(w, i, retries, queue)
                    elif reply is not None:
                        del busy[w]
                        replies[i] = reply
                    elif time.monotonic() >= deadline:
                        del busy[w]
                        replies[i] = TIMED_OUT
                        self._replace(w)
            return replies

    def _died(self, w: int, i: int, retries: int, queue: deque) -> None:
        log.warning("a reward worker died (exit code %s); replaced", self._workers[w].proc.poll())
        self._replace(w)
        if retries:
            queue.append((i, retries - 1))

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for worker in self._workers:
                    worker.close()
            self._workers = []
