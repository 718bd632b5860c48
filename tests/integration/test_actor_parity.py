"""The megatron-core actor under every layout (real megatron-core, gloo, 2 processes).

tools/parity_step.py is run as a user (or an outside check) runs it: plain python for one
process, torchrun for two. Layout files must agree; resume must be bit-identical. The default data
path (packed rows, fused output layer) is held against right-padded rows with GPTModel's own logits.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "parity_step.py"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = {  # name: (processes, args)
    "tp1pp1m1": (1, ["--tp", "1", "--pp", "1", "--micro-batches", "1"]),
    "tp2": (2, ["--tp", "2", "--pp", "1", "--micro-batches", "1"]),
    "pp2m2": (2, ["--tp", "1", "--pp", "2", "--micro-batches", "2"]),
    "dp2": (2, ["--tp", "1", "--pp", "1", "--micro-batches", "1"]),
    "m4": (1, ["--tp", "1", "--pp", "1", "--micro-batches", "4"]),
}


def run(tmp_path, name, nproc, args):
    out = tmp_path / f"{name}.safetensors"
    if nproc == 1:
        cmd = [sys.executable, str(TOOL)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TOOL)]
    proc = subprocess.run(cmd + args + ["--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return load_file(out), proc.stdout


def max_rel_diff(a, b):
    assert set(a) == set(b)
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)


def test_parity_contract_layouts_agree(tmp_path):
    """The contract: default settings (AdamW, fp32, one REAL update), files within 1e-5."""
    results = {name: run(tmp_path, name, n, args)[0] for name, (n, args) in LAYOUTS.items()}
    initial, _ = run(tmp_path, "initial", 2, LAYOUTS["tp2"][1] + ["--steps", "0"])
    reference = results["tp1pp1m1"]
    assert max_rel_diff(reference, initial) > 1e-5  # the update moved the parameters
    for name, params in results.items():
        assert max_rel_diff(reference, params) <= 1e-5, name
    assert len(reference) == 3 + 4 * 12  # embed, norm, lm_head (untied) + 12 tensors per layer


SENSITIVE = ["--adam-eps", "1", "--lr", "0.1", "--clip-grad", "0"]
NAIVE = ["--padded", "--naive-output-layer"]
BUDGET = ["--max-tokens", "70"]  # 3-8 micro-batches per rank, their number set by the rollouts' lengths


def loss_of(log: str) -> float:
    return float(re.search(r"step 0: loss (\S+)", log).group(1))


def micro_batches_of(log: str) -> int:
    return int(re.search(r"micro_batches (\d+)", log).group(1))


def test_gradients_agree_across_layouts_including_their_scale(tmp_path):
    """With adam eps 1 and no clipping the update is ~ lr * grad: parameters compare gradients
    themselves, so a wrong loss scale over micro-batches or DP ranks would show here. Reference:
    one process, padded rows, GPTModel's logits; everything else packed + fused (the default),
    micro-batches by a token budget, unless it says naive."""
    layouts = {
        "packed": (1, ["--micro-batches", "1"]),
        "packed-budget": (1, BUDGET),
        "tp2": (2, ["--tp", "2"] + BUDGET),
        "tp2-sp": (2, ["--tp", "2", "--sequence-parallel"] + BUDGET),
        "pp2": (2, ["--pp", "2"] + BUDGET),
        "vpp2": (2, ["--pp", "2", "--vpp", "2"] + BUDGET),
        "dp2": (2, BUDGET),
        "naive-tp2-sp": (2, ["--tp", "2", "--sequence-parallel", "--micro-batches", "2"] + NAIVE),
        "naive-vpp2-m4": (2, ["--pp", "2", "--vpp", "2", "--micro-batches", "4"] + NAIVE),
    }
    reference, log = run(tmp_path, "reference", 1, ["--micro-batches", "1"] + NAIVE + SENSITIVE)
    for name, (n, args) in layouts.items():
        params, out = run(tmp_path, name, n, args + SENSITIVE)
        assert max_rel_diff(reference, params) <= 1e-6, name
        assert abs(loss_of(out) - loss_of(log)) <= 1e-6 * abs(loss_of(log)), name
        if "--max-tokens" in args:
            assert micro_batches_of(out) >= 3, name  # the budget really cut several micro-batches


def test_tied_embeddings_get_the_output_layer_gradient(tmp_path):
    """Tied embeddings: the fused path's weight gradient reaches the shared embedding, also when
    it lives on the first stage and the output layer on the last (megatron syncs the two)."""
    reference, _ = run(tmp_path, "tied-reference", 1, ["--tied"] + NAIVE + SENSITIVE)
    untied, _ = run(tmp_path, "untied", 1, NAIVE + SENSITIVE)
    assert "lm_head.weight" not in reference and "lm_head.weight" in untied
    for name, (n, args) in {"tied-pp2": (2, ["--pp", "2"] + BUDGET), "tied-tp2": (2, ["--tp", "2"] + BUDGET)}.items():
        params, _ = run(tmp_path, name, n, ["--tied"] + args + SENSITIVE)
        assert max_rel_diff(reference, params) <= 1e-6, name


def test_resume_is_bit_identical(tmp_path):
    """4 steps straight == 2 steps, checkpoint, new processes, resume, 2 steps (DP=2, distributed optimizer)."""
    straight, log = run(tmp_path, "straight", 2, ["--steps", "4"])
    assert log.count("step ") == 4
    run(tmp_path, "first", 2, ["--steps", "2", "--save", str(tmp_path / "ckpt")])
    assert (tmp_path / "ckpt" / "trainer_state.json").exists() and not (tmp_path / "ckpt.tmp").exists()
    resumed, log = run(tmp_path, "resumed", 2, ["--steps", "2", "--load", str(tmp_path / "ckpt")])
    assert "step 2:" in log and "step 3:" in log
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def kl_of(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"kl_mean (\S+)", log)]


def test_kl_to_the_reference_model_agrees_across_layouts(tmp_path):
    """algorithm.kl=reference: the frozen initial model on each layout's own shards (TP=2, PP=2)
    gives the same log pi_ref, so the same KL (0 at step 0's update, > 0 at step 1's) and, gradient
    compared through the parameters (adam eps 1, no clipping), the same update as one process. The
    KL term changes that update: without it the parameters differ."""
    kl = ["--kl", "reference", "--kl-coef", "2", "--steps", "2"]
    reference, log = run(tmp_path, "kl-one", 1, ["--micro-batches", "1"] + kl + SENSITIVE)
    assert kl_of(log)[0] == 0.0 and kl_of(log)[1] > 1e-4, log
    plain, _ = run(tmp_path, "no-kl", 1, ["--micro-batches", "1", "--steps", "2"] + SENSITIVE)
    assert max_rel_diff(reference, plain) > 1e-4
    for name, (n, args) in {"kl-tp2": (2, ["--tp", "2"] + BUDGET), "kl-pp2": (2, ["--pp", "2"] + BUDGET)}.items():
        params, out = run(tmp_path, name, n, args + kl + SENSITIVE)
        assert max_rel_diff(reference, params) <= 1e-6, name
        assert kl_of(out)[0] == 0.0 and kl_of(out)[1] == pytest.approx(kl_of(log)[1], rel=1e-6), name
