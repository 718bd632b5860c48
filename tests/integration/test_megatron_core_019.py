"""The megatron-core 0.19 tier: clusters with Python 3.12 install megatron-core 0.19.x, whose only
wheel is cp312; its Python code runs on this venv's 3.11. tools/mcore_sources.sh unzips the 0.19.2
wheel into the cache, and a pytest child runs with that folder on PYTHONPATH, ahead of the venv's
0.16.1 (tests/conftest.py stops the child unless megatron.core is 0.19.2 from that folder).

What the child runs (SELECTION):
- tests/integration/test_checkpoint_specs.py: checkpoints between the local spec and TE's naming (0.19 builds
  the MLP spec as a functools.partial);
- tests/integration/test_actor_parity.py's parity layouts (TP=2, PP=2 with 2 micro-batches, DP=2,
  4 micro-batches) against one process and bit-identical resume;
- tests/integration/test_checkpoint_files.py: the checkpoint folder's bookkeeping;
- tests/integration/test_convert.py: the qwen3 (qk-norm) HF <-> megatron round trip, the TP-shard export;
- tests/integration/test_logits_parity.py at TP=2 (qwen3 with qk-norm) against transformers;
- tests/integration/test_train_loop.py's quickstart-shaped run through the CLI (the training loop, every artefact).
- the MoE layer under 0.19's spec: TP=2 x EP=2 logits against transformers, the micro-batch aux-loss
  router installed.
Left to the 0.16.1 run for time: the actor parity's gradient, tied-embedding and KL layouts, the
other round trips (llama3's rope scaling among them), the conversion's errors, a trainer starting
from a converted checkpoint, the other families'
and TP=1 logits, test_crash_resume.py (SIGKILLs at many points), the train loop's
every-option and collective-deadline runs.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.19.2"
pytestmark = [pytest.mark.slow]
C, L = "tests/integration/test_convert.py::", "tests/integration/test_logits_parity.py::test_logits_match_transformers"
SELECTION = [
    "tests/integration/test_checkpoint_specs.py",
    "tests/integration/test_actor_parity.py::test_parity_contract_layouts_agree",
    "tests/integration/test_actor_parity.py::test_resume_is_bit_identical",
    "tests/integration/test_checkpoint_files.py",
    C + "test_round_trip_is_bit_identical[qwen3_qknorm-layout2-dtype2]",
    C + "test_export_from_tensor_parallel_shards_with_sharded_files_loads_in_transformers",
    L + "[2-qwen3_qknorm]",
    "tests/integration/test_train_loop.py::test_quickstart_shaped_run_leaves_every_artefact",
    "tests/integration/test_moe_models.py::test_logits_match_transformers[qwen3_moe-tp2-ep2-alltoall]",
    "tests/integration/test_moe_models.py::test_moe_layers_get_the_micro_batch_aux_loss_router",
]


def test_the_actor_checkpoints_conversion_and_training_loop_under_megatron_core_0_19():
    got = subprocess.run(
        ["bash", str(ROOT / "tools" / "mcore_sources.sh"), VERSION], capture_output=True, text=True, timeout=600
    )
    assert got.returncode == 0, got.stderr[-3000:]
    folder = got.stdout.strip().splitlines()[-1]
    assert (Path(folder) / "megatron" / "core" / "__init__.py").is_file(), folder
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([folder, *filter(None, [os.environ.get("PYTHONPATH")])]),
        REAL_MEGATRON_EXPECT_MCORE=VERSION,
        REAL_MEGATRON_EXPECT_MCORE_DIR=folder,
    )
    python = ROOT / ".venv" / "bin" / "python"
    cmd = [
        str(python if python.exists() else sys.executable),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::UserWarning",
        *SELECTION,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"failed|error", summary), tail
