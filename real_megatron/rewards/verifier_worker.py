"""One reward worker: base64-pickled lines in, base64-pickled lines out. Run as a plain script by
the worker pool (pool.py) with one argument: "None" for math-verify, whose jobs are
(claims, truths) and replies {"score": 0.0 | 1.0}; or "module:function", whose jobs are
(args, kwargs) for that function and replies {"value": what it returned} or {"error": "..."}.
It imports nothing of the caller's but that function, so the pool works from any script, notebook
or thread; it ends when its stdin closes (the parent exited, even by kill -9).
"""

import base64
import importlib
import logging
import os
import pickle
import sys


def verify(claims: list, truths: list) -> float:
    """1.0 if math-verify finds every claim equal to one ground truth (or the strings match)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify import verify as equal

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    golds = [
        (truth, parse("\\boxed{" + truth + "}", extraction_config=configs, parsing_timeout=None)) for truth in truths
    ]
    for truth, gold in golds:
        if all(_equal(claim, truth, gold, parse, equal, configs) for claim in claims):
            return 1.0
    return 0.0


def _equal(claim: str, truth: str, gold, parse, equal, configs) -> bool:
    if claim.strip() == truth.strip():
        return True
    predicted = parse("\\boxed{" + claim + "}", extraction_config=configs, parsing_timeout=None)
    return bool(predicted and gold and equal(gold, predicted, timeout_seconds=None))


def _send(out, reply: dict) -> None:
    out.write(base64.b64encode(pickle.dumps(reply)) + b"\n")


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # math-verify's per-answer warnings are not news
    # the replies get their own copy of stdout; what the function prints goes to stderr
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    spec = sys.argv[1] if len(sys.argv) > 1 else "None"
    fn = None
    try:
        if spec == "None":
            import math_verify  # noqa: F401 - loaded once, before the first job's deadline starts
        else:
            module, _, attr = spec.partition(":")
            fn = getattr(importlib.import_module(module), attr)
    except Exception as exc:  # noqa: BLE001 - told to the parent, which names it
        _send(out, {"ready": False, "error": f"cannot load {spec}: {exc!r}"[:500]})
        return
    _send(out, {"ready": True})
    for line in sys.stdin.buffer:
        try:
            job = pickle.loads(base64.b64decode(line))
            if fn is None:
                reply = {"score": verify(*job)}
            else:
                args, kwargs = job
                reply = {"value": fn(*args, **kwargs)}
                pickle.dumps(reply)  # a value that cannot travel back is an error, not a dead worker
        except Exception as exc:  # noqa: BLE001 - math: a malformed answer is a wrong answer
            reply = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        _send(out, reply)


if __name__ == "__main__":
    main()
