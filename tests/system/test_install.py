"""The README's two commands, .ci/run and tools/install.sh agree, and the install is idempotent."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_starts_with_two_commands_and_ci_runs_the_second():
    quickstart, tests = readme_commands()
    assert "\n" not in quickstart and "\n" not in tests
    assert quickstart.startswith("tools/install.sh && ") and "real-megatron train configs/quickstart.yaml" in quickstart
    assert tests.startswith("tools/install.sh ") and tests.endswith(".venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == tests  # verbatim


def test_install_is_idempotent_and_keeps_torch():
    first = subprocess.run(["bash", "tools/install.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run(["bash", "tools/install.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "is up to date" in second.stdout
    assert "pip" not in second.stdout.lower() and not second.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine keeps its own torch")
def test_cpu_machine_has_the_cpu_torch_build():
    import torch

    assert torch.__version__ == "2.13.0+cpu", torch.__version__
