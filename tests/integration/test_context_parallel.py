"""Context parallelism: the split of packed sequences over CP ranks (host side, no process group)
and parity of CP layouts with one process (real megatron-core, gloo, 2 and 4 processes).

tools/parity_step.py runs several layouts per launch (--layout), so the CP layouts cost three
process start-ups in all.
"""

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import QUIET, tiny_run_overrides, torchrun

from real_megatron.actor.batching import build_mini_batches, plan_mini_batches
from real_megatron.actor.context_parallel import padded_length, split_micro_batch, tokens_per_rank
from real_megatron.rollout.types import Rollout

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "parity_step.py"


def rollouts(seed=0, groups=4, per_group=3):
    """Lengths 2 to ~40 tokens: odd, even, and below 2C for the C tested."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = [rng.randrange(1, 50) for _ in range(rng.randrange(1, 8))]
        for k in range(per_group):
            out.append(Rollout(prompt, [rng.randrange(1, 50) for _ in range(rng.randrange(1, 30))], float(k % 2), g))
    out.append(Rollout([7], [8, 9], 1.0, groups - 1))  # 3 tokens
    return out


def gathered(shares, name, n_max):
    """What full_token_values' all-gather sees: every rank's values padded to n_max, stacked."""
    return torch.stack(
        [torch.cat([getattr(s, name), getattr(s, name).new_zeros(n_max - getattr(s, name).numel())]) for s in shares]
    ).flatten()


@pytest.mark.parametrize("cp,multiple,extra", [(2, 1, 0), (3, 1, 0), (2, 2, 0), (2, 1, 6)])
def test_split_covers_every_position_once_in_the_load_balanced_layout(cp, multiple, extra):
    """extra: a rank's row padded by this many tokens (pipeline stages exchange one shape)."""
    rs = rollouts()
    (mini,) = build_mini_batches(rs, 4, 4, 1, 0, packed=True)
    (mb,) = mini.micro_batches
    lengths = [len(rs[i].prompt_ids) + len(rs[i].response_ids) for i in mb.rollout_ids]
    padded = [padded_length(n, cp, multiple) for n in lengths]
    width = sum(padded) // cp + extra if extra else None
    shares = [split_micro_batch(mb, cp, r, multiple=multiple, width=width) for r in range(cp)]
    assert any(n < 2 * cp for n in lengths) and any(n % 2 for n in lengths)
    assert all(p % (2 * cp * multiple) == 0 for p in padded)
    local = sum(padded) // cp if width is None else width
    for r, share in enumerate(shares):
        assert share.tokens.shape == (1, local) and local % multiple == 0
        bounds = share.cu_seqlens_padded.tolist()
        assert [e - s for s, e in zip(bounds, bounds[1:])][: len(padded)] == padded  # global, padded (TE's THD + CP)
        real = share.cu_seqlens.tolist()
        assert [e - s for s, e in zip(real, real[1:])][: len(lengths)] == lengths
        at = 0
        for p in padded:  # chunks r and 2C-1-r, one after the other, original positions
            c = p // (2 * cp)
            expected = list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
            assert share.position_ids[0, at : at + 2 * c].tolist() == expected
            at += 2 * c
    # every token of every sequence on exactly one rank, at its original position
    for s, (length, p) in enumerate(zip(lengths, padded)):
        start = int(mb.cu_seqlens[s])
        seen = {}
        for share in shares:
            lo = sum(padded[:s]) // cp
            for col in range(lo, lo + p // cp):
                seen.setdefault(int(share.position_ids[0, col]), []).append(int(share.tokens[0, col]))
        assert sorted(seen) == list(range(p)) and all(len(v) == 1 for v in seen.values())
        assert [seen[q][0] for q in range(length)] == mb.tokens[0, start : start + length].tolist()
    # each response token is scored on the rank holding the position before it (labels cross chunk
    # boundaries), and the gather puts them back in the micro-batch's order
    n_max = shares[0].cp_tokens
    assert torch.equal(gathered(shares, "targets", n_max)[shares[0].cp_source], mb.targets)
    owners = torch.arange(cp).repeat_interleave(n_max)[shares[0].cp_source]
    local_cols = gathered(shares, "cols", n_max)[shares[0].cp_source]  # columns in their owner's row
    original = torch.stack([shares[o].position_ids[0, c] for o, c in zip(owners.tolist(), local_cols.tolist())])
    assert torch.equal(original, mb.cols - mb.cu_seqlens[mb.seq_index].long())  # the predicting position
    assert sum(s.sequence_tokens for s in shares) == sum(lengths)


def test_budget_counts_tokens_per_rank_after_the_split_and_the_error_suggests_a_cp():
    rs = [Rollout([1] * 10, [2] * 90, float(k % 2), g) for g in range(2) for k in range(2)]  # 100 tokens each
    with pytest.raises(ValueError, match=r"rollout 0 \(prompt group 0\) has 100 tokens.*parallel.cp=2 \(context par"):
        plan_mini_batches(rs, 2, 2, 1, max_tokens=60)
    assert tokens_per_rank(100, 2) == 50 and tokens_per_rank(100, 2, multiple=2) == 52
    plan = plan_mini_batches(rs, 2, 2, 1, max_tokens=104, cp=2, multiple=2)  # 2 rollouts x 52 per micro-batch
    assert [len(micro) for micro in plan[0]] == [1, 1]  # two micro-batches, one group each
    with pytest.raises(ValueError, match=r"100 tokens \(52 per rank after the parallel.cp=2 split\).*parallel.cp=4"):
        plan_mini_batches(rs, 2, 2, 1, max_tokens=40, cp=2, multiple=2)


def test_context_parallelism_needs_packed_rows():
    with pytest.raises(ValueError, match="pack_sequences"):
        build_mini_batches(rollouts(), 4, 4, 1, 0, packed=False, cp_size=2)


# --- parity with one process --------------------------------------------------------------------

SENSITIVE = ["--adam-eps", "1", "--lr", "0.1", "--clip-grad", "0", "--short-rollouts"]
NAIVE = ["--naive-output-layer"]


def launch(tmp_path, name, nproc, layouts, extra=()):
    """One process launch running `layouts` {name: args}: their parameters and printed losses."""
    out = tmp_path / name
    cmd = (
        [sys.executable, str(TOOL)]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TOOL)]
    )
    cmd += SENSITIVE + list(extra) + ["--out", str(out)] + [f"--layout={k}={' '.join(v)}" for k, v in layouts.items()]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    losses = {
        k: [float(x) for x in re.findall(rf"layout {re.escape(k)}: step \d+: loss (\S+)", proc.stdout)] for k in layouts
    }
    micro = {
        k: [int(x) for x in re.findall(rf"layout {re.escape(k)}: step \d+: .*micro_batches (\d+)", proc.stdout)]
        for k in layouts
    }
    return {k: load_file(out / f"{k}.safetensors") for k in layouts}, losses, micro


def max_rel_diff(a, b):
    assert set(a) == set(b)
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)


@pytest.mark.distributed
@pytest.mark.slow
def test_context_parallel_layouts_match_one_process_and_resume_at_cp1(tmp_path):
    """fp32, adam eps 1, no clipping (the update is ~ lr x gradient): CP=2 alone and CP=4, with TP=2 and
    sequence parallelism, with DP=2 and with PP=2, with recompute, fused output layer and GPTModel's logits, token
    budgets cutting several micro-batches, rollouts of 2-3 tokens (below 2C) and odd lengths: loss
    and parameters within 1e-6 of one process with padded rows. A CP=2 run's checkpoint resumes
    at CP=1 (no CP state in checkpoints) to the same parameters as a straight CP=1 run."""
    ckpt = tmp_path / "cp2-ckpt"
    two, two_loss, two_micro = launch(
        tmp_path,
        "two",
        2,
        {
            "cp2": ["--cp", "2"],
            "cp2-naive-budget": ["--cp", "2", "--max-tokens", "40"] + NAIVE,
            "cp2-save": ["--cp", "2", "--save", str(ckpt)],
            "cp2-recompute": ["--cp", "2", "--recompute", "--max-tokens", "40"],  # the K/V gather reruns in backward
        },
    )
    one, one_loss, _ = launch(
        tmp_path,
        "one",
        1,
        {"reference": ["--padded"] + NAIVE, "straight2": ["--steps", "2"], "resumed": ["--load", str(ckpt)]},
    )
    four, four_loss, four_micro = launch(
        tmp_path,
        "four",
        4,
        {
            "cp2-tp2-sp": ["--cp", "2", "--tp", "2", "--sequence-parallel", "--max-tokens", "40"],
            "cp2-dp2-naive": ["--cp", "2", "--max-tokens", "40"] + NAIVE,
            "cp2-pp2": ["--cp", "2", "--pp", "2", "--max-tokens", "40"],
            "cp4": ["--cp", "4", "--max-tokens", "40"],  # 8 chunks: most rollouts are shorter than 2C
        },
    )
    reference, loss = one["reference"], one_loss["reference"][0]
    for name, params in {**two, **four}.items():
        if name == "cp2-save":
            continue
        assert max_rel_diff(reference, params) <= 1e-6, name
        got = {**two_loss, **four_loss}[name][0]
        assert abs(got - loss) <= 1e-6 * abs(loss), (name, got, loss)
    for name, count in {**two_micro, **four_micro}.items():
        if name not in ("cp2", "cp2-save"):
            assert count[0] >= 3, name  # the budget really cut several micro-batches
    # resume: CP=2 step 0 + checkpoint, then one CP=1 step == two CP=1 steps
    assert len(one_loss["resumed"]) == 1 and len(one_loss["straight2"]) == 2
    assert max_rel_diff(one["straight2"], one["resumed"]) <= 1e-6
    assert max_rel_diff(one["straight2"], reference) > 1e-3  # the second step moved the parameters


def test_memory_estimate_divides_what_cp_divides_and_adds_the_gathered_kv():
    """Micro-batches by prompt count: a rank holds 1/cp of each sequence, so activations halve at
    cp=2 (same dp); the local spec (float32) adds every layer's K/V of the whole row and one
    attention mask (a rank's queries x the sequence's length)."""
    from real_megatron.config import load_config
    from real_megatron.memory import architecture_of, estimate_memory

    path = ROOT / "configs" / "real_r1distill_qwen_7b_32k.yaml"
    common = [
        "actor.max_tokens_per_micro_batch=null",
        "actor.prompts_per_micro_batch=1",
        "model.dtype=float32",
        "rollout.max_new_tokens=3072",
    ]  # 4k sequences
    rows = {}
    for cp, nodes in ((1, 2), (2, 4)):  # dp = 8 both
        cfg = load_config(path, common + [f"parallel.cp={cp}", f"parallel.nodes={nodes}"])
        rows[cp] = {what: gb for what, gb, _ in estimate_memory(cfg, architecture_of(cfg), 80.0).rows}
    assert rows[2]["activations"] == pytest.approx(rows[1]["activations"] / 2, rel=1e-3)
    arch = architecture_of(cfg)
    kv = 28 * 2 * 4096 * arch.kv_heads * arch.head_dim / 2 * 4 / 1e9  # layers x K,V x row tokens x kv dim / tp x fp32
    kv += 2048 * 4096 * 4 / 1e9  # the mask: a rank's 2,048 queries x 4,096 keys, fp32
    assert rows[2]["context-parallel K/V"] == pytest.approx(kv, rel=1e-3) and "context-parallel K/V" not in rows[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_the_training_loop_runs_at_cp2_and_its_log_probs_match_the_engine(tmp_path):
    """`real-megatron train` on 2 ranks with parallel.cp=2 (the quickstart at toy scale): the loop,
    the metrics and the checkpoint run; the actor's pi_old, computed over two CP ranks, matches the
    embedded engine's one-process log-probs of the same tokens (mismatch ~1e-7 in fp32)."""
    import json
    import os

    cmd = [
        *torchrun(2, "-m", "real_megatron.cli", "train", str(ROOT / "configs" / "quickstart.yaml")),
        "--output-dir",
        str(tmp_path / "run"),
        *tiny_run_overrides(tmp_path, size="toy", steps=2),
        "parallel.gpus_per_node=2",
        "parallel.cp=2",
        *QUIET,
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert 0 < row["mismatch_abs_mean"] < 1e-5 and row["first_update_score_abs_max"] < 1e-5, row
        assert row["entropy"] > 0 and row["micro_batches"] == 4, row
    assert (tmp_path / "run" / "checkpoints" / "step_000002").exists()
