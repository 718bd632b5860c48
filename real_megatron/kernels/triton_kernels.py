"""Triton kernels of the loss path, with launch wrappers taking and returning torch tensors.

On CUDA they compile; on CPU they run under TRITON_INTERPRET=1 (how CI tests them against the
torch reference in `reference.py`). Shapes and semantics mirror that reference exactly:

- `lse_partials`: one program per token row; a single pass over this rank's vocabulary shard with
  an online (max, sum-exp) and the entropy moment sum_v e^(x_v - m) (x_v - m); also picks the
  target's logit when the target id falls in this shard.
- `logprob_grad`: one program per row; writes d(loss)/d(logits) in the logits' dtype.
- `segment_sum`: token -> sequence sums (atomic adds; sequences in any order).
- `segment_max_sumexp`: per-group (max, sum-exp) partials of a 1-D array of values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024  # vocabulary columns per loop iteration
BLOCK_N = 256  # 1-D elements per program for the segment kernels


@triton.jit
def _lse_partials_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    vocab_start,
    vocab_local,
    max_ptr,
    sumexp_ptr,
    moment_ptr,
    target_logit_ptr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    run_max = tl.full((), -float("inf"), tl.float32)
    run_sum = tl.full((), 0.0, tl.float32)
    run_moment = tl.full((), 0.0, tl.float32)  # sum e^(x - run_max) * (x - run_max)
    for start in range(0, vocab_local, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab_local
        x = tl.load(base + cols, mask=valid, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        scale = tl.exp(run_max - new_max)
        e = tl.where(valid, tl.exp(x - new_max), 0.0)
        # e == 0 where x = -inf (a masked, e.g. padded, vocabulary column): keep 0 * inf out
        centred = tl.where(e > 0, x - new_max, 0.0)
        # moment about the new max: scale * (old moment + (old max - new max) * old sum)
        shift = tl.where(run_sum > 0, run_max - new_max, 0.0) * run_sum
        run_moment = scale * (run_moment + shift) + tl.sum(e * centred, axis=0)
        run_sum = run_sum * scale + tl.sum(e, axis=0)
        run_max = new_max
    target = tl.load(targets_ptr + row) - vocab_start
    here = (target >= 0) & (target < vocab_local)
    safe = tl.where(here, target, 0)
    target_logit = tl.load(base + safe).to(tl.float32)
    tl.store(max_ptr + row, run_max)
    tl.store(sumexp_ptr + row, run_sum)
    tl.store(moment_ptr + row, run_moment)
    tl.store(target_logit_ptr + row, tl.where(here, target_logit, 0.0))


def lse_partials(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, *, entropy: bool = True, inplace: bool = False
) -> torch.Tensor:
    """[T, 4] float32: (max, sum-exp about max, entropy moment about max, target logit or 0).
    One pass computes the moment anyway (it is free here); `entropy`/`inplace` are the reference's."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    T, V = logits.shape
    out = torch.empty(4, T, dtype=torch.float32, device=logits.device)
    if T:
        _lse_partials_kernel[(T,)](
            logits,
            logits.stride(0),
            targets.contiguous(),
            vocab_start,
            V,
            out[0],
            out[1],
            out[2],
            out[3],
            BLOCK=min(BLOCK_V, triton.next_power_of_2(V)),
        )
    return out.t()


@triton.jit
def _logprob_grad_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad,
    targets_ptr,
    vocab_start,
    vocab_local,
    lse_ptr,
    mean_logit_ptr,
    grad_lp_ptr,
    grad_ent_ptr,
    HAS_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(grad_lp_ptr + row)
    target = tl.load(targets_ptr + row) - vocab_start
    if HAS_ENTROPY:
        mean_logit = tl.load(mean_logit_ptr + row)
        g_ent = tl.load(grad_ent_ptr + row)
    for start in range(0, vocab_local, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab_local
        x = tl.load(logits_ptr + row * stride_row + cols, mask=valid, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        grad = tl.where(cols == target, g_lp, 0.0) - g_lp * p
        if HAS_ENTROPY:
            grad -= g_ent * p * tl.where(p > 0, x - mean_logit, 0.0)  # dH/dx = -p (x - E_p[x])
        tl.store(grad_ptr + row * stride_grad + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def logprob_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    lse: torch.Tensor,
    mean_logit: torch.Tensor | None,
    grad_lp: torch.Tensor,
    grad_ent: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    T, V = logits.shape
    grad = torch.empty_like(logits) if out is None else out
    has_entropy = grad_ent is not None
    if T:
        _logprob_grad_kernel[(T,)](
            logits,
            logits.stride(0),
            grad,
            grad.stride(0),
            targets.contiguous(),
            vocab_start,
            V,
            lse.contiguous(),
            (mean_logit if has_entropy else lse).contiguous(),
            grad_lp.float().contiguous(),
            (grad_ent if has_entropy else grad_lp).float().contiguous(),
            HAS_ENTROPY=has_entropy,
            BLOCK=min(BLOCK_V, triton.next_power_of_2(V)),
        )
    return grad


@triton.jit
def _segment_sum_kernel(values_ptr, index_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    v = tl.load(values_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    seg = tl.load(index_ptr + offs, mask=valid, other=0)
    tl.atomic_add(out_ptr + seg, v, mask=valid)


def segment_sum(values: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    out = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    n = values.numel()
    if n:
        _segment_sum_kernel[(triton.cdiv(n, BLOCK_N),)](values.contiguous(), index.contiguous(), out, n, BLOCK=BLOCK_N)
    return out


@triton.jit
def _segment_max_kernel(values_ptr, index_ptr, max_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    v = tl.load(values_ptr + offs, mask=valid, other=-float("inf")).to(tl.float32)
    seg = tl.load(index_ptr + offs, mask=valid, other=0)
    tl.atomic_max(max_ptr + seg, v, mask=valid)


@triton.jit
def _segment_sumexp_kernel(values_ptr, index_ptr, max_ptr, sum_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    v = tl.load(values_ptr + offs, mask=valid, other=-float("inf")).to(tl.float32)
    seg = tl.load(index_ptr + offs, mask=valid, other=0)
    m = tl.load(max_ptr + seg, mask=valid, other=0.0)
    m = tl.where(m == -float("inf"), 0.0, m)  # a segment of -inf values only: sum stays 0
    tl.atomic_add(sum_ptr + seg, tl.exp(v - m), mask=valid)


def segment_max_sumexp(values: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[2, G] float32: per-segment max (-inf when empty) and sum of exp(v - max) (0 when empty)."""
    out = torch.zeros(2, num_segments, dtype=torch.float32, device=values.device)
    out[0].fill_(-float("inf"))
    n = values.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK_N),)
        values, index = values.contiguous(), index.contiguous()
        _segment_max_kernel[grid](values, index, out[0], n, BLOCK=BLOCK_N)
        _segment_sumexp_kernel[grid](values, index, out[0], out[1], n, BLOCK=BLOCK_N)
    return out
