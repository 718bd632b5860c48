"""A multi-turn batch (responses of model tokens and tokens between the model's turns, only the
model's in the loss) trains the same under packing, a token budget, TP=2, PP=2 and CP=2 as in one
process with padded rows and GPTModel's own logits (tools/parity_step.py --multi-turn; real
megatron-core over gloo, 2 processes; each launch runs its layouts one after another)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "parity_step.py"
SENSITIVE = ["--adam-eps", "1", "--lr", "0.1", "--clip-grad", "0"]  # the update is ~ lr x gradient
MT = ["--multi-turn"]
BUDGET = ["--max-tokens", "70"]  # several micro-batches per rank
CP_BUDGET = ["--max-tokens", "40"]  # per CP rank, after the split


def launch(tmp_path, name: str, nproc: int, layouts: dict):
    out = tmp_path / name
    cmd = [sys.executable, str(TOOL)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TOOL)]
    cmd += SENSITIVE + ["--out", str(out)] + [f"--layout={k}={' '.join(v)}" for k, v in layouts.items()]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    losses = {k: float(re.search(rf"layout {re.escape(k)}: step 0: loss (\S+)", proc.stdout).group(1)) for k in layouts}
    return {k: load_file(out / f"{k}.safetensors") for k in layouts}, losses


def max_rel_diff(a, b):
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_multi_turn_batch_trains_the_same_under_packing_tp_pp_and_cp(tmp_path):
    one, one_loss = launch(
        tmp_path,
        "one",
        1,
        {
            "reference": MT + ["--padded", "--naive-output-layer"],
            "packed-budget": MT + BUDGET,
            "single-turn": [],  # the same ids, every response token in the loss
        },
    )
    two, two_loss = launch(
        tmp_path,
        "two",
        2,
        {
            "tp2": MT + ["--tp", "2", "--sequence-parallel"] + BUDGET,
            "pp2": MT + ["--pp", "2"] + BUDGET,
            "cp2": MT + ["--cp", "2"] + CP_BUDGET,
        },
    )
    reference, loss = one["reference"], one_loss["reference"]
    for name, params in {"packed-budget": one["packed-budget"], **two}.items():
        assert max_rel_diff(reference, params) <= 1e-6, name
        got = {**one_loss, **two_loss}[name]
        assert abs(got - loss) <= 1e-6 * abs(loss), (name, got, loss)
    # the mask is what differs from a single-turn batch of the same ids: it must change the update
    assert max_rel_diff(reference, one["single-turn"]) > 1e-3
