"""The training loop end to end through the CLI, at toy scale: every artefact."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import QUIET, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]
CHECKPOINTS = ["checkpoint.every_steps=2", "checkpoint.keep_last=1"]


def train(tmp_path, *overrides):
    cmd = [
        sys.executable,
        "-m",
        "real_megatron.cli",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--output-dir",
        str(tmp_path / "run"),
        *tiny_run_overrides(tmp_path, size="toy", eval_every=2),
        *CHECKPOINTS,
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_quickstart_shaped_run_leaves_every_artefact(tmp_path):
    out = train(tmp_path, "train.steps=4")
    run = tmp_path / "run"
    assert "pass@1 after RL" in out and "gain" in out  # the closing table
    # output to a pipe, as in a Slurm log: progress as whole lines, no bar frames, no CPU-only noise
    assert "\r" not in out and "real RL: 4/4 step" in out and "Writing model shards" not in out, out[-3000:]
    assert "Apex is not installed" not in out and "Transformer Engine and Apex" not in out, out[-3000:]
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "final_hf/model.safetensors",
        "final_hf/config.json",
        "final_hf/tokenizer.json",
    ):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in (
        "reward_mean",
        "entropy",
        "solved_all_ratio",
        "response_length_mean",
        "loss",
        "grad_norm",
        "score_neg_mean",
        "generate_s",
        "update_s",
        "old_logprobs_s",
        "uniform_group_fraction",
        "informative_groups",
        "sampling_rounds",
        "prompts_generated",
        "first_update_score_abs_max",
        "mismatch_abs_mean",
        "mismatch_abs_max",
        "mismatch_kl",
        "mismatch_frac",
    ):
        assert key in steps[-1], key
    for row in steps:  # measured by default: the embedded engine's log-probs against the actor's pi_old
        assert row["sampling_rounds"] == 1 and row["prompts_generated"] == 8
        assert row["first_update_score_abs_max"] < 1e-5 and 0 < row["mismatch_abs_mean"] < 1e-3, row
        assert 0 <= row["mismatch_kl"] < 1e-6 and row["mismatch_frac"] == 0.0
    assert sum("val_pass1" in r for r in rows) >= 3  # baseline, mid-run, final
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_samples"] == 48 and 0 <= summary["final_pass1"] <= 1 and summary["stderr"] >= 0
    assert summary["final_benchmarks"] == {"heldout": summary["final_pass1"]}  # one eval set: pooled == per set
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000004"]  # keep_last=1
    # the final HF checkpoint loads in transformers
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(run / "final_hf")
    # resuming (after kills at several points, exactly) is tests/integration/test_crash_resume.py's subject


def test_every_rlvr_option_at_once_through_the_cli(tmp_path):
    """DAPO with dynamic sampling, truncated responses excluded, the overlong penalty and masked
    importance sampling: the loop runs them together and logs what each did."""
    train(
        tmp_path,
        "train.steps=2",
        "algorithm.name=dapo",
        "algorithm.dynamic_sampling=true",
        "algorithm.max_sampling_rounds=2",
        "algorithm.truncated=exclude",
        "algorithm.overlong_buffer_tokens=8",
        "algorithm.importance_correction=mis",
        "eval.every_steps=0",
        "logging.plot=false",
        "checkpoint.save_hf_final=false",
        "checkpoint.every_steps=0",
        "logging.tensorboard=false",
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert row["prompts_generated"] == 8 * row["sampling_rounds"] and row["skipped_updates"] == 0, row
        assert 0 < row["excluded_ratio"] == row["truncated_ratio"], row  # the toy model often runs to the limit
        assert -1.0 <= row["overlong_penalty_mean"] < 0 and row["mismatch_frac"] == 0.0, row


def test_two_ranks_outlast_a_collective_deadline_far_shorter_than_the_evaluation(tmp_path):
    """Rank 1 waits while rank 0 warm-starts the task, generates and evaluates, each longer than
    parallel.timeout_s; the run completes (each wait checks rank 0's heartbeat, not a deadline)."""
    import os

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "real_megatron.cli",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--output-dir",
        str(tmp_path / "run"),
        *tiny_run_overrides(tmp_path, size="toy", eval_every=2),
        *CHECKPOINTS,
        "train.steps=2",
        "parallel.gpus_per_node=2",
        "parallel.timeout_s=2",
        "task.eval_prompts=360",
        "eval.k=16",
        "eval.max_new_tokens=48",
        "eval.every_steps=0",
        "logging.progress_bar=false",
        "logging.plot=false",
        "checkpoint.save_hf_final=false",
        "checkpoint.every_steps=0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    baseline = next(r for r in rows if "eval_s" in r)
    assert baseline["eval_s"] > 3 * 2, baseline  # the evaluation alone outlasts the deadline three times
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2]


def test_a_reward_function_that_raises_stops_the_run_with_one_line(tmp_path):
    """A real run (a tiny model of one's own, data files, data.reward_fn) whose reward function
    raises: one line naming the function, the row and the fix, exit 2; the traceback in the run's
    logs/, not on the terminal (`eval` says the same line: tests/unit/test_eval.py)."""
    import os

    from chat_tokenizer import chat_tokenizer
    from tiny_models import tiny_qwen2

    model = tmp_path / "model"
    tokenizer = chat_tokenizer()
    tokenizer.save_pretrained(model)
    tiny_qwen2(len(tokenizer), positions=256, eos_token_id=tokenizer.eos_token_id).save_pretrained(model)
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1)}) + "\n" for i in range(4)))
    run = tmp_path / "run"
    config = tmp_path / "mine.yaml"
    config.write_text(
        f"""
model: {{path: {model}, dtype: float32}}
data: {{train_files: [{data}], answer_key: answer, reward_fn: "reward_fns:raises"}}
rollout: {{backend: local, n_samples: 2, max_new_tokens: 4}}
train: {{steps: 1, prompts_per_step: 2, prompts_per_mini_batch: 2, output_dir: {run}}}
actor: {{prompts_per_micro_batch: 2}}
optim: {{use_distributed_optimizer: false}}
eval: {{files: [{data}], k: 1, max_new_tokens: 4, every_steps: 0}}
"""
    )
    support = str(ROOT / "tests" / "support")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [support, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "real_megatron.cli", "train", str(config)]
    proc = subprocess.run(cmd + QUIET, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    (line,) = [text for text in proc.stderr.splitlines() if text.startswith("reward error:")]
    assert line.startswith(f"reward error: reward function reward_fns:raises raised on {data}:"), line
    assert "KeyError: 'no such test case'" in line and "return a number for every response" in line
    assert line.endswith(f"(traceback: {run / 'logs' / 'traceback.rank0.txt'})")
    assert "RewardError" in (run / "logs" / "traceback.rank0.txt").read_text()
