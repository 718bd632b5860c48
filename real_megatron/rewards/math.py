"""The math verifier: the final boxed answer of a response against the ground truth, by math-verify.

`math_reward(response, ground_truth)` returns 1.0 or 0.0 and never raises. The answer is cut out
and both sides are put in one form here (answers.py: which box, `</think>`, equations, number
forms; each rule there closes a way to score without the answer); the symbolic comparison runs in
worker processes (pool.py, verifier_worker.py), each answer with its own hard deadline: a parse
that hangs (10^10^10^10, pathological LaTeX) is killed, scores 0.0 and is logged, its worker is
replaced, and the other answers go on. Callable from any script (no `if __name__ == "__main__":`
needed), a notebook, or several threads.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterable

from ..data.settings import DataConfig
from .answers import THINK_CLOSE, extract_answer, last_boxed, verifier_job
from .pool import TIMED_OUT, WorkerPool

log = logging.getLogger(__name__)

VerifierPool = WorkerPool  # the math verifier's pool: WorkerPool(fn=None)
_pool: WorkerPool | None = None


def default_pool() -> WorkerPool:
    global _pool
    if _pool is None:
        _pool = WorkerPool(workers=max(1, min(4, os.cpu_count() or 1)))
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
            jobs.append(verifier_job(extract_answer(str(response), require_think_close), truth))
        except Exception:  # noqa: BLE001 - nothing about a response may crash training
            jobs.append(None)
    scores = []
    for job, reply in zip(jobs, default_pool().run(jobs, timeout_s)):
        if reply is TIMED_OUT:
            log.warning("math verifier timed out after %.1fs on answer %.80r: scored 0", timeout_s, job[0])
        elif isinstance(reply, dict) and "error" in reply:
            log.warning("math verifier error on answer %.80r: %s", job[0], reply["error"])
        scores.append(float(reply["score"]) if isinstance(reply, dict) and "score" in reply else 0.0)
    return scores


__all__ = ["THINK_CLOSE", "extract_answer", "last_boxed", "math_reward", "math_rewards", "default_pool"]
