"""A multi-turn run through the CLI, for real: a user's environment named by import path
(tests/support/multiturn_env.py) on the embedded engine, trajectories of two model turns with
the environment's message between them; killed with SIGKILL mid-step and run again, it resumes
to the same metrics as the uninterrupted run (the embedded engine's seeds per step and turn)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]
SETTINGS = [
    "task.warmstart_target=null",
    "task.warmstart_max_steps=20",
    "task.eval_prompts=8",
    "task.train_prompts=200",
    "eval.k=1",
    "eval.every_steps=100",
    "checkpoint.every_steps=2",
    "optim.warmup_steps=1",
    "rollout.max_new_tokens=24",
    "eval.max_new_tokens=12",
    "rollout.n_samples=4",
    "train.prompts_per_step=4",
    "train.prompts_per_mini_batch=4",
    "actor.prompts_per_micro_batch=2",
    "train.steps=4",
    "logging.plot=false",
    "logging.rollouts=true",
    "checkpoint.save_hf_final=false",
    "logging.tensorboard=false",
    "rollout.environment=multiturn_env:CountingEnv",
    "rollout.environment_args={turns: 2, role: user, message: '=', tools: false}",
    "rollout.max_turns=2",
]


def train(tmp_path, name, kill_at=None):
    cmd = [sys.executable, "-m", "real_megatron.cli", "train", str(ROOT / "configs" / "quickstart.yaml")]
    cmd += ["--output-dir", str(tmp_path / name), f"task.cache_dir={tmp_path / 'cache'}", *SETTINGS]
    support = str(ROOT / "tests" / "support")
    env = dict(
        os.environ,
        REAL_MEGATRON_KILL_AT=kill_at or "",
        PYTHONPATH=os.pathsep.join(p for p in (support, os.environ.get("PYTHONPATH")) if p),
    )
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    assert returncode == (-signal.SIGKILL if kill_at else 0), (kill_at, returncode, text[-4000:])
    return text


def rows(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_users_environment_trains_by_import_path_and_resumes_after_a_kill(tmp_path):
    train(tmp_path, "a")
    reference = rows(tmp_path / "a")
    steps = [r for r in reference if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(1.0 <= r["turns_mean"] <= 2.0 for r in steps) and any(r["turns_mean"] > 1.0 for r in steps)
    # between-turn tokens are in the responses, not among the model's
    assert all(r["model_tokens_mean"] < r["response_length_mean"] for r in steps if r["turns_mean"] > 1.0)
    logged = [json.loads(line) for line in (tmp_path / "a" / "rollouts.jsonl").read_text().splitlines()]
    two = [r for r in logged if sum(t["role"] == "assistant" for t in r["turns"]) == 2]
    assert two and all([t["role"] for t in r["turns"]] == ["user", "assistant", "user", "assistant"] for r in two)
    assert all(r["turns"][2]["content"] == "=" and r["model_tokens"] < r["response_tokens"] for r in two)

    summary = json.loads((tmp_path / "a" / "summary.json").read_text())  # evaluated as trained: trajectories
    assert 1.0 <= summary["baseline_turns_mean"] <= 2.0 and 1.0 <= summary["final_turns_mean"] <= 2.0

    train(tmp_path, "c", kill_at="after_rollouts:3")  # mid-step, after generation
    out = train(tmp_path, "c")
    assert f"resumed from {tmp_path / 'c' / 'checkpoints' / 'step_000002'} at step 2" in out
    assert rows(tmp_path / "c") == reference, "the resumed multi-turn run differs from the uninterrupted one"


def test_the_tool_quickstart_builds_its_task_and_its_rl_steps_call_the_sandboxed_python_tool(tmp_path):
    """configs/quickstart_tools.yaml at toy sizes: its task (tokenizer with a chat template, tool-using
    warm-start traces) builds, and two RL steps run trajectories whose calls the real sandbox answers."""
    import re

    cmd = [sys.executable, "-m", "real_megatron.cli", "train", str(ROOT / "configs" / "quickstart_tools.yaml")]
    cmd += [
        "--output-dir",
        str(tmp_path / "t"),
        f"task.cache_dir={tmp_path / 'cache'}",
        "task.warmstart_target=null",
        "task.warmstart_max_steps=250",
        "task.train_prompts=400",
        "task.eval_prompts=8",
        "eval.k=1",
        "eval.every_steps=100",
        "train.steps=2",
        "optim.warmup_steps=1",
        "train.prompts_per_step=4",
        "train.prompts_per_mini_batch=4",
        "actor.prompts_per_micro_batch=2",
        "rollout.n_samples=4",
        "logging.rollouts=true",
        "logging.plot=false",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "checkpoint.save_hf_final=false",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [r for r in rows(tmp_path / "t") if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["tool_calls_mean"] > 0 and r["turns_mean"] > 1.0 for r in steps), steps
    logged = [json.loads(line) for line in (tmp_path / "t" / "rollouts.jsonl").read_text().splitlines()]
    answered = []  # tool turns that hold the product the model's code asked for, computed by the sandbox
    for r in logged:
        roles = [t["role"] for t in r["turns"]]
        if roles[:3] == ["user", "assistant", "tool"]:
            code = re.search(r'"code":"(\d+)\*(\d+)"', r["turns"][1]["content"])
            if code and r["turns"][2]["content"].strip() == str(int(code[1]) * int(code[2])):
                answered.append(r)
    assert answered, [r["turns"] for r in logged[:4]]
