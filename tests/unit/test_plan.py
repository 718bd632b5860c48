"""The one pre-flight check behind `train --dry-run` and `launch-plan` (plan.py, memory.split_problems):
what megatron-core would refuse, refused with the config and the dominant cause first; what the run
reads (resume path, reward function, data columns) checked; the architecture's source said."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from real_megatron.config import ConfigError, load_config
from real_megatron.memory import Architecture, split_problems
from real_megatron.plan import architecture, check_run

ROOT = Path(__file__).resolve().parents[2]
EXE = shutil.which("real-megatron", path=str(Path(sys.executable).parent))
PAPER = ROOT / "configs" / "real_r1distill_qwen_1p5b.yaml"  # 12 heads, 2 KV heads, 28 layers
MOE = ROOT / "configs" / "real_qwen3_30b_a3b.yaml"  # 128 experts, 48 layers


def run(*args):
    return subprocess.run([EXE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "config,overrides,reason",
    [
        (PAPER, ["parallel.tp=8"], "num_attention_heads=12 is not divisible by tp=8; num_key_value_heads=2"),
        (PAPER, ["parallel.tp=4"], "num_key_value_heads=2 is not divisible by tp=4"),
        (PAPER, ["parallel.pp=3"], "num_hidden_layers=28 is not divisible by pp*vpp=3"),
        (PAPER, ["parallel.pp=2", "parallel.vpp=4", "parallel.gpus_per_node=8"], "by pp*vpp=8"),
        (MOE, ["parallel.ep=3", "parallel.gpus_per_node=6"], "num_experts=128 is not divisible by ep=3"),
    ],
)
def test_megatron_cores_split_is_refused_at_load_and_first(config, overrides, reason):
    """tp=8 on the 1.5B passed the dry run before (only convert checked); now it is the only error
    shown, ahead of the token budget it also breaks."""
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides)
    message = str(err.value)
    assert "megatron-core cannot split the model this way: " in message and reason in message, message
    assert "max_tokens_per_micro_batch" not in message


def test_convert_uses_the_same_split_check():
    arch = Architecture(hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960, vocab=151936, tied=False, head_dim=128)
    assert split_problems(arch, tp=2, pp=2) == []
    assert split_problems(arch, tp=8, pp=1) == [
        "num_attention_heads=12 is not divisible by tp=8",
        "num_key_value_heads=2 is not divisible by tp=8",
    ]
    assert split_problems(arch, tp=1, pp=1, ep=2) == [
        "ep=2, etp=None: expert parallelism needs a mixture-of-experts model"
    ]


def test_launch_plan_refuses_what_the_dry_run_refuses_with_the_dominant_cause():
    """The 30B on one node split 4 + 4 without the optimizer's CPU offload (what the one-node config
    was before it became colocated): launch-plan (the sbatch's first step) refuses it as the dry run
    does, and the reason is the optimizer state, which recompute cannot shrink."""
    split = [
        *("parallel.gpus_per_node=4", "parallel.tp=1", "parallel.sequence_parallel=false", "parallel.ep=4"),
        *("parallel.etp=null", "rollout.colocate=false", "rollout.num_servers=2", "rollout.server_tp=2"),
        *("optim.cpu_offload=false", "optim.use_precision_aware_optimizer=false"),
        "optim.overlap_cpu_optimizer_d2h_h2d=false",
    ]
    for args in (["launch-plan"], ["train", "--dry-run"]):
        out = run(args[0], "configs/real_qwen3_30b_a3b_1node.yaml", *args[1:], *split)
        assert out.returncode == 2, out.stdout
        assert (
            "the layout does not fit: a trainer GPU needs about 165 GB of 80 GB; optimizer (Adam) is the largest"
            in out.stderr
        )
        assert "optim.cpu_offload: true" in out.stderr and "recompute does not shrink it" in out.stderr
        assert "TRAINER_NODES" not in out.stdout
    out = run("launch-plan", "configs/real_r1distill_qwen_1p5b_1node.yaml")
    assert out.returncode == 0 and "TRAINER_TASKS_PER_NODE=4" in out.stdout, out.stderr
    out = run("launch", "configs/real_r1distill_qwen_1p5b_1node.yaml", "--dry-run")  # as the docs say
    assert out.returncode == 0 and out.stdout.rstrip().endswith("config OK"), out.stderr


def test_what_the_run_reads_is_checked(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"checkpoint.resume={tmp_path / 'nowhere'}"])
    assert any("checkpoint.resume=" in p and "no such checkpoint" in p for p in check_run(cfg).problems)
    cfg = load_config(PAPER, ["data.reward_fn=no_such_module:score", "data.require_think_close=false"])
    problems = check_run(cfg, data=False).problems
    assert problems == [
        "data.reward_fn: reward function 'no_such_module:score': cannot import 'no_such_module' "
        "(No module named 'no_such_module')"
    ]
    # the data's columns and first rows, as the trainer reads them
    rows = tmp_path / "mine.jsonl"
    rows.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    cfg = load_config(PAPER, [f"data.train_files=[{rows}]", "eval.files=[]"])
    (problem,) = check_run(cfg).problems
    assert f"data.train_files: {rows}: row 0: no 'prompt' or 'messages' field (fields: question, solution)" in problem
    assert "data.prompt_key='prompt'" in problem
    cfg = load_config(
        PAPER, [f"data.train_files=[{rows}]", "eval.files=[]", "data.prompt_key=question", "data.answer_key=solution"]
    )
    assert check_run(cfg).problems == []


def test_architecture_comes_from_the_checkpoint_and_ignored_overrides_are_named(tmp_path):
    """A 7B of one's own on the 1.5B config: its config.json wins, the inherited numbers are named as ignored."""
    seven = {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(seven))
    arch, where, warnings = architecture(load_config(PAPER, [f"model.path={tmp_path}"]))
    assert arch.hidden == 3584 and where == str(tmp_path / "config.json")
    (warning,) = warnings
    assert "hidden_size=1536 (checkpoint: 3584)" in warning and "model.hf_config_overrides=null" in warning
    cfg = load_config(PAPER, [f"model.path={tmp_path}", "model.hf_config_overrides=null"])
    assert architecture(cfg)[2] == []
    # not on this machine: the overrides' numbers, said so
    arch, where, _ = architecture(load_config(PAPER, ["model.path=elsewhere/models/Qwen-7B"]))
    assert arch.hidden == 1536 and where.startswith(
        "model.hf_config_overrides (model.path elsewhere/models/Qwen-7B is not"
    )
    out = run("train", str(PAPER), "--dry-run", f"model.path={tmp_path}", "parallel.gpus_per_node=8")
    assert f"# architecture: from {tmp_path / 'config.json'}" in out.stdout and "are ignored" in out.stderr


def test_train_on_a_two_process_config_started_once_says_which_command_to_use():
    out = run("train", "configs/quickstart_moe.yaml")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert (
        "= 2 trainer process(es), but 1 started" in line and "real-megatron launch configs/quickstart_moe.yaml" in line
    )
    assert "torchrun --nproc_per_node=2 -m real_megatron.cli train configs/quickstart_moe.yaml" in line


# srun, scontrol and squeue as slurm/train.sbatch calls them inside a one-node job of 8 GPUs: each
# step's command line recorded, launch-plan run for real (the real cluster: tests/system/test_slurm.py)
FAKE_SLURM = {
    "srun": """echo "srun $*" >>"$SRUN_LOG"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
[[ " $* " == *" launch-plan "* ]] && exec "$@"
exit 0""",
    "scontrol": """case "$1 $2" in
  "show hostnames") echo n1 ;;
  "show node") echo "NodeName=n1 NodeAddr=127.0.0.1" ;;
esac""",
    "squeue": "exit 0",
}


def sbatch_steps(tmp_path, config, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "srun.log"
    log.unlink(missing_ok=True)
    job = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "SRUN_LOG": str(log),
        "REAL_MEGATRON_HOME": str(ROOT),
        "REAL_MEGATRON": EXE,
        "SLURM_JOB_ID": "123",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_NTASKS": "8",
        "SLURM_CPUS_PER_TASK": "12",
        "SLURM_GPUS_PER_NODE": "8",
        **env,
    }
    out = subprocess.run(
        ["bash", str(ROOT / "slurm" / "train.sbatch"), f"configs/{config}", f"train.output_dir={tmp_path / 'run'}"],
        env={**{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}, **job},
        capture_output=True,
        text=True,
        timeout=120,
    )
    steps = log.read_text().splitlines()[1:] if log.exists() else []  # after launch-plan's own step
    return out, steps


def test_train_sbatch_runs_a_colocated_config_as_one_launch_step(tmp_path):
    """A colocated config: no fleet step; one step of one task holding the node's 8 GPUs and the 8
    ranks' CPUs runs `real-megatron launch`, which places the servers on the trainer's GPUs."""
    out, steps = sbatch_steps(tmp_path, "real_qwen3_30b_a3b_1node.yaml")
    assert out.returncode == 0, out.stderr
    assert len(steps) == 1, steps
    assert "--nodes=1 --relative=0 --ntasks=1 --gpus-per-node=8 --gpu-bind=none --cpus-per-task=96" in steps[0]
    assert f"--job-name=trainer --output={tmp_path / 'run' / 'logs' / 'launch.log'}" in steps[0]
    assert f"{EXE} launch configs/real_qwen3_30b_a3b_1node.yaml" in steps[0]
    assert "launch starts the colocated ones" in (tmp_path / "run" / "logs" / "job.log").read_text()
    # the split one-node config keeps its two steps: the servers' and the trainer ranks'
    out, steps = sbatch_steps(tmp_path, "real_r1distill_qwen_1p5b_1node.yaml")
    assert out.returncode == 0, out.stderr
    assert len(steps) == 2 and sum(" serve configs/" in s for s in steps) == 1, steps  # started in the background:
    assert sum(" train configs/" in s for s in steps) == 1, steps  # either may reach srun first
    # a heterogeneous job cannot colocate: refused before any step, with the reason
    out, steps = sbatch_steps(tmp_path, "real_qwen3_30b_a3b_1node.yaml", SLURM_HET_SIZE="2")
    assert out.returncode == 2 and steps == [] and "submit a plain one-node job" in out.stderr, out.stderr


def test_a_bad_row_past_the_dry_runs_look_stops_train_before_anything_starts(tmp_path, capsys):
    """The dry run reads each file's first rows; `train` reads every row before any process group or
    model: a bad row 7 is one line naming file, row and the fix, exit 2, no traceback (in-process)."""
    from real_megatron.cli import main

    model = tmp_path / "model"
    model.mkdir()
    tiny = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=100)
    (model / "config.json").write_text(json.dumps(dict(tiny, num_attention_heads=2, num_key_value_heads=1)))
    rows = [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(9)]
    rows[7] = {"prompt": "8 + 1 =", "answer": None}
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "mine.yaml"
    config.write_text(
        f"model: {{path: {model}, dtype: float32}}\n"
        f"data: {{train_files: [{data}], answer_key: answer}}\n"
        "rollout: {backend: local}\n"
        f"train: {{output_dir: {tmp_path / 'run'}}}\n"
    )
    assert main(["train", str(config), "--dry-run"]) == 0  # rows 0-4 are fine
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"data error: {config}: data.train_files: {data}: row 7: no usable ground truth"), line
    assert "set data.skip_malformed=true to skip such rows" in line and "traceback: " in line
