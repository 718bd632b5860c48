"""The GPU check's figures, each formula on CPU (tools/gpu_step.py, tools/bench_kernels.py,
tools/parity_step.py; docs/GPU.md defines them), and the kernels' value checks that the training
step turns off."""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import bench_kernels  # noqa: E402
import gpu_step  # noqa: E402


def test_mfu_counts_six_n_per_trained_token_two_n_per_old_logprob_token_and_causal_attention():
    n, layers, hidden, seq, tokens = 1_000_000, 2, 64, 128, 256
    attention_forward = 2 * 2 * seq * hidden / 2 * tokens * layers  # QK^T and AV, causal half
    expected = 6 * n * tokens + 2 * n * tokens + attention_forward * 3 + attention_forward
    assert gpu_step.model_flops(n, layers, hidden, seq, tokens) == pytest.approx(expected)


def test_the_peak_and_the_estimate_are_compared_in_one_unit_against_a_stated_tolerance():
    assert gpu_step.gib_from_gb(1.0) == pytest.approx(1e9 / 2**30)
    ok, text = gpu_step.verdict(10.0, 8.0, 0.25)
    assert ok and "+25%" in text and "within" in text
    ok, text = gpu_step.verdict(10.5, 8.0, 0.25)
    assert not ok and "OUTSIDE the +-25% tolerance" in text
    assert gpu_step.verdict(float("nan"), 8.0, 0.25)[0]  # CPU: nothing measured, nothing claimed


@pytest.mark.parametrize("recompute", [None, 14, 0])
def test_the_estimate_is_of_the_measured_run_its_recompute_plan_and_its_attention(recompute):
    from real_megatron.memory import architecture_of, estimate_memory

    cfg = gpu_step.run_config(gpu_step.R1_DISTILL_QWEN_1P5B, "bfloat16", 2, 512, 8192, recompute)
    estimate = estimate_memory(cfg, architecture_of(cfg), 78 * 2**30 / 1e9, recompute)
    activations = next(how for what, _, how in estimate.rows if what == "activations")
    plan = {None: "full recompute", 14: "block recompute of 14 of 28 layers per stage", 0: "no recompute"}[recompute]
    assert plan in activations and "fewest that fit" not in activations  # the run's plan, not one chosen for it
    assert "16384 tokens per micro-batch per rank (2 x 8192)" in activations
    reserve = next(gb for what, gb, _ in estimate.rows if what == "reserve")
    te_gb, te_attention = gpu_step.estimate_for_run(estimate, transformer_engine=True)
    assert te_gb == pytest.approx(estimate.total_gb - reserve) and "flash" in te_attention
    local_gb, local_attention = gpu_step.estimate_for_run(estimate, transformer_engine=False)
    assert local_gb >= te_gb and "local spec" in (local_attention if estimate.without_te else "local spec")
    # float32 takes the local spec with or without TE: one figure
    fp32 = gpu_step.run_config(gpu_step.R1_DISTILL_QWEN_1P5B, "float32", 2, 512, 8192, recompute)
    e32 = estimate_memory(fp32, architecture_of(fp32), 78 * 2**30 / 1e9, recompute)
    assert gpu_step.estimate_for_run(e32, True)[0] == gpu_step.estimate_for_run(e32, False)[0]


def test_the_cards_peaks_by_device_name():
    h100 = bench_kernels.card_peaks("NVIDIA H100 80GB HBM3")
    assert (h100["bf16_tflops"], h100["hbm_gbps"], h100["card"]) == (989.0, 3350.0, "H100")
    assert bench_kernels.card_peaks("NVIDIA H100 PCIe")["hbm_gbps"] == 2000.0
    assert bench_kernels.card_peaks("NVIDIA H200")["hbm_gbps"] == 4800.0
    assert bench_kernels.card_peaks("NVIDIA H200 NVL")["bf16_tflops"] == 835.0
    assert bench_kernels.card_peaks("cpu") == dict(bf16_tflops=None, fp32_tflops=None, hbm_gbps=None, card=None)
    assert bench_kernels.share(494.5, 989.0) == "50%" and bench_kernels.share(1.0, None) == "-"


def test_bandwidth_counts_the_logits_each_kernel_streams_and_matmuls_six_t_h_v():
    # lse partials read [T, V] once; the log-prob gradient reads it and writes [T, V]
    assert bench_kernels.kernel_bytes("lse", 1000, 151936, 2) == 1000 * 151936 * 2
    assert bench_kernels.kernel_bytes("grad", 1000, 151936, 2) == 2 * 1000 * 151936 * 2
    assert bench_kernels.matmul_flops(2048, 1536, 151936) == 6 * 2048 * 1536 * 151936


def test_the_resume_item_uses_the_format_auto_picks_at_1p5b_and_7b():
    import parity_step

    for name in ("real_r1distill_qwen_1p5b", "real_r1distill_qwen_7b"):
        fmt, why = parity_step.optimizer_format_of(f"auto:{ROOT / 'configs' / (name + '.yaml')}")
        assert fmt == "dp_reshardable" and why.startswith("auto:")
    assert parity_step.optimizer_format_of("fully_reshardable") == ("fully_reshardable", "given")


def test_kernel_value_checks_are_on_by_default_and_off_in_the_training_step(monkeypatch):
    from real_megatron.actor.actor import Actor
    from real_megatron.kernels import group_logsumexp, token_logprobs, value_checks

    monkeypatch.delenv("REAL_MEGATRON_KERNEL_CHECKS", raising=False)  # the suite keeps them on everywhere
    values, bad_index = torch.zeros(3), torch.tensor([0, 1, 5])
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 2\)"):
        group_logsumexp(values, bad_index, 2, impl="torch")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprobs(torch.zeros(2, 4), torch.tensor([0, 7]), impl="torch")
    with value_checks(False):  # no value read back (on a GPU: no device sync)
        group_logsumexp(values, torch.tensor([0, 1, 1]), 2, impl="torch")
        assert math.isfinite(float(token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]), impl="torch")[0]))
        monkeypatch.setenv("REAL_MEGATRON_KERNEL_CHECKS", "1")  # the suite's setting wins
        with pytest.raises(ValueError):
            group_logsumexp(values, bad_index, 2, impl="torch")
    assert Actor.train_step.__wrapped__  # the step runs under without_value_checks


def test_moe_statistics_leave_padding_out_without_boolean_indexing():
    """The router hook weights by the padding mask (no data-dependent shapes, so no device sync):
    the same sums as keeping the real tokens only."""
    from types import SimpleNamespace

    from real_megatron.actor.moe_stats import MoEStats

    gen = torch.Generator().manual_seed(0)
    tokens, hidden_size, experts = 10, 8, 4
    router = torch.nn.Linear(hidden_size, experts, bias=False).train()
    hidden = torch.randn(tokens, 1, hidden_size, generator=gen)
    padding = torch.tensor([False] * 7 + [True] * 3).reshape(tokens, 1)
    routing_map = torch.rand(tokens, experts, generator=gen) > 0.5
    stats = object.__new__(MoEStats)
    stats.moe = SimpleNamespace(num_experts=experts, top_k=2)
    stats.sums = torch.zeros(1, 2 * experts + 1, dtype=torch.float64)
    stats._hook(0)(router, (hidden, padding), (None, routing_map))
    keep = ~padding.reshape(-1)
    probs = torch.softmax(hidden.reshape(tokens, -1)[keep] @ router.weight.detach().t(), dim=-1).double()
    expected = torch.cat([routing_map[keep].sum(0).double(), probs.sum(0), torch.tensor([7.0], dtype=torch.float64)])
    torch.testing.assert_close(stats.sums[0], expected)
