"""slurm/train.sbatch on a real Slurm cluster on localhost (tools/slurm_local.sh: slurmctld, two
slurmd virtual nodes, munge). The fleet component runs a real CPU SGLang server on node n1 and the
trainer runs on n2, both as steps of one job.

Checks: a short quickstart completes (COMPLETED, exit 0, checkpoint, metrics, a log per
component); USR1 to the batch script makes the trainer checkpoint at a step boundary, the job
requeues itself and resumes from that step to the same final step count; scancel mid-run leaves no
process of the job behind.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import CPU_SGLANG

from real_megatron.rollout.sglang_env import default_server_python

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.slurm]
SHORT = [
    "task.warmstart_max_steps=20",
    "task.warmstart_target=null",
    "task.eval_prompts=24",
    "task.train_prompts=400",
    "eval.k=2",
    "eval.every_steps=0",
    "optim.warmup_steps=1",
    "rollout.max_new_tokens=24",
    "eval.max_new_tokens=24",
    "train.prompts_per_step=8",
    "train.prompts_per_mini_batch=4",
    "actor.prompts_per_micro_batch=2",
    "logging.progress_bar=false",
]
HAVE_SGLANG = default_server_python() != "python3"


def run(cmd, env=None, timeout=120, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cluster():
    script = ROOT / "tools" / "slurm_local.sh"
    was_up = "slurmctld: up" in run(["bash", str(script), "status"], check=False).stdout
    out = run(["bash", str(script), "up"], timeout=600).stdout.strip().splitlines()
    assert out[-1].startswith("export SLURM_CONF="), out  # the last line of `up` is for `eval`
    env = dict(os.environ, SLURM_CONF=out[-1].split("=", 1)[1])
    again = run(["bash", str(script), "up"], timeout=120).stdout.strip().splitlines()  # idempotent
    assert again[-1] == out[-1]
    yield env
    if not was_up:
        run(["bash", str(script), "down"], timeout=120, check=False)


PLAIN = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
# heterogeneous: component 0 (the fleet) and component 1 (the trainer), one node each
# one node split between the trainer's step and the fleet's: a task each
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
HETEROGENEOUS = [
    "--nodes=1",
    "--ntasks-per-node=1",
    "--gpus-per-node=0",
    "--cpus-per-task=1",
    ":",
    "--nodes=1",
    "--ntasks-per-node=1",
    "--gpus-per-node=0",
    "--cpus-per-task=1",
]


class Job:
    def __init__(self, env, tmp: Path, steps: int, *overrides, layout=PLAIN, server_host="127.0.0.1"):
        self.env, self.run_dir = env, tmp / "run"
        backend = ["rollout.backend=sglang", *CPU_SGLANG] if HAVE_SGLANG else ["rollout.backend=local"]
        if not HAVE_SGLANG:
            fleet_only = ("rollout.weight_sync", "rollout.max_staleness", "rollout.fleet_nodes")
            overrides = tuple(o for o in overrides if not o.startswith(fleet_only))
        submit_env = dict(
            env,
            REAL_MEGATRON_HOME=str(ROOT),
            SGLANG_USE_CPU_ENGINE="1",
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "support"), str(ROOT)]),  # this checkout
        )
        submit_env.pop("SERVER_HOST", None)
        submit_env.pop("RUN_DIR", None)  # the run directory follows the config: train.output_dir below
        if server_host:
            submit_env["SERVER_HOST"] = server_host
        out = run(
            [
                "sbatch",
                "--parsable",
                "--time=30",
                f"--output={tmp / 'job.out'}",
                *layout,
                str(ROOT / "slurm" / "train.sbatch"),
                str(ROOT / "configs" / "quickstart.yaml"),
                f"task.cache_dir={tmp.parent / 'task-cache'}",
                f"train.steps={steps}",
                f"train.output_dir={self.run_dir}",
                *SHORT,
                *backend,
                *overrides,
            ],
            env=submit_env,
        )
        self.id = out.stdout.strip().split(";")[0]
        self.tmp = tmp

    def show(self) -> str:
        return run(["scontrol", "-o", "show", "job", self.id], env=self.env).stdout

    def field(self, name: str) -> str:
        return re.search(rf"\b{name}=(\S+)", self.show()).group(1)

    def wait(self, timeout=900) -> int:
        proc = run(
            ["bash", str(ROOT / "tools" / "slurm_local.sh"), "wait", self.id, str(timeout)],
            env=self.env,
            timeout=timeout + 30,
            check=False,
        )
        return proc.returncode

    def wait_for(self, what, predicate, timeout=600):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.field("JobState") in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), self.diagnostics()
            assert time.monotonic() < deadline, f"job {self.id}: no {what} after {timeout}s\n{self.diagnostics()}"
            time.sleep(1)

    def steps_logged(self) -> list[int]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["step"] for line in path.read_text().splitlines() if "reward_mean" in line]

    def diagnostics(self) -> str:
        parts = [self.show()]
        for path in [self.tmp / "job.out", *sorted((self.run_dir / "logs").glob("*.log"))]:
            if path.exists():
                parts.append(f"== {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)


def test_quickstart_job_completes_with_checkpoint_metrics_and_a_log_per_component(cluster, tmp_path):
    if not HAVE_SGLANG:
        print("SGLang's environment is not installed: the job uses the embedded engine (no fleet step)")
    # weights reach the server by broadcast here (a gloo group across job steps), from disk in the
    # preemption test below
    job = Job(cluster, tmp_path, 4, "checkpoint.every_steps=2", "rollout.weight_sync=distributed")
    assert job.wait() == 0, job.diagnostics()
    assert job.field("JobState") == "COMPLETED" and job.field("ExitCode") == "0:0"
    run_dir = job.run_dir
    assert job.steps_logged() == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_samples"] == 48
    trainer_log = (run_dir / "logs" / "trainer.log").read_text()
    assert "pass@1 after RL" in trainer_log
    if HAVE_SGLANG:
        fleet_log = (run_dir / "logs" / "fleet.log").read_text()
        assert "SGLang server 0 ready at http://127.0.0.1:" in fleet_log and "stopped on SIGTERM" in fleet_log
        assert "POST /generate" in (run_dir / "logs" / "sglang_0.log").read_text()
        assert "POST /update_weights_from_distributed" in (run_dir / "logs" / "sglang_0.log").read_text()
        assert not list((run_dir / "servers").glob("*.json"))  # the server unregistered itself
    assert "trainer exited with code 0" in (run_dir / "logs" / "job.log").read_text()
    # The same command, resubmitted (a new job id), resumes in the config's run directory; a lock
    # left by a job that no longer runs (as kill -9 leaves it) is taken over.
    assert not (run_dir / "job.lock").exists()  # released when the job ended
    (run_dir / "job.lock").write_text(f"{job.id}\n")
    again = Job(cluster, tmp_path, 6, "checkpoint.every_steps=2", "rollout.weight_sync=distributed")
    assert again.id != job.id and again.wait() == 0, again.diagnostics()
    assert again.steps_logged() == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 only, appended
    assert (
        f"resumed from {run_dir / 'checkpoints' / 'step_000004'} at step 4"
        in (run_dir / "logs" / "trainer.log").read_text()
    )
    assert f"lock of job {job.id} found, which no longer runs" in (run_dir / "logs" / "job.log").read_text()


@pytest.mark.skipif(
    not HAVE_SGLANG, reason="a heterogeneous job's first component is the SGLang fleet: run tools/install_sglang.sh"
)
def test_heterogeneous_job_runs_the_fleet_and_the_trainer_as_its_two_components(cluster, tmp_path):
    # dynamic sampling through the fleet; SGLang's log-probs against the actor's pi_old on every step
    job = Job(
        cluster, tmp_path, 2, "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=2", layout=HETEROGENEOUS
    )
    assert job.wait() == 0, job.diagnostics()
    assert re.findall(r"JobState=(\S+)", job.show()) == ["COMPLETED", "COMPLETED"]
    job_log = (job.run_dir / "logs" / "job.log").read_text()
    assert "trainer 1x1 on n2" in job_log and "trainer exited with code 0" in job_log
    assert "SGLang server 0 ready" in (job.run_dir / "logs" / "fleet.log").read_text()
    assert job.steps_logged() == [1, 2]
    rows = [
        json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines() if "reward_mean" in line
    ]
    for row in rows:
        assert row["prompts_generated"] == 8 * row["sampling_rounds"] and row["sampling_rounds"] in (1, 2), row
        # a float32 CPU server: the engine's log-probs agree with the actor's to rounding
        assert 0 <= row["mismatch_abs_mean"] < 1e-3 and row["mismatch_frac"] == 0.0, row
        assert row["first_update_score_abs_max"] < 1e-5, row


def test_one_node_async_job_usr1_checkpoints_requeues_and_resumes_to_the_same_final_step(cluster, tmp_path):
    # `sbatch --nodes=1`: trainer and server share the node (a step each, servers on loopback by
    # default), rollouts generated one version ahead; the only checkpoint is the signal's
    job = Job(
        cluster,
        tmp_path,
        8,
        "checkpoint.every_steps=100",
        "rollout.fleet_nodes=0",
        "rollout.max_staleness=1",
        "logging.rollouts=true",
        layout=ONE_NODE,
        server_host=None,
    )
    job.wait_for("step 2 in metrics.jsonl", lambda: len(job.steps_logged()) >= 2)
    # a second job on the same run directory (the other node) refuses, naming the first (checked
    # below: the first holds its lock while running and while requeued)
    (tmp_path / "second").mkdir()
    second = Job(cluster, tmp_path / "second", 8, f"train.output_dir={job.run_dir}", layout=ONE_NODE, server_host=None)
    # what --signal=B:USR1@300 does before the time limit: USR1 to the batch script only
    run(["scancel", "--signal=USR1", "--batch", job.id], env=cluster)
    job.wait_for("requeue", lambda: job.field("Restarts") == "1")
    job.wait_for("the job back in the queue", lambda: job.field("JobState") in ("PENDING", "RUNNING"))
    # a requeued job is held for ~2 minutes by slurmctld (its begin time): release it now
    run(["scontrol", "update", f"jobid={job.id}", "StartTime=now"], env=cluster, check=False)
    assert job.wait() == 0, job.diagnostics()
    assert job.field("JobState") == "COMPLETED" and job.field("Restarts") == "1"
    assert second.wait(timeout=120) != 0
    refusal = (tmp_path / "second" / "job.out").read_text()
    assert f"the run directory {job.run_dir} is in use by job {job.id}" in refusal, refusal
    checkpoints = sorted(p.name for p in (job.run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 1, checkpoints
    stopped_at = int(checkpoints[0].split("_")[1])
    assert 2 <= stopped_at < 8
    log = (job.run_dir / "logs" / "trainer.log").read_text()
    assert f"stopped at step {stopped_at} with a checkpoint" in log
    assert f"resumed from {job.run_dir / 'checkpoints' / checkpoints[0]} at step {stopped_at}" in log
    assert job.steps_logged() == list(range(1, 9))  # every step once, through the restart
    job_log = (job.run_dir / "logs" / "job.log").read_text()
    assert "trainer exited with code 75" in job_log and "requeueing" in job_log and "restart 1]" in job_log
    assert "trainer 1x1 on n1" in job_log
    assert json.loads((job.run_dir / "summary.json").read_text())["steps"] == 8
    if HAVE_SGLANG:
        assert "SGLang server 0 ready at http://127.0.0.1:" in (job.run_dir / "logs" / "fleet.log").read_text()
        assert "POST /generate" in (job.run_dir / "logs" / "sglang_0.log").read_text()
        rows = [json.loads(line) for line in (job.run_dir / "rollouts.jsonl").read_text().splitlines()]
        assert sorted({r["step"] for r in rows}) == list(range(1, 9))
        assert {r["step"] - 1 - r["weight_version"] for r in rows} == {0, 1}  # ahead by one, never more
        prompts = {(r["step"], r["group"]): r["source"] for r in rows}
        assert len(prompts) == len(set(prompts.values())) == 8 * 8, "a prompt trained on twice across the requeue"


def job_processes(job_id: str) -> list[str]:
    """Command lines of live processes that belong to the job (its id in their environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={job_id}".encode() in environ:
                found.append(
                    f"{proc.name}: " + (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
        except OSError:
            continue
    return found


def test_scancel_mid_run_leaves_no_process_of_the_job(cluster, tmp_path):
    """A colocated config where SGLang is installed (one step running `real-megatron launch`, which
    starts the server on the trainer's node itself: the processes Slurm must still reach), else the
    embedded engine on two nodes."""
    if HAVE_SGLANG:
        layout, extra = (
            ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2"],
            ["rollout.colocate=true"],
        )
    else:
        layout, extra = [a.replace("--cpus-per-task=1", "--cpus-per-task=2") for a in PLAIN], []
    job = Job(cluster, tmp_path, 50, *extra, layout=layout)
    job.wait_for("step 1 in metrics.jsonl", lambda: len(job.steps_logged()) >= 1)
    assert job_processes(job.id), "the running job's processes should be visible"
    # each step's tasks get the job's --cpus-per-task (Slurm >= 22.05 would give srun steps one CPU)
    steps = run(["scontrol", "-o", "show", "step", job.id], env=cluster).stdout
    cpus = {m.group(2): int(m.group(1)) for m in re.finditer(r"CPUs=(\d+) Tasks=\d+ Name=(\S+)", steps)}
    assert cpus.get("trainer") == 2 and cpus.get("fleet", 2) == 2, steps
    if HAVE_SGLANG:  # no fleet step: the launch in the trainer's step started the colocated server
        assert "fleet" not in cpus, steps
        assert "launch starts the colocated ones" in (job.run_dir / "logs" / "job.log").read_text()
        assert any("real_megatron.cli serve" in p or " serve " in p for p in job_processes(job.id)), job_processes(
            job.id
        )
    run(["scancel", job.id], env=cluster)
    job.wait()
    assert job.field("JobState") == "CANCELLED"
    deadline = time.monotonic() + 60
    while job_processes(job.id) and time.monotonic() < deadline:
        time.sleep(1)
    assert job_processes(job.id) == [], "left behind:\n" + "\n".join(job_processes(job.id))


def submit(cluster, tmp_path, script, *args, options=()) -> str:
    env = dict(cluster, REAL_MEGATRON_HOME=str(ROOT))
    out = run(
        [
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=20",
            f"--output={tmp_path / (script + '.out')}",
            *options,
            str(ROOT / "slurm" / script),
            *map(str, args),
        ],
        env=env,
    )
    return out.stdout.strip().split(";")[0]


def finish(cluster, tmp_path, script, job_id, timeout=600) -> str:
    proc = run(
        ["bash", str(ROOT / "tools" / "slurm_local.sh"), "wait", job_id, str(timeout)],
        env=cluster,
        timeout=timeout + 30,
        check=False,
    )
    log = (tmp_path / (script + ".out")).read_text(errors="replace")
    assert proc.returncode == 0, f"{script} job {job_id}: {proc.stderr}\n{log[-4000:]}"
    return log


def test_convert_job_round_trips_across_two_nodes_bit_identical(cluster, tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "integration"))  # the conversion tests' checkpoint makers
    from test_convert import hf_tensors, make_tokenizer
    from test_logits_parity import make_checkpoint

    src = tmp_path / "hf"
    make_checkpoint(src, "qwen2_tied")
    make_tokenizer(src)
    # hf -> megatron with TP=2: two tasks, one on each virtual node
    job = submit(
        cluster,
        tmp_path,
        "convert.sbatch",
        "hf-to-megatron",
        "--hf",
        src,
        "--out",
        tmp_path / "mcore",
        "--tp",
        2,
        options=["--ntasks=2", "--nodes=2"],
    )
    log = finish(cluster, tmp_path, "convert.sbatch", job)
    assert "2 task(s)" in log and "exit code 0" in log
    job = submit(
        cluster,
        tmp_path,
        "convert.sbatch",
        "megatron-to-hf",
        "--ckpt",
        tmp_path / "mcore",
        "--out",
        tmp_path / "back",
        options=["--ntasks=1"],
    )
    finish(cluster, tmp_path, "convert.sbatch", job)
    original, back = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert set(original) == set(back)
    assert all(torch_equal(original[name], back[name]) for name in original)


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


def test_eval_job_writes_the_report(cluster, tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from test_convert import make_tokenizer
    from test_logits_parity import make_checkpoint

    model = tmp_path / "model"
    make_checkpoint(model, "qwen2_tied")
    make_tokenizer(model)
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 2 =", "answer": str(i + 2)}) + "\n" for i in range(5)))
    report = tmp_path / "report.json"
    job = submit(
        cluster,
        tmp_path,
        "eval.sbatch",
        model,
        "--data",
        data,
        "--answer-key",
        "answer",
        "--k",
        3,
        "--max-new-tokens",
        4,
        "--out",
        report,
        options=["--export=ALL,BACKEND=local"],
    )
    log = finish(cluster, tmp_path, "eval.sbatch", job)
    result = json.loads(report.read_text())
    assert result["benchmarks"]["tiny"]["samples"] == 15 and result["k"] == 3
    assert "| Model | tiny | Avg. |" in log
