"""The math verifier on the real benchmark files, on adversarial strings, and its rules."""

import time

import pytest
from shared_data import BENCHMARKS, data_file

from real_megatron.data import load_examples
from real_megatron.rewards import extract_answer, load_reward_fn, math_reward, math_rewards


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_boxed_ground_truth_scores_one_on_real_rows(name):
    examples, skipped = load_examples(data_file(name))
    assert skipped == 0 and examples
    truths = [ex.ground_truth for ex in examples]
    first = [t[0] if isinstance(t, list) else t for t in truths]
    right = math_rewards([f"Let me think. The answer is \\boxed{{{t}}}." for t in first], truths)
    assert sum(right) / len(right) >= 0.99, f"{name}: {sum(right)}/{len(right)}"
    wrong = math_rewards(["so \\boxed{-7777.125}" for _ in examples[:50]], truths[:50])
    assert sum(wrong) == 0


def test_answer_extraction_rules():
    assert extract_answer("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("<think>\\boxed{5}</think> so \\boxed{6}") == "6"
    assert extract_answer("<think>\\boxed{5}</think> no box after") is None
    assert extract_answer("no think, \\boxed{7}", require_think_close=True) is None
    assert extract_answer("unbalanced \\boxed{1 + {2}") is None
    assert extract_answer("\\fbox{x+1}") == "x+1"


def test_equivalence_and_lists():
    assert math_reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("\\boxed{2\\sqrt{2}}", "\\sqrt{8}") == 1.0
    assert math_reward("\\boxed{3}", ["4", "3"]) == 1.0
    assert math_reward("\\boxed{3}", 3) == 1.0
    assert math_reward("\\boxed{4}", "3") == 0.0
    assert math_reward("the answer is 3", "3") == 0.0  # no box, no reward


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed{10^{10^{10^{10}}}}",
        "\\boxed{" + "{" * 50_000 + "1" + "}" * 50_000 + "}",
        "\\boxed{" + "9" * 1_000_000 + "}",
        "\\boxed{\ud800\udfff 1}",
        "\\boxed{" + "x^" * 300 + "2}",
        "",
    ],
    ids=["tower", "nested-braces", "1MB-digits", "surrogates", "power-chain", "empty"],
)
def test_adversarial_strings_return_in_time(response):
    start = time.monotonic()
    score = math_reward(response, "1", timeout_s=2.0)
    assert score in (0.0, 1.0) and time.monotonic() - start <= 3.0


def test_a_hung_worker_is_replaced():
    # the tower can make sympy grind: whatever happens, the next call still works
    math_reward("\\boxed{10^{10^{10^{10^{10}}}}}", "1", timeout_s=0.5)
    assert math_reward("\\boxed{42}", "42") == 1.0


def test_custom_reward_by_import_path():
    assert load_reward_fn("real_megatron.rewards:math_reward").fn is math_reward
    with pytest.raises(ValueError, match="expected the form module.path:function"):
        load_reward_fn("real_megatron.rewards.math_reward")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_reward_fn("real_megatron.rewards:nope")
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        load_reward_fn("no_such_module:f")


def test_a_script_without_main_guard_can_score(tmp_path):
    """The workers are not multiprocessing children: a plain script (no __main__ guard), code
    given with -c and code fed on stdin, as a notebook runs it, all score without re-running."""
    import subprocess
    import sys

    code = (
        "from real_megatron.rewards import math_reward, math_rewards\n"
        "print('RESULT', math_reward('so \\\\boxed{\\\\frac{1}{2}}', '0.5'), math_rewards(['\\\\boxed{3}'] * 3, ['3', '4', '3']))\n"
    )
    script = tmp_path / "score.py"
    script.write_text(code)
    for cmd, stdin in (
        ([sys.executable, str(script)], None),
        ([sys.executable, "-c", code], None),
        ([sys.executable, "-"], code),
    ):
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count("RESULT") == 1 and "RESULT 1.0 [1.0, 0.0, 1.0]" in proc.stdout, proc.stdout


def test_threads_share_the_pool():
    from concurrent.futures import ThreadPoolExecutor

    cases = [(f"\\boxed{{{n}}}", str(n if n % 3 else n + 1)) for n in range(24)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        scores = list(pool.map(lambda c: math_reward(*c), cases))
    assert scores == [0.0 if n % 3 == 0 else 1.0 for n in range(24)]


def test_a_worker_that_dies_is_replaced_and_its_job_retried():
    import os
    import signal

    from real_megatron.rewards.math import default_pool

    pool = default_pool()
    math_reward("\\boxed{1}", "1")  # workers started
    before = [w.proc.pid for w in pool._workers]
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    assert math_rewards(["\\boxed{2}", "\\boxed{5}", "\\boxed{x+1}"], ["2", "6", "1+x"]) == [1.0, 0.0, 1.0]
    after = [w.proc.pid for w in pool._workers]
    assert not set(before) & set(after) and all(w.proc.poll() is None for w in pool._workers)


def test_a_forked_child_scores_with_its_own_workers():
    import multiprocessing as mp

    math_reward("\\boxed{1}", "1")  # the parent's pool exists before the fork
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply(math_reward, ("\\boxed{7}", "7")) == 1.0
    assert math_reward("\\boxed{8}", "8") == 1.0  # the parent's workers untouched
