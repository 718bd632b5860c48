"""tools/gpu_bundle.sh and tools/gpu_check.sh end to end on CPU (--cpu-dry-run: every item at toy
size, Triton interpreted); on a GPU the same script runs the real sizes."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]


def test_bundle_then_cpu_dry_run_of_the_gpu_check(tmp_path):
    bundle = subprocess.run([str(ROOT / "tools" / "gpu_bundle.sh"), "--out", str(tmp_path / "bundle")],
                            capture_output=True, text=True, timeout=600)
    assert bundle.returncode == 0, bundle.stdout[-2000:] + bundle.stderr[-2000:]
    wheels = [p.name for p in (tmp_path / "bundle" / "wheels").iterdir()]
    assert any(w.startswith("megatron_core-") and "cp312" in w for w in wheels), wheels
    check = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--cpu-dry-run", "--bundle", str(tmp_path / "bundle"),
                            "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=900)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert check.returncode == 0, check.stdout[-3000:] + log[-3000:]
    for item in "abcdef":
        assert f"PASS ({item})" in check.stdout, check.stdout
    assert "FAIL" not in check.stdout
    assert "max relative difference over 51 tensors: 0.000e+00 (tolerance 0)" in log  # (d): bit for bit
    assert "| tokens/s" in log and "packed+fused" in log  # (f): the data path table
