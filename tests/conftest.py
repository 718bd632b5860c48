import os
import sys
from pathlib import Path

import pytest

# Tests sit in tier folders (unit, integration, system, gpu); what they share is in tests/support
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before
# real_megatron.kernels (and triton) are imported.
# The kernels' value checks (index and target ids in range, a device sync each) stay on in every
# test and every process a test starts, the training step's included (real runs turn them off there).
os.environ.setdefault("REAL_MEGATRON_KERNEL_CHECKS", "1")

ON_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))  # inside one of pytest-xdist's workers

# On one of the suite's two workers (below), a test and every process it starts compute on one
# thread unless the test says otherwise: two workers with a thread per core each would
# oversubscribe the machine, and waiting OpenMP threads then spin on the cores the other needs.
if ON_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

try:
    import torch

    if ON_WORKER:
        torch.set_num_threads(1)

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


# The whole suite (`pytest` without paths) runs on two workers, one test file on each at a time:
# most tests wait on processes they start (imports, a server coming up, a rank-0 phase) and leave
# a core idle, which the other worker's file uses. A file stays on one worker, so what its tests
# share (a module's SGLang server, a Slurm cluster, a cache they fill) is never used twice at once;
# the servers a worker's runs launch take that worker's own ports (tests/support/tiny_run.py).
# Paths on the command line, or -n, choose otherwise (`pytest -n 0` runs in one process).
SUITE_WORKERS = 2
# the longest tier first, so that the two workers finish together (unit files fill the end)
TIER_ORDER = ("system", "integration", "unit", "gpu")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if not hasattr(config.option, "numprocesses") or ON_WORKER:
        return  # without pytest-xdist, or inside one of its workers
    if config.option.numprocesses is None and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        if not config.option.collectonly and not config.getoption("usepdb", False):
            config.option.numprocesses = SUITE_WORKERS
            config.option.dist = "loadfile"
            config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    if not ON_WORKER:
        return

    def tier(item) -> int:
        folder = Path(str(item.path)).parent.name
        return TIER_ORDER.index(folder) if folder in TIER_ORDER else len(TIER_ORDER)

    items.sort(key=tier)  # stable: files keep their order within a tier
