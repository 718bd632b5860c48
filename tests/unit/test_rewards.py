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


# ----- reward functions of one's own (data.reward_fn) -------------------------------------------


def test_a_verl_compute_score_gets_the_rows_data_source_truth_and_extra_info():
    from real_megatron.rewards import call_style

    reward = load_reward_fn("reward_fns:compute_score")
    assert reward.style == "verl" and call_style(math_reward) == "plain"
    truth = {"cases": [1, 2], "answers": ["a", "b"]}  # a dict reaches the function as it is
    scores = reward.score(
        ["ok", "ok", "no"],
        [truth, truth, truth],
        data_sources=["unit/verl", "other", "unit/verl"],
        extra_infos=[{"index": 3, "split": "train"}] * 3,
        timeout_s=30,
    )
    assert scores == [1.0, 0.0, 0.0]  # verl's dict return: its "score"
    older = load_reward_fn("reward_fns:compute_score_no_extra")
    assert older.score(["b"], [["a", "b"]], extra_infos=[{"x": 1}], timeout_s=30) == [1.0]


def test_a_reward_that_is_not_a_label_is_refused_with_real_or_thresholded():
    from real_megatron.rewards import RewardError

    real = load_reward_fn("reward_fns:partial", labels=True)
    with pytest.raises(
        RewardError, match=r"reward_fns:partial returned 0.5 on f.jsonl:7: REAL's rewards are class labels"
    ):
        real.score(["a", "a b"], [["a", "b"], ["a", "b"]], sources=["f.jsonl:7", "f.jsonl:8"], timeout_s=30)
    thresholded = load_reward_fn("reward_fns:partial", labels=True, threshold=0.5)
    assert thresholded.score(["", "a", "a b"], [["a", "b"]] * 3, timeout_s=30) == [0.0, 1.0, 1.0]
    graded = load_reward_fn("reward_fns:partial")  # the baselines weigh real-valued rewards as they are
    assert graded.score(["a", "a b"], [["a", "b", "c", "d"]] * 2, timeout_s=30) == [0.25, 0.5]


def test_a_reward_function_that_raises_stops_with_its_row_named_and_printing_is_harmless():
    from real_megatron.rewards import RewardError

    with pytest.raises(RewardError, match=r"reward_fns:raises raised on data.parquet:4: KeyError"):
        load_reward_fn("reward_fns:raises").score(["x"], ["y"], sources=["data.parquet:4"], timeout_s=30)
    assert load_reward_fn("reward_fns:noisy").score(["x"] * 3, ["y"] * 3, timeout_s=30) == [1.0] * 3
    with pytest.raises(ValueError, match="require_think_close is the math verifier's"):
        load_reward_fn("reward_fns:exact", require_think_close=True)


def test_one_hanging_reward_costs_its_own_deadline_not_a_round(tmp_path, monkeypatch):
    """Reward functions run in worker processes, each call under the verifier's deadline; while one
    hangs, the other workers go on with the rest of the batch."""
    from real_megatron.rewards import Reward, _pools
    from real_megatron.rewards.pool import WorkerPool

    log = tmp_path / "starts.log"
    monkeypatch.setenv("REWARD_LOG", str(log))
    _pools["reward_fns:slow_on_hang"] = pool = WorkerPool(workers=2, fn="reward_fns:slow_on_hang")
    try:
        reward = Reward(__import__("reward_fns").slow_on_hang, "reward_fns:slow_on_hang")
        start = time.time()
        scores = reward.score(["hang"] + ["fine"] * 6, ["t"] * 7, timeout_s=4.0)
        starts = [float(line) for line in log.read_text().split()]
    finally:
        pool.close()
        del _pools["reward_fns:slow_on_hang"]
    assert scores == [0.0] + [1.0] * 6
    # a round-by-round pool would start the last five only after the hanging call's 4 s deadline
    assert len(starts) == 6 and max(starts) - start < 3.0, [s - start for s in starts]


def test_custom_ground_truths_reach_the_function_and_none_or_nan_is_refused_at_load(tmp_path):
    import json

    from real_megatron.data.dataset import DataError

    rows = [
        {"prompt": "p", "reward_model": {"ground_truth": {"tests": ["assert f(1) == 2"]}}, "extra_info": {"i": 0}},
        {"prompt": "p", "reward_model": {"ground_truth": ["3", "three"]}, "data_source": "mine"},
    ]
    good = tmp_path / "custom.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = load_examples(good, math_truths=False)
    assert examples[0].ground_truth == {"tests": ["assert f(1) == 2"]} and examples[0].extra_info == {"i": 0}
    assert examples[1].ground_truth == ["3", "three"] and examples[1].data_source == "mine"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "custom.parquet")  # verl's own format
    (row,), _ = load_examples(tmp_path / "custom.parquet", math_truths=False)
    assert row.ground_truth == {"tests": ["assert f(1) == 2"]} and row.extra_info == {"i": 0}
    with pytest.raises(DataError, match=r"custom.jsonl: row 0: no usable ground truth .* for the math verifier"):
        load_examples(good)  # the math verifier compares strings and numbers only
    for bad_truth in (None, float("nan"), "", "None", "nan"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(
            json.dumps({"prompt": "p", "answer": "1"}) + "\n" + json.dumps({"prompt": "p", "answer": bad_truth}) + "\n"
        )
        with pytest.raises(DataError, match=r"bad.jsonl: row 1: no usable ground truth"):
            load_examples(bad)
    nan_only = tmp_path / "nan.jsonl"
    nan_only.write_text(json.dumps({"prompt": "p", "answer": float("nan")}) + "\n")
    with pytest.raises(DataError, match=r"nan.jsonl: row 0"):
        load_examples(nan_only, math_truths=False)
