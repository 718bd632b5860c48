"""The installed `real-megatron` command, run as a user runs it (a subprocess of the venv's script)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from real_megatron import __version__

ROOT = Path(__file__).resolve().parents[2]
EXE = shutil.which("real-megatron", path=str(Path(sys.executable).parent))


def run(*args, cwd=ROOT):
    assert EXE, "real-megatron is not installed next to this Python (run tools/install.sh)"
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"real-megatron {__version__}"
    out = run("--help")
    assert out.returncode == 0 and "train" in out.stdout
    out = run("train", "--help")
    assert out.returncode == 0 and "--dry-run" in out.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_dry_run_prints_resolved_config_and_layout(config):
    out = run("train", f"configs/{config}", "--dry-run", "optim.weight_decay=0.02")
    assert out.returncode == 0, out.stderr
    assert "weight_decay: 0.02" in out.stdout
    assert "# parallel layout" in out.stdout and "dp=" in out.stdout
    assert out.stdout.rstrip().endswith("config OK")


def test_dry_run_layout_of_a_cluster_config():
    out = run("train", "configs/real_r1distill_qwen_7b.yaml", "--dry-run")
    assert "world size 16 = 2 node(s) x 8 process(es); tp=2 pp=1 cp=1 dp=8" in out.stdout
    assert len([line for line in out.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]) == 16


def test_bad_config_exits_2_with_the_reason(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  n_sample: 8\n")
    out = run("train", str(bad), "--dry-run")
    assert out.returncode == 2
    assert f"{bad}: unknown key 'rollout.n_sample'; did you mean 'rollout.n_samples'" in out.stderr
    out = run("train", "configs/quickstart.yaml", "--dry-run", "parallel.gpus_per_node=3", "parallel.tp=2")
    assert out.returncode == 2 and "not divisible by tp*pp*cp" in out.stderr
