#!/usr/bin/env python
"""Benchmark: token log-probs of an output layer, naive vs fused, forward + backward.

    python tools/bench_kernels.py                      # Qwen2-1.5B shapes, fp32, CPU
    python tools/bench_kernels.py --tokens 512 --vocab 32000
    python tools/bench_kernels.py --device cuda --dtype bfloat16        # the card's peaks from PEAKS

Three paths, each measured in its own process (so peak memory is its own):
  naive   logits = h @ W^T (materialised), log_softmax, gather, backward
  token   logits = h @ W^T (materialised), real_megatron.kernels.token_logprobs, backward
  linear  real_megatron.kernels.linear_token_logprobs(h, W): chunked, [T, V] never exists
Peak extra memory is above the inputs (h, W): the process's peak RSS minus its RSS before the
step on CPU, torch.cuda.max_memory_allocated minus the allocated bytes before the step on CUDA.
Working memory is that minus the gradients the step must return (dh and dW, the same in every
path; in a Megatron run dW lands in the persistent main_grad buffer). Printed as a table of ratios
against the naive path measured in the same run, with each path's matrix multiplies in TFLOP/s
(6 T H V: logits forward, their gradients for h and W; the fused path also recomputes the logits
in backward, which is not counted) and that as a share of the card's dense peak for the dtype.

Bandwidth is measured where it bounds the time, on the two kernels that only stream the logits,
each timed alone on a materialised [T, V] logits tensor (best of repeats):
  lse     the log-sum-exp partials (forward): reads T V logits once
  grad    the gradient of the log-probs (backward): reads T V logits, writes T V gradients
reported in GB/s (1e9 bytes) and as a share of the card's HBM bandwidth (PEAKS, by device name;
--hbm-gbps and --peak-tflops override). A step that includes the matrix multiplies is dominated by
them and says nothing about bandwidth.
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
KERNELS = ("lse", "grad")

# Dense peaks by device name (first match wins; no sparsity): bf16/fp16 tensor-core TFLOP/s, fp32
# TFLOP/s (no TF32; the check turns TF32 off) and HBM GB/s, from NVIDIA's data sheets.
PEAKS = (
    ("H200 NVL", dict(bf16_tflops=835.0, fp32_tflops=60.0, hbm_gbps=4800.0)),
    ("H200", dict(bf16_tflops=989.0, fp32_tflops=67.0, hbm_gbps=4800.0)),
    ("H100 NVL", dict(bf16_tflops=835.0, fp32_tflops=60.0, hbm_gbps=3900.0)),
    ("H100 PCIe", dict(bf16_tflops=756.0, fp32_tflops=51.0, hbm_gbps=2000.0)),
    ("H100", dict(bf16_tflops=989.0, fp32_tflops=67.0, hbm_gbps=3350.0)),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", dict(bf16_tflops=312.0, fp32_tflops=19.5, hbm_gbps=2039.0)),
    ("A100", dict(bf16_tflops=312.0, fp32_tflops=19.5, hbm_gbps=1555.0)),
)


def card_peaks(name: str) -> dict:
    """The PEAKS row whose key the device name contains ({} values None when the card is unknown)."""
    for key, peaks in PEAKS:
        if key.lower() in name.lower():
            return dict(peaks, card=key)
    return dict(bf16_tflops=None, fp32_tflops=None, hbm_gbps=None, card=None)


def matmul_flops(tokens: int, hidden: int, vocab: int) -> float:
    """The output layer's matrix multiplies, forward + backward: h W^T, then dh and dW (2 T H V each)."""
    return 6.0 * tokens * hidden * vocab


def kernel_bytes(kernel: str, tokens: int, vocab: int, element_size: int) -> int:
    """HBM traffic of a bandwidth-bound kernel over [T, V] logits (the [T]-sized vectors neglected)."""
    return {"lse": 1, "grad": 2}[kernel] * tokens * vocab * element_size


def share(value: float, peak: float | None) -> str:
    return f"{100 * value / peak:.0f}%" if peak else "-"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(args) -> dict:
    """One path, in this process: returns seconds (best of repeats) and peak extra bytes (first run)."""
    from real_megatron.kernels import linear_token_logprobs, token_logprobs

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.mode in KERNELS:
        return run_kernel(args, device, dtype)
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


def run_kernel(args, device, dtype) -> dict:
    """One bandwidth-bound kernel alone on materialised logits: seconds (best of repeats after a warm-up)."""
    from real_megatron.kernels.dispatch import backend

    logits = torch.empty(args.tokens, args.vocab, device=device, dtype=dtype).normal_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    ops = backend(args.impl, logits)
    parts = ops.lse_partials(logits, targets, 0)
    lse = (parts[:, 0] + torch.log(parts[:, 1])).contiguous()
    mean_logit = (parts[:, 0] + parts[:, 2] / parts[:, 1]).contiguous()
    grad_lp, grad_ent = torch.randn(args.tokens, device=device), torch.randn(args.tokens, device=device)
    out = torch.empty_like(logits)
    if args.mode == "lse":
        run = lambda: ops.lse_partials(logits, targets, 0)  # noqa: E731
    else:
        run = lambda: ops.logprob_grad(logits, targets, 0, lse, mean_logit, grad_lp, grad_ent, out=out)  # noqa: E731
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()  # compile (Triton) outside the timed runs
    times = []
    for _ in range(max(args.repeats, 3)):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return {
        "mode": args.mode,
        "seconds": min(times),
        "bytes": kernel_bytes(args.mode, args.tokens, args.vocab, logits.element_size()),
    }


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
    parser.add_argument("--hbm-gbps", type=float, default=None, help="memory bandwidth peak (default: PEAKS)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak for --dtype (default: PEAKS)")
    parser.add_argument("--mode", choices=MODES + KERNELS, help=argparse.SUPPRESS)  # internal: run one path
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    if args.mode:
        print(json.dumps(run_one(args)))
        return 0

    results = {}
    for mode in MODES + KERNELS:
        cmd = [sys.executable, __file__, "--mode", mode] + [
            a for a in sys.argv[1:] if not a.startswith("--json") and a != args.json
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"bench_kernels: the {mode} path failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peaks = card_peaks(device_name)
    flops_peak = args.peak_tflops or peaks["fp32_tflops" if args.dtype == "float32" else "bf16_tflops"]
    hbm = args.hbm_gbps or peaks["hbm_gbps"]
    naive = results["naive"]
    print(
        f"T={args.tokens} H={args.hidden} V={args.vocab} {args.dtype} on {device_name} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads); forward + backward; "
        f"peaks: {flops_peak or '-'} TFLOP/s, {hbm or '-'} GB/s ({peaks['card'] or 'card not in PEAKS'})"
    )
    print(
        f"{'path':<8} {'seconds':>9} {'x naive':>8} {'peak extra MB':>14} {'naive / this':>13}"
        f" {'working MB':>11} {'naive / this':>13} {'TFLOP/s':>8} {'of peak':>8}"
    )
    flops = matmul_flops(args.tokens, args.hidden, args.vocab)
    for mode in MODES:
        r = results[mode]
        r["tflops"] = flops / r["seconds"] / 1e12
        print(
            f"{mode:<8} {r['seconds']:>9.3f} {r['seconds'] / naive['seconds']:>8.2f} "
            f"{r['peak_extra_bytes'] / 2**20:>14.0f} {naive['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):>13.2f}"
            f" {r['working_bytes'] / 2**20:>11.0f} {naive['working_bytes'] / max(r['working_bytes'], 1):>13.2f}"
            f" {r['tflops']:>8.2f} {share(r['tflops'], flops_peak):>8}"
        )
    print(f"{'kernel':<8} {'seconds':>9} {'GB moved':>9} {'GB/s':>8} {'of HBM':>7}")
    for mode in KERNELS:
        r = results[mode]
        r["gbps"] = r["bytes"] / r["seconds"] / 1e9
        print(f"{mode:<8} {r['seconds']:>9.4f} {r['bytes'] / 1e9:>9.3f} {r['gbps']:>8.0f} {share(r['gbps'], hbm):>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name, "peaks": peaks, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
