"""The colocated layout's memory plan per phase (memory.colocated_plan, --dry-run), against figures
computed by hand for the 30B-A3B, 7B and 1.5B one-node colocated configs; the optimizer's CPU offload
(optim.cpu_offload) moving its share of the optimizer state from the GPU to the host; and the plan's
refusals, naming the phase."""

from pathlib import Path

import pytest

from real_megatron.config import load_config
from real_megatron.memory import RESERVE_GB, SERVER_RELEASED_GB, architecture_of, colocated_plan, estimate_memory
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


# Qwen2-7B on the 7B one-node colocated layout (tp=2, dp=4): the parameters one rank's optimizer steps
PARAMS_7B = 7_615_616_512
SHARDED_7B = PARAMS_7B / 2 / 4


def test_7b_cpu_offload_moves_its_fraction_of_the_optimizer_to_the_host():
    _, _, rows, _ = plan("real_r1distill_qwen_7b_1node_colocated.yaml")
    _, estimate, offloaded, problems = plan(
        "real_r1distill_qwen_7b_1node_colocated.yaml", "optim.cpu_offload=true", "optim.cpu_offload_fraction=0.5"
    )
    assert problems == []
    optimizer = {what: gb for what, gb, _ in estimate.rows}["optimizer (Adam)"]
    # half of the 12 B/param stays; of the offloaded half the GPU keeps the fp32 main shard (4 B/param)
    assert optimizer == pytest.approx(SHARDED_7B * (12 * 0.5 + 4 * 0.5) / 1e9)  # 7.62 GB of 11.42
    # the host: per rank 16 B per offloaded parameter (fp32 master, Adam m and v, fp32 gradient copy)
    assert estimate.host_gb == pytest.approx(SHARDED_7B * 16 * 0.5 / 1e9)  # 7.62 GB
    host = 8 * (PARAMS_7B / 2 * 2 + SHARDED_7B * 8 + SHARDED_7B * 8) / 1e9
    assert offloaded["host memory per node"][0] == pytest.approx(host)  # 182.7 GB
    assert offloaded["host memory per node"][0] - rows["host memory per node"][0] == pytest.approx(
        8 * SHARDED_7B * 4 / 1e9  # 16 B on the host for the 12 B no longer moved out (8 B) and the 4 B kept
    )
    # the precision-aware optimizer hands the offload the bf16 shards: nothing of that share stays
    _, estimate, _, _ = plan(
        "real_r1distill_qwen_7b_1node_colocated.yaml",
        "optim.cpu_offload=true",
        "optim.use_precision_aware_optimizer=true",
    )
    row = {what: (gb, how) for what, gb, how in estimate.rows}["optimizer (Adam)"]
    assert row[0] == 0 and "all of it on the host" in row[1]
    assert estimate.host_gb == pytest.approx(SHARDED_7B * 16 / 1e9)


def test_30b_a3b_one_node_colocated_by_hand():
    cfg, estimate, rows, problems = plan("real_qwen3_30b_a3b_1node.yaml")
    assert problems == [] and cfg.rollout.colocate and cfg.optim.cpu_offload
    assert describe_nodes(cfg)[1] is None
    # Qwen3-30B-A3B: hidden 2048, 48 MoE layers of 128 experts (gated MLP of 768), 32 query and 4 KV
    # heads of 128 (no QKV bias, q/k norms), vocab 151936 untied
    attention = 2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2 * 128 + 2 * 2048
    outside_experts = attention + 128 * 2048  # + the router
    expert = 3 * 2048 * 768
    embeddings = 2 * 151936 * 2048 + 2048
    params = embeddings + 48 * (outside_experts + 128 * expert)
    assert params == estimate.params_total == 30_532_122_624
    # one rank (tp=4, ep=8, etp=1): a quarter of the rest, 16 whole experts per layer
    dense_here = (48 * outside_experts + 2 * 151936 * 2048) // 4
    experts_here = 48 * 16 * expert
    assert dense_here + experts_here == estimate.params_here == 4_009_151_488
    # its optimizer steps the rest over dp=2 and its experts alone (expert-dp = 8 / (ep 8 x etp 1) = 1)
    sharded = dense_here / 2 + experts_here
    gpu = {what: gb for what, gb, _ in estimate.rows}
    # all of it offloaded, precision-aware: no optimizer state on the GPU, 16 B/param on the host
    assert gpu["optimizer (Adam)"] == 0
    assert estimate.host_gb == pytest.approx(sharded * 16 / 1e9)  # 61.1 GB per rank
    weights = (dense_here + experts_here) * 2 / 1e9  # 8.02 GB
    assert gpu["weights (bfloat16)"] == pytest.approx(weights)
    assert gpu["gradients (fp32 main_grad)"] == pytest.approx(weights * 2)
    assert rows["host memory per node"][0] == pytest.approx(8 * (weights + sharded * 16 / 1e9))  # 552.7 GB
    assert rows["training peak (servers released)"][0] == pytest.approx(estimate.total_gb + SERVER_RELEASED_GB)
    assert rows["training peak (servers released)"][0] < 80
    # generation: two servers of tp=4 at rollout.server_args' --mem-fraction-static 0.7
    server_weights = params * 2 / 4 / 1e9  # 15.27 GB per GPU
    kv_room = 80 * 0.7 - server_weights  # 40.73 GB
    tokens = kv_room * 1e9 / (2 * 48 * 4 * 128 * 2 / 4)  # 24,576 B per token per GPU -> 1.657 M
    gen, how = rows["generation peak"]
    assert gen == pytest.approx(RESERVE_GB + 56.0)
    assert f"KV cache {kv_room:.1f} GB (--mem-fraction-static 0.7, rollout.server_args)" in how
    assert f"{tokens / 1e3:.0f}k tokens" in how and "1657k tokens" in how
    # without the offload the same layout holds its 45.8 GB of Adam state on every GPU: refused
    _, estimate, _, problems = plan(
        "real_qwen3_30b_a3b_1node.yaml",
        "optim.cpu_offload=false",
        "optim.use_precision_aware_optimizer=false",
        "optim.overlap_cpu_optimizer_d2h_h2d=false",
    )
    assert {what: gb for what, gb, _ in estimate.rows}["optimizer (Adam)"] == pytest.approx(sharded * 12 / 1e9)
    assert estimate.host_gb == 0
    assert [p.split(" needs")[0] for p in problems] == ["the colocated training phase (servers released)"]


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
