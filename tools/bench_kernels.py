#!/usr/bin/env python
"""Benchmark: token log-probs of an output layer, naive vs fused, forward + backward.

    python tools/bench_kernels.py                      # Qwen2-1.5B shapes, fp32, CPU
    python tools/bench_kernels.py --tokens 512 --vocab 32000
    python tools/bench_kernels.py --device cuda --dtype bfloat16 --hbm-gbps 3350

Three paths, each measured in its own process (so peak memory is its own):
  naive   logits = h @ W^T (materialised), log_softmax, gather, backward
  token   logits = h @ W^T (materialised), real_megatron.kernels.token_logprobs, backward
  linear  real_megatron.kernels.linear_token_logprobs(h, W): chunked, [T, V] never exists
Peak extra memory is above the inputs (h, W): the process's peak RSS minus its RSS before the
step on CPU, torch.cuda.max_memory_allocated minus the allocated bytes before the step on CUDA.
Working memory is that minus the gradients the step must return (dh and dW, the same in every
path; in a Megatron run dW lands in the persistent main_grad buffer). Printed as a table of ratios
against the naive path measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

MODES = ("naive", "token", "linear")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(args) -> dict:
    """One path, in this process: returns seconds (best of repeats) and peak extra bytes (first run)."""
    from real_megatron.kernels import linear_token_logprobs, token_logprobs

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    # created in place: no temporaries that would raise the memory high-water mark before the step
    hidden = torch.empty(args.tokens, args.hidden, device=device, dtype=dtype).normal_().requires_grad_(True)
    weight = torch.empty(args.vocab, args.hidden, device=device, dtype=dtype).normal_(0, 0.02).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    upstream = torch.randn(args.tokens, device=device)

    def step():
        if args.mode == "naive":
            logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
            lp = logp.gather(1, targets[:, None]).squeeze(1)
        elif args.mode == "token":
            lp = token_logprobs(hidden @ weight.t(), targets, impl=args.impl)
        else:
            lp = linear_token_logprobs(hidden, weight, targets, impl=args.impl, chunk_tokens=args.chunk_tokens)
        (lp * upstream).sum().backward()
        hidden.grad = weight.grad = None

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":  # compile the Triton kernels (and warm cuBLAS) outside the timed runs
        step()
    times, peak = [], None
    for i in range(args.repeats):
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss_bytes()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        if i == 0:
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    return {"mode": args.mode, "seconds": min(times), "peak_extra_bytes": peak, "working_bytes": peak - grad_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--impl", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--chunk-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--hbm-gbps", type=float, default=None, help="GPU memory bandwidth peak, for the %% column")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: run one path
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    if args.mode:
        print(json.dumps(run_one(args)))
        return 0

    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode] + [
            a for a in sys.argv[1:] if not a.startswith("--json") and a != args.json
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"bench_kernels: the {mode} path failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])

    naive = results["naive"]
    elem = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    logits_bytes = args.tokens * args.vocab * elem
    print(
        f"T={args.tokens} H={args.hidden} V={args.vocab} {args.dtype} on {args.device} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads); forward + backward"
    )
    header = (
        f"{'path':<8} {'seconds':>9} {'x naive':>8} {'peak extra MB':>14} {'naive / this':>13}"
        f" {'working MB':>11} {'naive / this':>13}"
    )
    if args.device.startswith("cuda"):
        header += f" {'logits GB/s':>12}" + (f" {'% of HBM':>9}" if args.hbm_gbps else "")
    print(header)
    for mode in MODES:
        r = results[mode]
        line = (
            f"{mode:<8} {r['seconds']:>9.3f} {r['seconds'] / naive['seconds']:>8.2f} "
            f"{r['peak_extra_bytes'] / 2**20:>14.0f} {naive['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):>13.2f}"
            f" {r['working_bytes'] / 2**20:>11.0f} {naive['working_bytes'] / max(r['working_bytes'], 1):>13.2f}"
        )
        if args.device.startswith("cuda"):
            gbps = 3 * logits_bytes / r["seconds"] / 1e9  # logits read in forward, read + written in backward
            line += f" {gbps:>12.0f}" + (f" {100 * gbps / args.hbm_gbps:>8.0f}%" if args.hbm_gbps else "")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
