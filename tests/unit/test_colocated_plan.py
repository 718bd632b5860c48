"""The colocated layout's memory plan per phase (memory.colocated_plan, --dry-run), against figures
computed by hand for the 7B and 1.5B one-node colocated configs; and its refusals, naming the phase."""

from pathlib import Path

import pytest

from real_megatron.config import load_config
from real_megatron.memory import RESERVE_GB, architecture_of, colocated_plan, estimate_memory
from real_megatron.parallel_layout import describe_nodes

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def plan(name: str, *overrides: str):
    cfg = load_config(CONFIGS / name, list(overrides))
    arch = architecture_of(cfg)
    estimate = estimate_memory(cfg, arch, cfg.parallel.gpu_memory_gb)
    rows, problems = colocated_plan(cfg, arch, estimate)
    return cfg, estimate, {what: (gb, how) for what, gb, how in rows}, problems


def test_7b_one_node_colocated_by_hand():
    cfg, estimate, rows, problems = plan("real_r1distill_qwen_7b_1node_colocated.yaml")
    assert problems == []
    # Qwen2-7B: 7.6157 B parameters (hidden 3584, 28 layers, 4 KV heads of 128, vocab 152064 untied)
    params = (
        152064 * 3584 * 2
        + 28 * (3584 * (3584 + 2 * 512) + 3584 + 2 * 512 + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584)
        + 3584
    )
    assert params == 7_615_616_512
    # generation: bf16 weights on one GPU (server_tp 1), the static fraction (80 - 4 - 2) / 80, the KV cache in the rest
    weights = params * 2 / 1e9  # 15.23 GB
    kv_room = 80 * 0.925 - weights  # 58.77 GB
    tokens = kv_room * 1e9 / (2 * 28 * 4 * 128 * 2)  # K and V, bf16: 57,344 B per token -> 1.025 M
    gen, how = rows["generation peak"]
    assert gen == pytest.approx(RESERVE_GB + 74.0)
    assert f"server weights {weights:.1f} GB" in how and f"KV cache {kv_room:.1f} GB" in how
    assert f"{tokens / 1e3:.0f}k tokens" in how and "1025k tokens" in how
    # training: the actor's estimate (servers released) + what a released server keeps
    assert rows["training peak (servers released)"][0] == pytest.approx(estimate.total_gb + 1.5)
    # host: 8 ranks x (bf16 weights of a TP=2 half + Adam's 12 B/param over dp=4)
    half = params / 2
    host = 8 * (half * 2 + half * 12 / 4) / 1e9
    assert rows["host memory per node"][0] == pytest.approx(host, rel=1e-3)  # 152.3 GB
    assert describe_nodes(cfg)[1] is None


def test_1p5b_one_node_colocated_by_hand():
    _, _, rows, problems = plan("real_r1distill_qwen_1p5b_1node_colocated.yaml")
    assert problems == []
    params = 1_777_088_000  # DeepSeek-R1-Distill-Qwen-1.5B
    host = 8 * (params * 2 + params * 12 / 8) / 1e9  # DP=8: the whole model per rank, Adam sharded 8 ways
    assert rows["host memory per node"][0] == pytest.approx(host, rel=1e-3)


def test_a_phase_that_does_not_fit_is_named():
    _, _, _, problems = plan("real_r1distill_qwen_7b_1node_colocated.yaml", "parallel.gpu_memory_gb=40")
    assert [p.split(" needs")[0] for p in problems] == ["the colocated training phase (servers released)"], problems
    # 20 GB GPUs: the static fraction (20 - 6) / 20 holds 14 GB, less than the 15.2 GB of weights
    _, _, _, problems = plan("real_r1distill_qwen_7b_1node_colocated.yaml", "parallel.gpu_memory_gb=20")
    assert any(p.startswith("the colocated generation phase has KV-cache room for 0 tokens") for p in problems), (
        problems
    )


def test_servers_must_cover_the_trainer_gpus():
    cfg = load_config(CONFIGS / "real_r1distill_qwen_7b_1node_colocated.yaml", ["rollout.num_servers=4"])
    assert "must cover the parallel.gpus_per_node=8 trainer GPUs" in describe_nodes(cfg)[1]
