import os
import sys
from pathlib import Path

# Tests sit in tier folders (unit, integration, system, gpu); what they share is in tests/support
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before
# real_megatron.kernels (and triton) are imported.
# The kernels' value checks (index and target ids in range, a device sync each) stay on in every
# test and every process a test starts, the training step's included (real runs turn them off there).
os.environ.setdefault("REAL_MEGATRON_KERNEL_CHECKS", "1")

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


def pytest_configure(config):
    """The megatron-core tiers (tests/integration/test_megatron_core_019.py) name the release they mean to test:
    REAL_MEGATRON_EXPECT_MCORE (a version) and REAL_MEGATRON_EXPECT_MCORE_DIR (the folder it must be
    imported from), so a PYTHONPATH that silently fell back to the venv's release stops the run."""
    expected = os.environ.get("REAL_MEGATRON_EXPECT_MCORE")
    folder = os.environ.get("REAL_MEGATRON_EXPECT_MCORE_DIR")
    if not expected and not folder:
        return
    import megatron.core
    import pytest

    found, where = megatron.core.__version__, os.path.realpath(megatron.core.__file__)
    if expected and found != expected:
        raise pytest.UsageError(
            f"REAL_MEGATRON_EXPECT_MCORE={expected} but megatron.core {found} was imported from {where}"
        )
    if folder and not where.startswith(os.path.realpath(folder) + os.sep):
        raise pytest.UsageError(
            f"megatron.core was imported from {where}, not from REAL_MEGATRON_EXPECT_MCORE_DIR={folder}"
        )
