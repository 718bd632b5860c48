"""One math-verify worker: JSON lines in ([answer, [truths...]]), JSON lines out ({"score": s} or
{"error": "..."}). Run as a plain script by the verifier pool (`python verifier_worker.py`): it
imports nothing of the caller's, so the pool works from any script, notebook or thread; it ends
when its stdin closes (the parent exited, even by kill -9).
"""

import json
import logging
import sys


def verify(answer: str, truths: list) -> float:
    """1.0 if math-verify finds the answer equal to any ground truth (or the strings match)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify import verify as equal

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    predicted = parse("\\boxed{" + answer + "}", extraction_config=configs, parsing_timeout=None)
    if not predicted:
        return 0.0
    for truth in truths:
        gold = parse("\\boxed{" + truth + "}", extraction_config=configs, parsing_timeout=None)
        if gold and equal(gold, predicted, timeout_seconds=None):
            return 1.0
        if truth.strip() == answer.strip():
            return 1.0
    return 0.0


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # math-verify's per-answer warnings are not news
    import math_verify  # noqa: F401 - loaded once, before the first job's deadline starts

    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            answer, truths = json.loads(line)
            reply = {"score": verify(answer, truths)}
        except Exception as exc:  # noqa: BLE001 - a malformed answer is a wrong answer
            reply = {"error": repr(exc)[:200]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
