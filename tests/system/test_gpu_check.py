"""tools/gpu_bundle.sh and tools/gpu_check.sh end to end on CPU, on a machine laid out like the
single-GPU machine the check is written for: a clean checkout (no .venv), a `python3` that is itself
a virtual environment holding torch, transformers, safetensors and triton but no megatron-core, and
the bundle carried beside the checkout. --cpu-dry-run runs every item at toy size (Triton
interpreted); on a GPU the same script runs the real sizes."""

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("REAL_MEGATRON_CACHE", Path.home() / ".cache" / "real-megatron"))
pytestmark = [pytest.mark.slow]
ITEMS = (
    "(a) Triton kernels",
    "(b) actor step",
    "(c) bf16 step",
    "(g) block recompute",
    "(h) Qwen3-MoE step",
    "(e) logits",
    "(d) checkpoint resume",
    "(i) colocated actor offload",
    "(a) kernel benchmark",
    "(f) actor data path",
)


def machine_python() -> Path:
    """A venv like the GPU machine's python: torch, transformers, safetensors, triton (this
    machine's versions), no megatron-core, no pytest. Made once and kept in the cache."""
    pins = [f"{name}=={md.version(name)}" for name in ("torch", "transformers", "safetensors", "triton", "numpy")]
    venv = CACHE / ("venv-gpu-machine-" + "-".join(p.split("==")[1] for p in pins[:2]).replace("+", "_"))
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
            check=True,
            timeout=1200,
        )
        (venv / ".complete").touch()
    return python


def clean_checkout(dest: Path) -> Path:
    """The working tree as a fresh clone of it would be: tracked and not-ignored files only."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
            (dest / name).chmod(src.stat().st_mode)
    return dest


def test_the_bundle_for_the_gpu_machine_carries_megatron_core_0_19_for_python_3_12(tmp_path):
    made = subprocess.run(
        [str(ROOT / "tools" / "gpu_bundle.sh"), "--out", str(tmp_path / "bundle")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    wheels = sorted(p.name for p in (tmp_path / "bundle" / "wheels").iterdir())
    assert any(w.startswith("megatron_core-0.19.") and "cp312" in w for w in wheels), wheels
    size = sum(p.stat().st_size for p in (tmp_path / "bundle").rglob("*") if p.is_file())
    assert size < 32 * 2**20, f"the bundle is {size / 2**20:.1f} MiB; at most 64 MiB travel with the checkout"


def test_the_check_on_a_machine_laid_out_like_the_gpu_machine(tmp_path):
    python = machine_python()
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import sys, importlib.util as u; print(sys.prefix != sys.base_prefix, "
            "u.find_spec('megatron') is None, u.find_spec('torch') is not None)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.stdout.split() == ["True", "True", "True"], probe  # a venv, without megatron-core, with torch

    clone = clean_checkout(tmp_path / "checkout")
    assert not (clone / ".venv").exists()
    made = subprocess.run(
        [str(ROOT / "tools" / "gpu_bundle.sh"), "--python-version", "3.11", "--out", str(clone / "gpu_bundle")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{python.parent}:{env['PATH']}"  # `python3` is the machine's venv, as there

    # the deadline: with no time left every item is logged SKIP, and the run says it did not pass
    hurried = subprocess.run(
        [str(clone / "tools" / "gpu_check.sh"), "--cpu-dry-run", "--budget-s", "1", "--out", str(tmp_path / "hurried")],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert hurried.returncode == 1, hurried.stdout + hurried.stderr
    skipped = (tmp_path / "hurried" / "gpu_check.log").read_text()
    assert all(f"SKIP {item}" in skipped for item in ITEMS), skipped

    check = subprocess.run(
        [str(clone / "tools" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(tmp_path / "out")],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert check.returncode == 0, check.stdout[-3000:] + log[-3000:]
    installed = next(line for line in log.splitlines() if line.startswith("gpu_check: installed"))
    assert "megatron_core-0.16.1" in installed and "pytest" in installed  # from the bundle onto PYTHONPATH: no venv
    assert "python 3.11" in log and "megatron-core 0.16.1" in log and "nccl none (no CUDA)" in log
    assert "transformer_engine absent apex absent ; layer spec: bf16 local fp32 local" in log
    for item in ITEMS:
        assert f"PASS {item}" in log, log[-3000:]
    assert "FAIL" not in log and "SKIP" not in log
    # (b) names the tensor that differs most, against this machine's CPU and against the bundle
    assert (
        "vs this machine CPU: max relative difference over 51 tensors: 0.000e+00 (tolerance 1e-05), largest in" in log
    )
    assert "max relative difference over 51 tensors: 0.000e+00 (tolerance 0)" in log  # (d), bit for bit
    assert "auto picks: dp_reshardable real_r1distill_qwen_1p5b.yaml;dp_reshardable real_r1distill_qwen_7b.yaml" in log
    assert "first_update_s_abs_max 0.000e+00 routing_mismatch_frac 0.0000" in log  # (h): replayed, s̄ = 0
    assert "host syncs: not counted (torch.cuda.set_sync_debug_mode needs CUDA)" in log  # (c) on CPU
    assert all(k in log for k in ("lse ", "grad ", "TFLOP/s", "GB/s"))  # the kernel benchmark's two tables
    assert "| tokens/s" in log and "packed+fused" in log  # (f): the data path table
    assert '"bit_identical": true' in log and '"ok": true' in log  # (i): offloaded and back, bit for bit
    # what comes back is a few files, no deeper than one folder; scratch stayed under /tmp
    returned = [p for p in (tmp_path / "out").rglob("*")]
    assert sorted(p.name for p in returned) == [
        "bench_kernels.json",
        "gpu_check.log",
        "gpu_offload.json",
        "gpu_step.json",
        "gpu_step_block.json",
    ], returned
    assert not list(clone.rglob("pyvenv.cfg"))
