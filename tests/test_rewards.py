"""The math verifier on the real benchmark files, on adversarial strings, and its rules."""

import time

import pytest

from real_megatron.data import load_examples
from real_megatron.rewards import extract_answer, load_reward_fn, math_reward, math_rewards
from shared_data import BENCHMARKS, data_file


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
    assert load_reward_fn("real_megatron.rewards:math_reward") is math_reward
    with pytest.raises(ValueError, match="expected the form module.path:function"):
        load_reward_fn("real_megatron.rewards.math_reward")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_reward_fn("real_megatron.rewards:nope")
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        load_reward_fn("no_such_module:f")
