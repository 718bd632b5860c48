"""One NCCL on both sides of the weight broadcast (real_megatron/rollout/nccl_check.py): the refusal
and its fix, and the versions as a real SGLang environment's python reports them."""

import subprocess
import sys
from pathlib import Path

import pytest

from real_megatron.config import load_config
from real_megatron.rollout.nccl_check import TorchBuild, check_weight_sync_nccl, nccl_mismatch, query_build
from real_megatron.rollout.sglang_env import default_server_python

ROOT = Path(__file__).resolve().parents[2]
TRAINER = TorchBuild("/opt/cluster/bin/python", "2.13.0+cu128", (2, 27, 3))
SERVER = TorchBuild("/home/u/.cache/real-megatron/venv-sglang-0.5.23/bin/python", "2.14.1+cu130", (2, 30, 7))


def test_a_mismatch_is_refused_with_both_versions_and_the_fix():
    problem = nccl_mismatch(TRAINER, SERVER)
    for part in ("NCCL 2.27.3", "NCCL 2.30.7", "Mismatched NCCL version", "rollout.weight_sync=disk", SERVER.python):
        assert part in problem
    assert nccl_mismatch(TRAINER, TorchBuild("/other", "2.13.0+cu128", (2, 27, 3))) is None  # one NCCL: fine
    assert nccl_mismatch(TorchBuild("/cpu", "2.13.0+cpu", None), SERVER) is None  # gloo group: no NCCL
    # a CPU-only server torch cannot join an NCCL group either
    assert "no NCCL (CPU build)" in nccl_mismatch(TRAINER, TorchBuild("/s", "2.14.1+cpu", None))
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["rollout.backend=sglang", "rollout.weight_sync=distributed"])
    compared, refused = check_weight_sync_nccl(cfg, TRAINER, SERVER)
    assert refused == nccl_mismatch(TRAINER, SERVER) and "servers torch 2.14.1+cu130" in compared


def test_the_versions_each_torch_reports_in_a_subprocess():
    """This trainer's CPU torch has no NCCL; SGLang's environment (a CUDA build) reports its own, on
    any machine: compared with a trainer on that NCCL it passes, on another it is refused."""
    here = query_build(sys.executable)
    assert here.nccl is None or len(here.nccl) == 3
    server_python = default_server_python()
    if server_python == "python3":
        pytest.skip("SGLang's environment is not installed (tools/install_sglang.sh)")
    server = query_build(server_python)
    assert server.python == server_python and len(server.nccl) == 3 and all(isinstance(x, int) for x in server.nccl)
    same = TorchBuild("/trainer", "2.x", server.nccl)
    other = TorchBuild("/trainer", "2.x", (server.nccl[0], server.nccl[1] + 1, 0))
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["rollout.backend=sglang", "rollout.weight_sync=distributed"])
    assert check_weight_sync_nccl(cfg, same)[1] is None
    assert "Mismatched NCCL version" in check_weight_sync_nccl(cfg, other)[1]
    with pytest.raises(RuntimeError, match="could not ask /nonexistent/python"):
        query_build("/nonexistent/python")


def test_dry_run_says_what_the_weight_broadcast_compares():
    if default_server_python() == "python3":
        pytest.skip("SGLang's environment is not installed (tools/install_sglang.sh)")
    out = subprocess.run(
        [sys.executable, "-m", "real_megatron.cli", "train", "configs/quickstart.yaml", "--dry-run"]
        + ["rollout.backend=sglang", "rollout.weight_sync=distributed"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("# weight broadcast: "))
    assert f"servers torch {query_build(default_server_python()).torch}" in line
