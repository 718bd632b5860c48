"""The math verifier: the last \\boxed{...} of a response against the ground truth, by math-verify.

`math_reward(response, ground_truth)` returns 1.0 or 0.0 and never raises. The answer is cut out
here (linear brace matching, after `</think>` when present); the symbolic comparison runs in a
worker process (verifier_worker.py) with a hard deadline: a parse that hangs (10^10^10^10,
pathological LaTeX) is killed, scores 0.0 and is logged, and the worker is replaced. Callable from
any script (no `if __name__ == "__main__":` needed), a notebook, or several threads.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..data.settings import DataConfig

log = logging.getLogger(__name__)

WORKER_SCRIPT = str(Path(__file__).with_name("verifier_worker.py"))
# run by path, without the current or the script's directory on sys.path (this one holds a math.py)
_BOOT = (
    "import runpy, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
    f"runpy.run_path({WORKER_SCRIPT!r}, run_name='__main__')"
)
THINK_CLOSE = "</think>"
MAX_ANSWER_CHARS = 1000  # a longer "answer" is not a final answer; math-verify need not see it


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) in text, braces matched; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced


def extract_answer(response: str, require_think_close: bool = False) -> str | None:
    if THINK_CLOSE in response:
        response = response.rsplit(THINK_CLOSE, 1)[1]
    elif require_think_close:
        return None
    answer = last_boxed(response)
    if answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def _truths(ground_truth) -> list[str]:
    if isinstance(ground_truth, (list, tuple)) or type(ground_truth).__name__ == "ndarray":
        return [str(g) for g in ground_truth]
    return [str(ground_truth)]


class _Worker:
    """One verifier process (verifier_worker.py, started by path with this Python) and its pipes."""

    def __init__(self, startup_timeout_s: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self._buffer = b""
        self._startup_timeout_s = startup_timeout_s

    def wait_ready(self) -> None:
        if self.read(self._startup_timeout_s) != {"ready": True}:
            self.kill()
            raise RuntimeError(
                f"the math verifier worker ({sys.executable} {WORKER_SCRIPT}) did not start within "
                f"{self._startup_timeout_s:.0f}s; is math-verify installed in this environment?"
            )

    def send(self, job) -> bool:
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            return True
        except (BrokenPipeError, OSError):
            return False

    def read(self, timeout_s: float):
        """The next reply; None on timeout; "dead" if the process ended."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.proc.stdout], [], [], remaining)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return "dead"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

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


class VerifierPool:
    """Worker processes answering (answer, truths) jobs, each under a hard deadline. A worker that
    hangs is killed (its job scores 0.0); one that dies is replaced and its job tried once more.
    The workers are plain subprocesses, not multiprocessing children, so nothing of the caller's
    main module is re-imported: a script without a __main__ guard, a notebook and threads all work.
    A process forked from one that holds a pool starts its own workers."""

    def __init__(self, workers: int = 1, startup_timeout_s: float = 120.0):
        self._size, self._startup_timeout_s = max(1, workers), startup_timeout_s
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _ready_workers(self) -> list[_Worker]:
        if self._pid != os.getpid():  # forked: the parent's pipes are not ours to use
            self._workers, self._pid = [], os.getpid()
        fresh = [_Worker(self._startup_timeout_s) for _ in range(self._size - len(self._workers))]
        for worker in fresh:  # started together, each importing math-verify
            worker.wait_ready()
        self._workers += fresh
        return self._workers

    def _replace(self, index: int) -> None:
        self._workers[index].kill()
        self._workers[index] = _Worker(self._startup_timeout_s)
        self._workers[index].wait_ready()

    def score_many(self, jobs: Sequence[tuple[str, list[str]] | None], timeout_s: float) -> list[float]:
        """Scores for jobs (None = no answer = 0.0), using every worker at once."""
        with self._lock:
            workers = self._ready_workers()
            scores = [0.0] * len(jobs)
            pending = [(i, 1) for i, job in enumerate(jobs) if job is not None]  # (job, retries left)
            while pending:
                batch, pending = pending[: len(workers)], pending[len(workers) :]
                sent = [workers[w].send(jobs[i]) for w, (i, _) in enumerate(batch)]
                for w, ((i, retries), ok) in enumerate(zip(batch, sent)):
                    reply = workers[w].read(timeout_s) if ok else "dead"
                    if reply is None:
                        log.warning(
                            "math verifier timed out after %.1fs on answer %.80r: scored 0", timeout_s, jobs[i][0]
                        )
                        self._replace(w)
                    elif reply == "dead":
                        log.warning("a math verifier worker died (exit code %s); replaced", workers[w].proc.poll())
                        self._replace(w)
                        if retries:
                            pending.append((i, retries - 1))
                    elif "error" in reply:
                        log.warning("math verifier error on answer %.80r: %s", jobs[i][0], reply["error"])
                    else:
                        scores[i] = reply["score"]
            return scores

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for worker in self._workers:
                    worker.close()
            self._workers = []


_pool: VerifierPool | None = None


def default_pool() -> VerifierPool:
    global _pool
    if _pool is None:
        _pool = VerifierPool(workers=max(1, min(4, os.cpu_count() or 1)))
        atexit.register(_pool.close)
    return _pool


def math_reward(
    response: str, ground_truth, *, require_think_close: bool = False, timeout_s: float = DataConfig.verifier_timeout_s
) -> float:
    """1.0 if the final \\boxed answer of `response` equals the ground truth (string, number, or a
    list of acceptable answers) by math-verify, else 0.0. Never raises."""
    return math_rewards([response], [ground_truth], require_think_close=require_think_close, timeout_s=timeout_s)[0]


def math_rewards(
    responses: Iterable[str],
    ground_truths: Iterable,
    *,
    require_think_close: bool = False,
    timeout_s: float = DataConfig.verifier_timeout_s,
) -> list[float]:
    """Batch form of math_reward, spread over the verifier workers."""
    jobs = []
    for response, truth in zip(responses, ground_truths):
        try:
            answer = extract_answer(str(response), require_think_close)
        except Exception:  # noqa: BLE001 - nothing about a response may crash training
            answer = None
        jobs.append(None if answer is None else (answer, _truths(truth)))
    return default_pool().score_many(jobs, timeout_s)
