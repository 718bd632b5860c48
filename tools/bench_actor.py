#!/usr/bin/env python
"""One actor step (old log-probs + one update) at the real vocabulary: padded rows + GPTModel's
logits against packed rows + the fused output layer, each in its own process, in the same run.

    .venv/bin/python tools/bench_actor.py                      # CPU, fp32
    python tools/bench_actor.py --device cuda --dtype bfloat16 --hidden 1536 --layers 4

Model: Qwen2-shaped (GQA, qkv bias, SwiGLU, RMSNorm, untied output layer) with the vocabulary of
151,936 and a width and depth small enough for 2 CPU cores (--hidden, --layers). Rollout batch:
--groups prompt groups of --group-size rollouts; prompts of 80-120 tokens; response lengths
log-normal (sigma 1) scaled to a mean of 400 tokens and capped at 2,048 (seeded: both variants get
the same batch). Padded + naive cuts micro-batches of --groups-per-micro groups (right-padded
rows); packed + fused cuts them by --max-tokens per micro-batch. Before the timed step, each
process runs the same step once (Adam's state then exists, and nothing is compiled or first
allocated in the timed step): the peak is memory above the model, gradients and optimizer state
(resident set size on CPU, sampled every 2 ms; torch's allocator peak on CUDA).

    .venv/bin/python tools/bench_actor.py --lengths 1024,4096,16384 --vocab 32000

--lengths compares the local spec's attention (torch's scaled_dot_product_attention, the default)
with megatron-core's DotProductAttention way (fp32 scores and probabilities of every head, what the
local spec ran before; `--attention megatron`), packed + fused, on one group of two rollouts of each
length (one micro-batch). A "before" run whose scores would not fit this machine's free memory is
not run, its need printed instead.

    .venv/bin/python tools/bench_actor.py --cp 2 --groups 1 --group-size 2 --mean-response 3000 --max-response 6000

--cp C compares context parallelism instead: packed + fused at cp=1 (one process) against cp=C (C
processes under torchrun, each sequence split over them), on the same rollouts in the same run,
with the machine's threads shared out equally (cp=1: all of them; cp=C: 1/C each). Peaks are per
rank (the largest over the CP ranks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 151936
VARIANTS = {"padded+naive": ["--padded", "--naive"], "packed+fused": []}
ATTENTION = {"before": ["--attention", "megatron"], "after": []}


def megatron_attention(query, key, value, *, scale: float, dropout: float = 0.0, mask=None):
    """What megatron-core's local DotProductAttention computes (kept here to measure against):
    keys and values repeated per head, [n, heads, Lq, Lk] scores in the model's dtype, masked and
    softmaxed in fp32, probabilities back in the model's dtype times the values."""
    import torch

    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is None:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.float().masked_fill(causal, float("-inf"))
    else:
        scores = scores.float() + mask
    probs = torch.nn.functional.dropout(scores.softmax(-1), dropout).to(value.dtype)
    return torch.matmul(probs, value)


def response_lengths(n: int, seed: int, mean: float = 400.0, cap: int = 2048, sigma: float = 1.0) -> list[int]:
    """n lengths at evenly spaced quantiles of the log-normal (a small batch still has the long
    tail), shuffled by the seed."""
    import torch

    normal = torch.distributions.Normal(0.0, 1.0)
    quantiles = normal.icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    mu = math.log(mean) - sigma**2 / 2  # the log-normal's mean is e^(mu + sigma^2/2)
    lengths = [int(min(cap, max(1, round(math.exp(mu + sigma * q))))) for q in quantiles.tolist()]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [lengths[i] for i in order]


def rollout_batch(groups: int, size: int, seed: int, vocab: int = VOCAB, mean: float = 400.0, cap: int = 2048):
    import torch

    from real_megatron.rollout.types import Rollout

    gen = torch.Generator().manual_seed(seed + 1)
    lengths = response_lengths(groups * size, seed, mean, cap)
    rollouts = []
    for g in range(groups):
        prompt = torch.randint(1, vocab, (int(torch.randint(80, 121, (1,), generator=gen)),), generator=gen).tolist()
        for k in range(size):
            response = torch.randint(1, vocab, (lengths[g * size + k],), generator=gen).tolist()
            rollouts.append(Rollout(prompt, response, float(k % 2), g))  # mixed labels in every group
    return rollouts


class PeakSampler:
    """Highest resident set size (CPU) over a block, sampled from a thread; `compute_peak` leaves
    out the optimizer's step (its temporaries are neither activations nor the output layer)."""

    def __init__(self, period_s: float = 0.002):
        self.period_s, self.peak, self.compute_peak, self._stop = period_s, 0, 0, threading.Event()
        self.paused = False

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            rss = self.rss()
            self.peak = max(self.peak, rss)
            if not self.paused:
                self.compute_peak = max(self.compute_peak, rss)
            time.sleep(self.period_s)

    def pause_during(self, fn):
        def wrapped(*args, **kwargs):
            self.compute_peak = max(self.compute_peak, self.rss())
            self.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = False

        return wrapped

    def __enter__(self):
        self.start = self.peak = self.compute_peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


class AllocatorPeak:
    """The most bytes torch's CPU allocator held at once over a block, above what it held at the
    start (every allocation and free, recorded by torch's profiler: exact, where RSS is sampled);
    `compute_peak` leaves out the optimizer's step like PeakSampler."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.peak = self.compute_peak = 0

    def pause_during(self, fn):
        def wrapped(*args, **kwargs):
            import torch

            with torch.profiler.record_function("bench_actor:optimizer_step"):
                return fn(*args, **kwargs)

        return wrapped

    def __enter__(self):
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        events = list(self._profile.profiler.kineto_results.events())
        paused = [(e.start_ns(), e.end_ns()) for e in events if e.name() == "bench_actor:optimizer_step"]
        live = 0
        for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
            live += e.nbytes()
            self.peak = max(self.peak, live)
            if not any(a <= e.start_ns() <= b for a, b in paused):
                self.compute_peak = max(self.compute_peak, live)


def estimated_step_bytes(hf_config: dict, mb, settings, dtype) -> float:
    """real_megatron.memory's activation + output-layer terms for this micro-batch's real shape."""
    from real_megatron.actor.model import use_transformer_engine
    from real_megatron.memory import Architecture, MicroBatchShape, activation_bytes, output_layer_bytes

    arch = Architecture.from_hf(hf_config)
    cp_kv = 0.0
    if mb.cp_source is not None:  # a CP rank: its queries (1/cp of each sequence) against whole sequences
        from real_megatron.memory import context_parallel_kv_bytes

        cp = int(mb.cu_seqlens_padded[-1]) // mb.tokens.numel()
        lengths = (mb.cu_seqlens_padded[1:] - mb.cu_seqlens_padded[:-1]).tolist()
        area = sum(n * n for n in lengths) // cp
        cp_kv = context_parallel_kv_bytes(
            arch,
            mb.tokens.numel(),
            cp=cp,
            layers=arch.layers,
            dtype_bytes=dtype.itemsize,
            flash_attention=use_transformer_engine(settings.dtype),
            attention_area=area,
        )
    elif mb.packed:
        lengths = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).tolist()
        area = sum(n * n for n in lengths)
    else:
        area = mb.tokens.shape[0] * mb.tokens.shape[1] ** 2
    shape = MicroBatchShape(tokens=mb.tokens.numel(), response_tokens=mb.num_response_tokens, attention_area=area)
    nbytes = dtype.itemsize
    return cp_kv + (
        activation_bytes(
            arch,
            shape,
            layers=arch.layers,
            dtype_bytes=nbytes,
            flash_attention=use_transformer_engine(settings.dtype),
            recompute=settings.recompute_activations,
        )
        + output_layer_bytes(arch, shape, dtype_bytes=nbytes, fused=settings.actor.fused_output_layer)
    )


def worker(args) -> dict:
    import torch

    from real_megatron.actor.actor import Actor, ActorSettings
    from real_megatron.actor.batching import build_mini_batches, padding_fraction
    from real_megatron.actor.distributed import init_distributed, shutdown
    from real_megatron.actor.model import ArchSpec
    from real_megatron.actor.settings import ActorConfig
    from real_megatron.actor.weights import init_hf_state_dict
    from real_megatron.config import OptimConfig
    from real_megatron.objectives import build_objective

    torch.set_num_threads(args.threads)
    if args.attention == "megatron":
        from real_megatron.actor import attention_batches, cp_attention, packed_attention

        attention_batches.attend = cp_attention.attend = packed_attention.attend = megatron_attention
    init_distributed(tp=1, pp=1, cp=args.cp_ranks, timeout_s=600, seed=args.seed)
    cp_rank = torch.distributed.get_rank() if args.cp_ranks > 1 else 0
    heads = max(2, args.hidden // 64)
    hf_config = dict(
        model_type="qwen2",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max(4096, 2 * (args.response_tokens or args.max_response)),
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    spec = ArchSpec.from_hf(hf_config, "bench model")
    dtype = getattr(torch, args.dtype)
    groups = args.groups
    settings = ActorSettings(
        dtype=dtype,
        optim=OptimConfig(lr=1e-6),
        groups_per_mini_batch=groups,
        total_steps=10,
        recompute_activations=args.recompute,
        actor=ActorConfig(
            prompts_per_micro_batch=args.groups_per_micro if args.padded else groups,
            max_tokens_per_micro_batch=None if args.padded else args.max_tokens,
            pack_sequences=not args.padded,
            fused_output_layer=not args.naive,
        ),
    )
    weights = init_hf_state_dict(spec, seed=args.seed, dtype=dtype)
    actor = Actor(spec, settings, build_objective("real", tau=0.5, skip_uniform_groups=True), weights.__getitem__)
    if args.device == "cuda":
        torch.cuda.synchronize()

    batch = rollout_batch(groups, args.group_size, args.seed, args.vocab, args.mean_response, args.max_response)
    if args.response_tokens:
        for r in batch:
            r.response_ids = (r.response_ids * (args.response_tokens // len(r.response_ids) + 1))[
                : args.response_tokens
            ]
    # the same step first: Adam's state and every buffer exist, and nothing compiles in the timed step
    actor.train_step(batch)
    minis = build_mini_batches(
        batch,
        groups,
        settings.actor.prompts_per_micro_batch,
        1,
        0,
        packed=settings.actor.pack_sequences,
        max_tokens=settings.actor.max_tokens_per_micro_batch,
        cp_size=args.cp_ranks,
        cp_rank=cp_rank,
    )
    micro = [mb for m in minis for mb in m.micro_batches]
    estimate = max(estimated_step_bytes(hf_config, mb, settings, dtype) for mb in micro)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    sampler = AllocatorPeak() if args.allocator_peak else PeakSampler()
    step = actor.optimizer.step
    actor.optimizer.step = sampler.pause_during(step)
    with sampler:
        metrics = actor.train_step(batch)
        if args.device == "cuda":
            torch.cuda.synchronize()
    actor.optimizer.step = step
    seconds = time.perf_counter() - start
    if args.device == "cuda":
        peak = compute_peak = torch.cuda.max_memory_allocated() - base
    elif args.allocator_peak:
        peak, compute_peak = sampler.peak, sampler.compute_peak
    else:
        peak, compute_peak = sampler.peak - sampler.start, sampler.compute_peak - sampler.start
    tokens = sum(r.num_tokens for r in batch)
    result = {
        "tokens": tokens,
        "response_tokens": sum(len(r.response_ids) for r in batch),
        "step_s": seconds,
        "tokens_per_s": 2 * tokens / seconds,  # every token passes the model twice: old log-probs, update
        "padding_fraction": padding_fraction(micro),
        "peak_gb": peak / 1e9,
        "compute_peak_gb": compute_peak / 1e9,
        "micro_batches": len(micro),
        "max_slots": max(mb.tokens.numel() for mb in micro),
        "loss": metrics["loss"],
        "estimate_gb": estimate / 1e9,
    }
    shutdown()
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--groups-per-micro", type=int, default=1, help="padded + naive: groups per micro-batch")
    parser.add_argument("--max-tokens", type=int, default=4096, help="packed + fused: tokens per micro-batch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mean-response", type=float, default=400.0, help="response lengths' mean (log-normal)")
    parser.add_argument("--max-response", type=int, default=2048, help="response lengths' cap")
    parser.add_argument("--cp", type=int, default=1, help="compare cp=1 with this context parallelism instead")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size")
    parser.add_argument("--response-tokens", type=int, help="every response this long (else log-normal)")
    parser.add_argument(
        "--attention",
        default="sdpa",
        choices=["sdpa", "megatron"],
        help="the local spec's attention kernel: sdpa (the actor's), megatron (fp32 scores, as before)",
    )
    parser.add_argument(
        "--lengths", help="compare the attention before/after on rollouts of these lengths, e.g. 1024,4096"
    )
    parser.add_argument("--only", choices=list(VARIANTS), help="run one variant")
    parser.add_argument("--cp-ranks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--padded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--recompute", action="store_true", help="recompute every layer's activations in backward")
    parser.add_argument(
        "--allocator-peak", action="store_true", help="CPU: the peak of torch's allocator (profiler) instead of RSS"
    )
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.worker_out:
        result = worker(args)
        rank = int(os.environ.get("RANK", 0))
        Path(args.worker_out + (f".{rank}" if args.cp_ranks > 1 else "")).write_text(json.dumps(result))
        return 0
    if args.cp > 1:
        return compare_cp(args)
    if args.lengths:
        return compare_lengths(args)

    shared = [a for a in sys.argv[1:] if a not in ("--json",)]
    if args.only:
        shared = [a for a in shared if a not in ("--only", args.only)]
    results = {}
    for name, flags in VARIANTS.items():
        if args.only and name != args.only:
            continue
        out = Path(f"/tmp/bench_actor_{os.getpid()}_{name.replace('+', '_')}.json")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS: RSS tracks use
        proc = subprocess.run(
            [sys.executable, __file__, *shared, *flags, "--worker-out", str(out)],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        results[name] = json.loads(out.read_text())
        out.unlink()
    if args.json or args.only:
        print(json.dumps(results, indent=1))
        return 0
    base, new = results["padded+naive"], results["packed+fused"]
    lengths = response_lengths(args.groups * args.group_size, args.seed)
    print(
        f"model: Qwen2-shaped, hidden {args.hidden}, {args.layers} layers, vocabulary {VOCAB:,}, {args.dtype} on "
        f"{args.device}, {args.threads} threads"
    )
    print(
        f"batch: {args.groups} groups x {args.group_size} rollouts, prompts 80-120 tokens, responses log-normal "
        f"(sigma 1, mean 400, cap 2048): mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}; "
        f"{base['tokens']:,} tokens ({base['response_tokens']:,} response)"
    )
    print(
        f"padded+naive: {args.groups_per_micro} group(s) per micro-batch; packed+fused: {args.max_tokens} tokens "
        "per micro-batch\n"
    )
    rows = [
        ("tokens/s", "tokens_per_s", "{:.0f}"),
        ("step s", "step_s", "{:.1f}"),
        ("padding fraction", "padding_fraction", "{:.3f}"),
        ("micro-batches", "micro_batches", "{}"),
        ("peak memory GB (above model + optimizer)", "peak_gb", "{:.2f}"),
        ("  of which forward/backward (optimizer step out)", "compute_peak_gb", "{:.2f}"),
        ("  --dry-run's estimate of it", "estimate_gb", "{:.2f}"),
        ("loss", "loss", "{:.6f}"),
    ]
    print(f"| {'':42} | {'padded+naive':>12} | {'packed+fused':>12} | {'ratio':>7} |")
    print(f"|{'-' * 44}|{'-' * 14}|{'-' * 14}|{'-' * 9}|")
    for label, key, fmt in rows:
        ratio = ""
        if key == "tokens_per_s":
            ratio = f"{new[key] / base[key]:.2f}x"
        elif key in ("peak_gb", "compute_peak_gb"):
            ratio = f"1/{base[key] / max(new[key], 1e-9):.1f}"
        print(f"| {label:42} | {fmt.format(base[key]):>12} | {fmt.format(new[key]):>12} | {ratio:>7} |")
    return 0


def free_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024


def compare_lengths(args) -> int:
    """The attention before (megatron's fp32 scores) and after (scaled_dot_product_attention), packed
    + fused, on one group of two rollouts of each length: peak memory and step time."""
    skip = {"--lengths", "--max-tokens", "--groups", "--group-size", "--response-tokens", "--attention"}
    shared = []
    argv = [a for a in sys.argv[1:] if a != "--json"]
    i = 0
    while i < len(argv):
        if argv[i] in skip:
            i += 2
            continue
        shared.append(argv[i])
        i += 1
    heads = max(2, args.hidden // 64)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS: RSS tracks use
    results = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        response = length - 100  # prompts of 80-120 tokens
        flags = ["--groups", "1", "--group-size", "2", "--response-tokens", str(response)]
        flags += ["--max-tokens", str(2 * length + 64)]  # one micro-batch (a group is never split)
        for name, variant in ATTENTION.items():
            # megatron's way keeps ~3 [heads, L, L] fp32 tensors per layer for backward
            need = 3 * args.layers * heads * length**2 * 4
            if name == "before" and need > 0.7 * free_bytes():
                results[(length, name)] = {"skipped": need}
                continue
            out = Path(f"/tmp/bench_actor_{os.getpid()}_{length}_{name}.json")
            proc = subprocess.run(
                [sys.executable, __file__, *shared, *flags, *variant, "--worker-out", str(out)],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            results[(length, name)] = json.loads(out.read_text())
            out.unlink()
    if args.json:
        print(json.dumps({f"{n}@{k}": r for (k, n), r in results.items()}, indent=1))
        return 0
    print(
        f"model: Qwen2-shaped, hidden {args.hidden}, {args.layers} layers, {heads} heads, vocabulary {args.vocab:,}, "
        f"{args.dtype} on {args.device}, {args.threads} threads; packed rows, fused output layer; "
        "one group of two rollouts of each length in one micro-batch\n"
    )
    print(
        "| rollout tokens | before: peak GB | after: peak GB | after / before | before: step s | after: step s "
        "| estimate GB (after) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in [int(x) for x in args.lengths.split(",")]:
        before, after = results[(length, "before")], results[(length, "after")]
        if "skipped" in before:
            b_peak, ratio, b_step = f"not run (~{before['skipped'] / 1e9:.0f} GB of scores)", "", ""
        else:
            b_peak = f"{before['compute_peak_gb']:.3f}"
            ratio = f"1/{before['compute_peak_gb'] / max(after['compute_peak_gb'], 1e-9):.1f}"
            b_step = f"{before['step_s']:.1f}"
        print(
            f"| {length:,} | {b_peak} | {after['compute_peak_gb']:.3f} | {ratio} | {b_step} | {after['step_s']:.1f} "
            f"| {after['estimate_gb']:.3f} |"
        )
    return 0


def compare_cp(args) -> int:
    """packed + fused at cp=1 against cp=args.cp on the same rollouts: tokens/s, peaks per rank."""
    shared = [a for a in sys.argv[1:] if a != "--json"]
    shared = [a for i, a in enumerate(shared) if not (a == "--cp" or (i and shared[i - 1] == "--cp"))]
    shared = [a for i, a in enumerate(shared) if not (a == "--threads" or (i and shared[i - 1] == "--threads"))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS: RSS tracks use
    results = {}
    for cp in (1, args.cp):
        out = f"/tmp/bench_actor_{os.getpid()}_cp{cp}.json"
        threads = ["--threads", str(max(1, args.threads // cp))]
        launcher = (
            [sys.executable]
            if cp == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}"]
        )
        env["OMP_NUM_THREADS"] = threads[1]
        proc = subprocess.run(
            [*launcher, __file__, *shared, *threads, "--cp-ranks", str(cp), "--worker-out", out],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        files = [Path(out)] if cp == 1 else [Path(f"{out}.{r}") for r in range(cp)]
        ranks = [json.loads(f.read_text()) for f in files]
        for f in files:
            f.unlink()
        merged = dict(ranks[0])
        for key in ("peak_gb", "compute_peak_gb", "estimate_gb", "max_slots", "step_s"):
            merged[key] = max(r[key] for r in ranks)
        merged["tokens_per_s"] = 2 * merged["tokens"] / merged["step_s"]
        results[f"cp={cp}"] = merged
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    base, new = results["cp=1"], results[f"cp={args.cp}"]
    lengths = response_lengths(args.groups * args.group_size, args.seed, args.mean_response, args.max_response)
    print(
        f"model: Qwen2-shaped, hidden {args.hidden}, {args.layers} layers, vocabulary {VOCAB:,}, {args.dtype} on "
        f"{args.device}, {args.threads} threads in all; packed rows, fused output layer, local spec attention"
    )
    print(
        f"batch: {args.groups} group(s) x {args.group_size} rollouts, prompts 80-120 tokens, responses log-normal "
        f"(sigma 1, mean {args.mean_response:.0f}, cap {args.max_response}): {sorted(lengths)}; "
        f"{base['tokens']:,} tokens ({base['response_tokens']:,} response); budget {args.max_tokens} tokens per rank\n"
    )
    rows = [
        ("tokens/s", "tokens_per_s", "{:.0f}"),
        ("step s", "step_s", "{:.1f}"),
        ("micro-batches", "micro_batches", "{}"),
        ("token slots per rank (largest micro-batch)", "max_slots", "{}"),
        ("peak memory GB per rank (above model + optimizer)", "peak_gb", "{:.3f}"),
        ("  of which forward/backward (optimizer step out)", "compute_peak_gb", "{:.3f}"),
        ("  the memory estimate of it", "estimate_gb", "{:.3f}"),
        ("loss", "loss", "{:.6f}"),
    ]
    name = f"cp={args.cp}"
    print(f"| {'':50} | {'cp=1':>10} | {name:>10} | {'ratio':>7} |")
    print(f"|{'-' * 52}|{'-' * 12}|{'-' * 12}|{'-' * 9}|")
    for label, key, fmt in rows:
        ratio = (
            f"{new[key] / base[key]:.2f}"
            if key in ("tokens_per_s", "peak_gb", "compute_peak_gb", "max_slots", "estimate_gb")
            else ""
        )
        print(f"| {label:50} | {fmt.format(base[key]):>10} | {fmt.format(new[key]):>10} | {ratio:>7} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
