#!/usr/bin/env python
"""One REAL training step of a randomly initialised model of DeepSeek-R1-Distill-Qwen-1.5B's shape
on 8k-token sequences, in bf16 on one GPU: the GPU check's item (c).

    python tools/gpu_step.py [--seq 8192] [--rollouts 2] [--no-recompute] [--json out.json]
    python tools/gpu_step.py --tiny    # the same path at toy size (CPU dry run)

Checks and prints: s̄ exactly 0 at the first update (old log-probs recomputed by the same model),
finite loss and gradient norm; tokens/s and model FLOPs utilisation (6 N per trained token plus
2 N per old-log-prob token plus attention, N without the input embedding, against --peak-tflops);
peak GPU memory against the --dry-run estimate for the same shape. The random weights are drawn
on the GPU. Exit code 1 when a check fails.

Full activation recompute is on by default: without Transformer Engine the local layer spec
materialises every head's [s, s] attention scores (12 x 8192^2 fp32 = 3 GB per sequence per layer),
which only fits one layer at a time; with TE (flash attention) try --no-recompute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

R1_DISTILL_QWEN_1P5B = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
TINY = dict(
    R1_DISTILL_QWEN_1P5B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192, help="tokens per rollout (prompt + response)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--rollouts", type=int, default=2, help="rollouts in the one prompt group")
    parser.add_argument("--no-recompute", action="store_true", help="keep every layer's activations")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--tiny", action="store_true", help="toy model and lengths (runs on CPU)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.distributed import init_distributed, shutdown
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict
    from real_megatron.config import AlgorithmConfig, OptimConfig, load_config
    from real_megatron.memory import architecture_of, estimate_memory
    from real_megatron.objectives import objective_from_config
    from real_megatron.rollout.types import Rollout

    shape = TINY if args.tiny else R1_DISTILL_QWEN_1P5B
    seq, prompt = (256, 32) if args.tiny else (args.seq, args.prompt)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    init_distributed(timeout_s=600)
    spec = ArchSpec.from_hf(shape)
    # drawn where the model lives: 1.78B parameters drawn on the host would take minutes
    weights = init_hf_state_dict(spec, seed=0, dtype=dtype, device="cuda" if cuda else "cpu")
    recompute = not args.no_recompute
    # log-probs at the paper's sampling temperature, as a run computes them
    settings = ActorSettings(
        dtype=dtype,
        optim=OptimConfig(lr=1e-6),
        groups_per_mini_batch=1,
        actor=ActorConfig(prompts_per_micro_batch=1),
        recompute_activations=recompute,
        logprob_temperature=0.6,
    )
    actor = Actor(spec, settings, objective_from_config(AlgorithmConfig(name="real")), weights.__getitem__)
    del weights
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, spec.vocab_size, (prompt,), generator=gen).tolist()
    rollouts = [
        Rollout(prompt_ids, torch.randint(0, spec.vocab_size, (seq - prompt,), generator=gen).tolist(), float(k % 2), 0)
        for k in range(args.rollouts)
    ]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    metrics = actor.train_step(rollouts)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    tokens = seq * args.rollouts
    params = sum(p.numel() for chunk in actor.chunks for p in chunk.parameters())
    # the input embedding is a lookup, not a matmul: its parameters do no FLOPs (the output layer's do)
    matmul_params = params - spec.vocab_size * spec.hidden_size
    attention = 12 * spec.num_layers * spec.hidden_size * seq * tokens / 2  # causal QK^T and AV, fwd+bwd
    # model FLOPs (the recomputed forward is not counted, as MFU conventionally does not)
    flops = 6 * matmul_params * tokens + 2 * matmul_params * tokens + attention * 4 / 3
    score_abs_max = metrics["first_update_score_abs_max"]  # the trainer's own check (one mini-batch: every rollout)
    cfg = load_config(
        None,
        [
            f"model.dtype={'bfloat16' if cuda else 'float32'}",
            f"rollout.n_samples={args.rollouts}",
            f"data.max_prompt_tokens={prompt}",
            f"rollout.max_new_tokens={seq - prompt}",
            "train.prompts_per_step=1",
            "train.prompts_per_mini_batch=1",
            "actor.prompts_per_micro_batch=1",
            f"model.recompute_activations={str(recompute).lower()}",
        ]
        + [f"model.hf_config_overrides.{k}={v}" for k, v in shape.items()],
    )
    estimate = estimate_memory(cfg, architecture_of(cfg), 80.0)
    out = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "params": params,
        "matmul_params": matmul_params,
        "tokens": tokens,
        "recompute": recompute,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": flops / seconds / (args.peak_tflops * 1e12) if cuda else float("nan"),
        "loss": metrics["loss"],
        "grad_norm": metrics["grad_norm"],
        "score_abs_max_first_update": score_abs_max,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "estimate_gb": estimate.total_gb,
    }
    checks = {
        "s̄ = 0 at the first update": score_abs_max == 0.0,
        "finite loss": math.isfinite(out["loss"]),
        "finite grad norm": math.isfinite(out["grad_norm"]) and out["grad_norm"] > 0,
    }
    for key, value in out.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(out, checks=checks), f, indent=1)
    shutdown()
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
