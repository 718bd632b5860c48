"""Reward functions of the kinds users bring, named by import path in the tests (reward_fns:NAME)."""

import os
import time


def exact(response, ground_truth):
    """fn(response, ground_truth): 1 when the response is the ground truth."""
    return float(response.strip() == str(ground_truth))


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature; tells what it was given."""
    return {
        "score": float(
            data_source == "unit/verl"
            and ground_truth == {"cases": [1, 2], "answers": ["a", "b"]}
            and extra_info == {"index": 3, "split": "train"}
            and solution_str == "ok"
        ),
        "acc": 1.0,
    }


def compute_score_no_extra(data_source, solution_str, ground_truth):
    """verl's older signature, without extra_info."""
    return float(solution_str in ground_truth)


def partial(response, ground_truth):
    """A graded score in [0, 1]: the fraction of the answers present."""
    return sum(a in response for a in ground_truth) / len(ground_truth)


def raises(response, ground_truth):
    raise KeyError("no such test case")


def noisy(response, ground_truth):
    print("debug output that must not break the worker's replies")
    return 1.0


def slow_on_hang(response, ground_truth):
    """Hangs on "hang"; otherwise records when it started (in $REWARD_LOG) and scores 1."""
    if response == "hang":
        time.sleep(600)
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(f"{time.time()}\n")
    time.sleep(0.05)
    return 1.0


def half(response, ground_truth):
    """0.5 whatever it is given: a score, not a 0/1 label."""
    return 0.5
