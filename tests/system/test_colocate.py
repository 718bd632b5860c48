"""The colocated layout, for real: `real-megatron launch` of the quickstart with rollout.colocate
starts a CPU SGLang server on the trainer's own devices and the trainer; every step the server
releases its memory (/release_memory_occupation) while the actor comes back from host memory and
trains, then the actor moves out, the server resumes its weights, takes the new ones as tensors in
shared memory (/update_weights_from_tensor) and resumes its KV cache. The engine's log-probs agree
with the actor's recomputed pi_old every step (a stale weight would show at this learning rate); the
trainer is killed with SIGKILL mid-step and the same command resumes it from its checkpoint, training
the dataset order's prompts, each once.

On CPU SGLang has no memory saver (torch_memory_saver is CUDA's): the release and resume calls are
SGLang's own and run (cache flushed, weights' static state stashed and restored), but free nothing.
"""

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
from tiny_run import CPU_SGLANG, QUIET, cli, sglang_env

from real_megatron.config import ConfigError, load_config
from real_megatron.rollout.sglang_env import default_server_python

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "quickstart.yaml"
HAVE_SGLANG = default_server_python() != "python3"
STEPS, PROMPTS = 4, 4


def overrides(tmp_path: Path) -> list[str]:
    return [
        f"train.output_dir={tmp_path / 'run'}",
        f"task.cache_dir={tmp_path / 'cache'}",
        "task.warmstart_max_steps=20",
        "task.warmstart_target=null",
        "task.eval_prompts=8",
        "task.train_prompts=200",
        "eval.k=1",
        "eval.every_steps=0",
        "optim.warmup_steps=0",
        "optim.lr=1.0e-3",
        # the short warm-start solves nothing (uniform groups: no gradient), so the weights move by
        # decoupled weight decay alone: 2% per optimizer step, enough for a stale engine to show
        "optim.weight_decay=20.0",
        "rollout.max_new_tokens=16",
        "eval.max_new_tokens=16",
        f"train.prompts_per_step={PROMPTS}",
        "train.prompts_per_mini_batch=2",
        "actor.prompts_per_micro_batch=2",
        f"train.steps={STEPS}",
        "checkpoint.every_steps=2",
        *QUIET,
        "logging.rollouts=true",
        "rollout.backend=sglang",
        *CPU_SGLANG,
        "rollout.colocate=true",
    ]


def launch(tmp_path: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    env = sglang_env(REAL_MEGATRON_KILL_AT=kill_at)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(
        cli("launch", str(CONFIG), *overrides(tmp_path)),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SGLANG, reason="needs SGLang's environment: run tools/install_sglang.sh")
def test_colocated_run_releases_resumes_takes_tensor_weights_and_resumes_after_a_kill(tmp_path):
    run = tmp_path / "run"
    killed = launch(tmp_path, kill_at="after_update:3")
    assert killed.returncode == 128 + signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "1 SGLang server(s) colocated" in killed.stdout
    resumed = launch(tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trainer_log = (run / "logs" / "trainer.log").read_text()
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} at step 2" in trainer_log

    # the server's own log: per launch, one release per step (and per checkpoint), each resumed in
    # two parts, and one tensor update per resume of the weights (the start's included)
    server_log = (run / "logs" / "sglang_0.log").read_text()
    count = {
        p: len(re.findall(rf"POST /{p} HTTP\S* 200", server_log))
        for p in (
            "release_memory_occupation",
            "resume_memory_occupation",
            "update_weights_from_tensor",
            "begin_weight_update",
            "end_weight_update",
        )
    }
    # first launch: steps 1-2 (+1 checkpoint at 2) and step 3 killed after its update: 4 releases;
    # resumed launch: steps 3-4 (+ checkpoint at 4): 3 releases
    assert count["release_memory_occupation"] == 7, count
    assert count["resume_memory_occupation"] == 2 * 6, count  # the killed step's release is never resumed
    assert count["begin_weight_update"] == count["end_weight_update"] == 2 + 6, count  # + each start's
    assert count["update_weights_from_tensor"] >= count["begin_weight_update"], count
    assert "POST /update_weights_from_disk" not in server_log

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "step_s" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    for m in steps:
        assert all(m[k] >= 0 for k in ("release_s", "onload_s", "offload_s", "resume_s", "weight_update_s")), m
        # the engine sampled with the actor's current weights: pi_old recomputed agrees token by token
        assert m["mismatch_abs_max"] < 1e-3, m
        # one optimizer step moves log-probs by far more (the step's second mini-batch's scores): an
        # engine a version behind would be off by two such steps
        assert max(abs(m["score_neg_min"]), abs(m["score_neg_max"])) > 1e-2, m

    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == list(range(1, STEPS + 1))
    assert all(r["weight_version"] == r["step"] - 1 for r in rows)  # synchronous: never stale
    trained = []
    for step in range(1, STEPS + 1):
        groups = {}
        for r in rows:
            if r["step"] == step:
                groups.setdefault(r["group"], set()).add(r["source"])
        trained += [groups[g].pop() for g in range(PROMPTS)]
    from real_megatron.tasks.inputs import prepare_inputs

    order = prepare_inputs(load_config(CONFIG, overrides(tmp_path))).train_set.next_batch(STEPS * PROMPTS)
    assert trained == [ex.source for ex in order]


def test_colocation_refuses_the_asynchronous_pipeline_and_the_embedded_engine():
    with pytest.raises(ConfigError, match="max_staleness=1.*one of them holds"):
        load_config(CONFIG, ["rollout.backend=sglang", "rollout.colocate=true", "rollout.max_staleness=1"])
    with pytest.raises(ConfigError, match="embedded engine already generates"):
        load_config(CONFIG, ["rollout.colocate=true"])
    with pytest.raises(ConfigError, match="applies to the split layout only"):
        load_config(CONFIG, ["rollout.backend=sglang", "rollout.colocate=true", "rollout.weight_sync=distributed"])
