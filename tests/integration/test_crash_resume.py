"""Determinism and crash consistency of `real-megatron train`, through the CLI, for real.

Same seed, same command: the same metrics.jsonl (every value but wall-clock timings, keys ending
in `_s`). Killed with SIGKILL at several points (REAL_MEGATRON_KILL_AT, see kill_points.py), one
inside the checkpoint write, then the same command again each time: the run resumes from the last
complete checkpoint and its metrics, every step and every evaluation, equal the uninterrupted
run's exactly. Dynamic sampling is on (several rounds of prompts per step, a variable count): the
data position in every checkpoint is exactly the prompts drawn so far, so each prompt is used once.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]
TOY = [
    "task.warmstart_target=null",
    "task.eval_prompts=24",
    "task.train_prompts=400",
    "eval.k=2",
    "eval.every_steps=3",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=2",
    "optim.warmup_steps=1",
    "rollout.max_new_tokens=24",
    "eval.max_new_tokens=24",
    "train.prompts_per_step=8",
    "train.prompts_per_mini_batch=4",
    "actor.prompts_per_micro_batch=2",
    "train.steps=6",
    "logging.plot=false",
    "checkpoint.save_hf_final=false",
    "logging.tensorboard=false",
    "algorithm.dynamic_sampling=true",
    "algorithm.max_sampling_rounds=2",
    "task.warmstart_max_steps=20",
]


def train(tmp_path, name, kill_at=None):
    cmd = [
        sys.executable,
        "-m",
        "real_megatron.cli",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--output-dir",
        str(tmp_path / name),
        f"task.cache_dir={tmp_path / 'cache'}",
        *TOY,
    ]
    env = dict(os.environ, REAL_MEGATRON_KILL_AT=kill_at or "")
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:  # a file, not a pipe: an orphan holding it could not stall the test
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=600)
        finally:
            survivors = _group_alive(proc.pid)
            if survivors:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert returncode == (-signal.SIGKILL if kill_at else 0), (kill_at, returncode, text[-4000:])
    assert not survivors, f"processes outlived the killed trainer ({kill_at})"
    return text


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def rows(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def test_same_command_same_metrics_and_kills_anywhere_resume_to_the_same_run(tmp_path):
    train(tmp_path, "a")
    reference = rows(tmp_path / "a")
    assert [r["step"] for r in reference if "reward_mean" in r] == [1, 2, 3, 4, 5, 6]
    assert sum("val_pass1" in r for r in reference) == 3  # baseline, after step 3, final
    train(tmp_path, "b")
    assert rows(tmp_path / "b") == reference, "same seed, same command, different metrics"

    run, ckpts = tmp_path / "c", tmp_path / "c" / "checkpoints"
    train(tmp_path, "c", kill_at="checkpoint_shards:4")  # inside the write of step 4's checkpoint
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004.tmp"]
    out = train(tmp_path, "c", kill_at="after_rollouts:5")  # mid-step, after generation
    assert f"resumed from {ckpts / 'step_000002'} at step 2" in out
    out = train(tmp_path, "c", kill_at="checkpoint_swap:6")  # the checkpoint complete, not yet renamed
    assert f"resumed from {ckpts / 'step_000004'} at step 4" in out
    assert (ckpts / "step_000006.tmp" / "trainer_state.json").exists() and not (ckpts / "step_000006").exists()
    out = train(tmp_path, "c")
    assert f"resumed from {ckpts / 'step_000004'} at step 4" in out
    assert rows(run) == reference, "the resumed run differs from the uninterrupted one"
    summary_a, summary_c = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("a", "c"))
    assert (
        summary_c["final_pass1"] == summary_a["final_pass1"]
        and summary_c["baseline_pass1"] == summary_a["baseline_pass1"]
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000004", "step_000006"]  # leftovers cleared
    # each prompt of the dataset order drawn once: the saved position is every prompt generated so far
    drawn = [r["prompts_generated"] for r in reference if "prompts_generated" in r]
    assert len(drawn) == 6 and set(drawn) <= {8, 16} and 16 in drawn, drawn  # some steps needed a second round
    for step in (4, 6):
        state = json.loads((ckpts / f"step_{step:06d}" / "trainer_state.json").read_text())
        assert state["data"]["epoch"] * 400 + state["data"]["position"] == sum(drawn[:step]), (step, state["data"])
