"""The math verifier: the last \\boxed{...} of a response against the ground truth, by math-verify.

`math_reward(response, ground_truth)` returns 1.0 or 0.0 and never raises. The answer is cut out
here (linear brace matching, after `</think>` when present); the symbolic comparison runs in a
worker process with a hard deadline: a parse that hangs (10^10^10^10, pathological LaTeX) is
killed, scores 0.0 and is logged, and the worker is replaced.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

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


def _verify(answer: str, truths: list[str]) -> float:
    """Runs in a worker: 1.0 if math-verify finds the answer equal to any ground truth."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    predicted = parse("\\boxed{" + answer + "}", extraction_config=configs, parsing_timeout=None)
    if not predicted:
        return 0.0
    for truth in truths:
        gold = parse("\\boxed{" + truth + "}", extraction_config=configs, parsing_timeout=None)
        if gold and verify(gold, predicted, timeout_seconds=None):
            return 1.0
        if truth.strip() == answer.strip():
            return 1.0
    return 0.0


def _worker(conn) -> None:
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(_verify(*job))
        except Exception as exc:  # a malformed answer is a wrong answer
            conn.send(("error", repr(exc)[:200]))


class VerifierPool:
    """Worker processes answering (answer, truths) jobs, each under a hard deadline."""

    def __init__(self, workers: int = 1):
        self._ctx = mp.get_context("spawn")  # no fork of a process holding torch threads
        self._workers = [self._start() for _ in range(max(1, workers))]
        self._lock = threading.Lock()

    def _start(self):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child,), daemon=True, name="math-verifier")
        proc.start()
        return proc, parent

    def _replace(self, index: int) -> None:
        proc, conn = self._workers[index]
        proc.kill()
        proc.join(timeout=5)
        conn.close()
        self._workers[index] = self._start()

    def score_many(self, jobs: Sequence[tuple[str, list[str]] | None], timeout_s: float) -> list[float]:
        """Scores for jobs (None = no answer = 0.0), using every worker at once."""
        with self._lock:
            scores = [0.0] * len(jobs)
            pending = [i for i, job in enumerate(jobs) if job is not None]
            while pending:
                batch = list(zip(range(len(self._workers)), pending))
                for w, i in batch:
                    self._workers[w][1].send(jobs[i])
                for w, i in batch:
                    conn = self._workers[w][1]
                    if conn.poll(timeout_s):
                        result = conn.recv()
                        if isinstance(result, tuple):
                            log.warning("math verifier error on answer %.80r: %s", jobs[i][0], result[1])
                        else:
                            scores[i] = result
                    else:
                        log.warning("math verifier timed out after %.1fs on answer %.80r: scored 0", timeout_s, jobs[i][0])
                        self._replace(w)
                pending = pending[len(batch):]
            return scores

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()


_pool: VerifierPool | None = None


def default_pool() -> VerifierPool:
    global _pool
    if _pool is None:
        _pool = VerifierPool(workers=max(1, min(4, mp.cpu_count())))
    return _pool


def math_reward(response: str, ground_truth, *, require_think_close: bool = False, timeout_s: float = 5.0) -> float:
    """1.0 if the final \\boxed answer of `response` equals the ground truth (string, number, or a
    list of acceptable answers) by math-verify, else 0.0. Never raises."""
    return math_rewards([response], [ground_truth], require_think_close=require_think_close, timeout_s=timeout_s)[0]


def math_rewards(
    responses: Iterable[str], ground_truths: Iterable, *, require_think_close: bool = False, timeout_s: float = 5.0
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
