"""Every tools/bench_*.py runs at its smallest setting and prints its table, so a change elsewhere
cannot silently break a benchmark (the figures themselves are for humans; docs/RESULTS.md).
tools/bench_kernels.py's run is tests/unit/test_bench_kernels.py; tools/bench_actor.py's is item (f)
of the GPU check's CPU dry run, whose table tests/system/test_gpu_check.py asserts (and
tests/integration/test_memory_measured.py holds its figures to the memory estimate); bench_kernels runs there too."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import server_ports

from real_megatron.rollout.sglang_env import default_server_python

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]


def tiny_quickstart(tmp_path: Path) -> list[str]:
    """The quickstart at its smallest: a 20-step warm start in a fresh cache, 2 prompts x 2 samples."""
    return [
        f"task.cache_dir={tmp_path / 'cache'}",
        "task.warmstart_max_steps=20",
        "task.warmstart_target=null",
        "task.eval_prompts=24",
        "task.train_prompts=400",
        "rollout.max_new_tokens=8",
        "train.prompts_per_step=2",
        "train.prompts_per_mini_batch=2",
        "actor.prompts_per_micro_batch=2",
        "rollout.n_samples=2",
    ]


def test_bench_async_runs_several_runs_against_one_server_with_one_key(tmp_path):
    """Two runs attached one after the other to the one server it starts: both get through (each
    names the benchmark's key file; a run's own key would be refused) and the table is printed."""
    assert default_server_python() != "python3", "SGLang's environment is missing: run tools/install_sglang.sh"
    out = subprocess.run(
        [sys.executable, "tools/bench_async.py", "--steps", "1", "--warmup", "0", "--staleness", "0", "1"]
        + ["--out", str(tmp_path / "out"), *tiny_quickstart(tmp_path), f"rollout.server_base_port={server_ports()}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    measured = out.stdout.split("PROJECTION")[0]  # the measured table, not the projection after it
    rows = [line for line in measured.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2 and "| max_staleness | batches/h | vs sync |" in out.stdout, out.stdout
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "fleet_api_key").exists()


def test_bench_trainer_prints_its_table(tmp_path):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL is not installed (the optional extra: pip install -e '.[bench]'): bench_trainer not run")
    out = subprocess.run(
        [sys.executable, "tools/bench_trainer.py", "--steps", "1", "--warmup", "0", *tiny_quickstart(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "| seconds per rollout batch |" in out.stdout, out.stdout
