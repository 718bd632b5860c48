#!/usr/bin/env python
"""REAL training steps of a randomly initialised model of DeepSeek-R1-Distill-Qwen-1.5B's shape on
8k-token sequences, in bf16 on one GPU: the GPU check's items (c) and (g).

    python tools/gpu_step.py [--seq 8192] [--rollouts 2] [--recompute-layers N | --no-recompute]
                             [--count-syncs] [--json out.json]
    python tools/gpu_step.py --tiny    # the same path at toy size (CPU dry run)

Runs --steps steps (default 2) on the same batch and times the LAST: the first compiles megatron's
fused kernels (torch.compile) and Triton's, tens of seconds against a few seconds of GPU work. The
peak is measured over the last step, so it holds the weights, gradients and Adam's state (made at
the first optimizer step): torch.cuda.max_memory_allocated and max_memory_reserved, in GiB.

Checks and prints: s̄ exactly 0 at the first update (old log-probs recomputed by the same model),
finite loss and gradient norm; tokens/s and model FLOPs utilisation (model_flops: 6 N per trained
token plus 2 N per old-log-prob token plus attention, N without the input embedding, against
--peak-tflops); the peak against real_megatron.memory's estimate of exactly this run (the same
micro-batch, recompute plan and attention path: Transformer Engine's flash attention when TE makes
the layer spec, else the local spec's row; its reserve for the CUDA context and fragmentation left
out, as torch's counter leaves them out), converted to GiB, with a verdict against --tolerance.
--count-syncs adds one step under torch.cuda.set_sync_debug_mode("warn") and reports the host
syncs per micro-batch and where they come from. --fit halves --seq until the estimate fits the
GPU (so an item sized for 80 GB runs on a smaller card, and says so). Exit code 1 when a check fails.
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
sys.path.insert(0, os.path.dirname(__file__))  # bench_kernels: the cards' peaks

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


GiB = 2**30


def model_flops(matmul_params: int, layers: int, hidden: int, seq: int, tokens: int) -> float:
    """FLOPs of one step as MFU counts them (recomputed forwards not counted): forward + backward
    (6 N per token) and the old-log-prob forward (2 N per token) of every matmul parameter, and
    causal attention (QK^T and AV: 2 x 2 x seq x hidden per token per layer forward, halved by the
    causal mask; x 3 for forward + backward, x 4/3 for the extra forward)."""
    attention = 6 * layers * hidden * seq * tokens  # causal QK^T and AV, forward + backward
    return 8 * matmul_params * tokens + attention * 4 / 3


def gib_from_gb(gb: float) -> float:
    """The estimator speaks GB (1e9 bytes); torch's memory counters are read in GiB (2^30)."""
    return gb * 1e9 / GiB


def estimate_for_run(estimate, transformer_engine: bool) -> tuple[float, str]:
    """(GB, attention path) of real_megatron.memory's estimate for the layer spec that runs, less its
    reserve row (CUDA context, NCCL, fragmentation: outside torch's allocated-bytes counter, which it
    is compared with): the estimate's own total where it already assumes that attention, its
    `without_te` total (the local spec's) when Transformer Engine is absent and the figures differ."""
    import re

    reserve = sum(gb for what, gb, _ in estimate.rows if what == "reserve")
    if transformer_engine or not estimate.without_te:
        attention = next(how for what, _, how in estimate.rows if what == "activations").rsplit(", ", 1)[-1]
        return estimate.total_gb - reserve, attention
    local = float(re.search(r"total ([0-9.]+) GB", estimate.without_te).group(1))
    return local - reserve, "local spec attention (without Transformer Engine)"


def verdict(peak_gib: float, estimate_gib: float, tolerance: float) -> tuple[bool, str]:
    """Whether the measured peak lies within `tolerance` (relative) of the estimate."""
    if not math.isfinite(peak_gib):
        return True, "no device peak (CPU): not compared"
    rel = (peak_gib - estimate_gib) / estimate_gib
    ok = abs(rel) <= tolerance
    return ok, (
        f"peak {peak_gib:.2f} GiB vs estimate {estimate_gib:.2f} GiB: {100 * rel:+.0f}% "
        f"({'within' if ok else 'OUTSIDE'} the +-{100 * tolerance:.0f}% tolerance)"
    )


def run_config(shape: dict, dtype: str, rollouts: int, prompt: int, seq: int, recompute: int | None):
    """The config of the measured run (for real_megatron.memory); recompute: layers, None = all, 0 = off."""
    from real_megatron.config import load_config

    overrides = [
        f"model.dtype={dtype}",
        f"rollout.n_samples={rollouts}",
        f"data.max_prompt_tokens={prompt}",
        f"rollout.max_new_tokens={seq - prompt}",
        "train.prompts_per_step=1",
        "train.prompts_per_mini_batch=1",
        "actor.prompts_per_micro_batch=1",
        f"model.recompute_activations={str(recompute != 0).lower()}",
    ]
    if recompute:
        overrides.append(f"model.recompute_layers={recompute}")
    return load_config(None, overrides + [f"model.hf_config_overrides.{k}={v}" for k, v in shape.items()])


def count_syncs(fn) -> tuple[object, dict[str, int]]:
    """Run fn() under torch.cuda.set_sync_debug_mode("warn"): its result and the host syncs by call site."""
    import warnings

    sites: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            site = f"{os.path.relpath(w.filename)}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return result, sites


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192, help="tokens per rollout (prompt + response)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--rollouts", type=int, default=2, help="rollouts in the one prompt group")
    parser.add_argument("--steps", type=int, default=2, help="steps on the same batch; the last is timed")
    parser.add_argument("--no-recompute", action="store_true", help="keep every layer's activations")
    parser.add_argument("--recompute-layers", type=int, help="block recompute of the first N layers (default: all)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default: the card's, bench_kernels.PEAKS)")
    parser.add_argument("--tolerance", type=float, default=0.25, help="peak vs estimate, relative")
    parser.add_argument("--count-syncs", action="store_true", help="one more step, counting host syncs")
    parser.add_argument("--fit", action="store_true", help="halve --seq until the estimate fits the GPU")
    parser.add_argument("--tiny", action="store_true", help="toy model and lengths (runs on CPU)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from bench_kernels import card_peaks

    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.distributed import init_distributed, shutdown
    from real_megatron.actor.model import ArchSpec, use_transformer_engine
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict
    from real_megatron.config import AlgorithmConfig, OptimConfig
    from real_megatron.memory import architecture_of, estimate_memory
    from real_megatron.objectives import objective_from_config
    from real_megatron.rollout.types import Rollout

    shape = TINY if args.tiny else R1_DISTILL_QWEN_1P5B
    seq, prompt = (256, 32) if args.tiny else (args.seq, args.prompt)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    dtype_name = str(dtype).replace("torch.", "")
    te = use_transformer_engine(dtype)
    recompute = 0 if args.no_recompute else args.recompute_layers  # None: every layer
    capacity_gib = torch.cuda.mem_get_info()[1] / GiB if cuda else 78.0
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak_tflops = args.peak_tflops or card_peaks(name)["bf16_tflops"]

    def estimate_at(seq_len: int):
        cfg = run_config(shape, dtype_name, args.rollouts, prompt, seq_len, recompute)
        gb, attention = estimate_for_run(
            estimate_memory(cfg, architecture_of(cfg), capacity_gib * GiB / 1e9, recompute), te
        )
        return gib_from_gb(gb), attention

    estimate_gib, attention = estimate_at(seq)
    while args.fit and estimate_gib > 0.9 * capacity_gib and seq > 2 * prompt:
        print(f"--fit: {seq} tokens per rollout are estimated at {estimate_gib:.1f} GiB of {capacity_gib:.1f}: halved")
        seq //= 2
        estimate_gib, attention = estimate_at(seq)

    init_distributed(timeout_s=600)
    spec = ArchSpec.from_hf(shape)
    # drawn where the model lives: 1.78B parameters drawn on the host would take minutes
    weights = init_hf_state_dict(spec, seed=0, dtype=dtype, device="cuda" if cuda else "cpu")
    # log-probs at the paper's sampling temperature, as a run computes them
    settings = ActorSettings(
        dtype=dtype,
        optim=OptimConfig(lr=1e-6),
        groups_per_mini_batch=1,
        actor=ActorConfig(prompts_per_micro_batch=1),
        recompute_activations=recompute != 0,
        recompute_layers=recompute or None,
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
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    first = None
    for step in range(args.steps):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        metrics = actor.train_step(rollouts)
        sync()
        seconds = time.perf_counter() - start
        first = first or metrics
        print(f"step {step}: {seconds:.2f} s, loss {metrics['loss']:.4g}", flush=True)
    peak = torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / GiB if cuda else float("nan")
    syncs = None
    if args.count_syncs and cuda:
        counted, syncs = count_syncs(lambda: actor.train_step(rollouts))
        micro = counted["micro_batches"]
        print(
            f"host syncs in one step: {sum(syncs.values())} over {micro} micro-batches (passes: old log-probs + update)"
        )
        for site, n in sorted(syncs.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {n:5d}  {site}")
    elif args.count_syncs:
        print("host syncs: not counted (torch.cuda.set_sync_debug_mode needs CUDA)")

    tokens = seq * args.rollouts
    params = sum(p.numel() for chunk in actor.chunks for p in chunk.parameters())
    # the input embedding is a lookup, not a matmul: its parameters do no FLOPs (the output layer's do)
    matmul_params = params - spec.vocab_size * spec.hidden_size
    flops = model_flops(matmul_params, spec.num_layers, spec.hidden_size, seq, tokens)
    ok_memory, memory_verdict = verdict(peak, estimate_gib, args.tolerance)
    out = {
        "device": name,
        "dtype": dtype_name,
        "layer_spec": "transformer_engine" if te else "local",
        "attention": attention,
        "params": params,
        "matmul_params": matmul_params,
        "seq": seq,
        "tokens": tokens,
        "recompute": "none" if recompute == 0 else "all layers" if recompute is None else f"{recompute} layers",
        "steps": args.steps,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_tflops": peak_tflops,
        "mfu": flops / seconds / (peak_tflops * 1e12) if cuda else float("nan"),
        "loss": first["loss"],
        "grad_norm": first["grad_norm"],
        "score_abs_max_first_update": first["first_update_score_abs_max"],
        "peak_allocated_gib": peak,
        "peak_reserved_gib": reserved,
        "estimate_gib": estimate_gib,
        "memory_verdict": memory_verdict,
    }
    if syncs is not None:
        out["host_syncs_per_micro_batch"] = sum(syncs.values()) / max(1, counted["micro_batches"])
        out["host_sync_sites"] = syncs
    checks = {
        "s̄ = 0 at the first update": out["score_abs_max_first_update"] == 0.0,
        "finite loss": math.isfinite(out["loss"]),
        "finite grad norm": math.isfinite(out["grad_norm"]) and out["grad_norm"] > 0,
        "peak within the estimate's tolerance": ok_memory,
    }
    for key, value in out.items():
        if isinstance(value, dict):
            continue
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    for check, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(out, checks=checks), f, indent=1)
    shutdown()
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
