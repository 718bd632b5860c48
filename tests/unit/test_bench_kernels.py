"""tools/bench_kernels.py runs end to end (tiny shapes; the figures themselves are for humans)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_kernels_prints_a_table_of_ratios(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "tools/bench_kernels.py",
            "--tokens",
            "64",
            "--hidden",
            "32",
            "--vocab",
            "3000",
            "--json",
            str(tmp_path / "bench.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["naive"], ["token"], ["linear"])]
    assert [r[0] for r in rows] == ["naive", "token", "linear"]
    assert float(rows[0][2]) == 1.0  # ratios are against naive, measured in the same run
    assert "TFLOP/s" in out.stdout and "GB/s" in out.stdout
    kernels = [line.split()[0] for line in out.stdout.splitlines() if line.split()[:1] in (["lse"], ["grad"])]
    assert kernels == ["lse", "grad"]  # the bandwidth-bound kernels, timed alone
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert all(results[m]["seconds"] > 0 and results[m]["peak_extra_bytes"] > 0 for m in ("naive", "token", "linear"))
    assert results["grad"]["bytes"] == 2 * results["lse"]["bytes"] == 2 * 64 * 3000 * 4
