"""Torch implementations of the kernels in `triton_kernels.py`: same inputs, same outputs.

They run everywhere (CPU, CUDA without Triton) and are the reference the Triton kernels are tested
against. They work over token chunks so that, for bf16/fp16 logits, no [T, V] float32 temporary
exists; `inplace=True` lets a caller that owns a float32 chunk (the chunked output layer) have it
overwritten instead of copied.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22  # float32 elements per temporary (16 MB)


def _chunks(num_rows: int, row_len: int):
    step = max(1, CHUNK_ELEMENTS // max(1, row_len))
    for start in range(0, num_rows, step):
        yield start, min(num_rows, start + step)


def _target_logits(x: torch.Tensor, targets: torch.Tensor, vocab_start: int) -> torch.Tensor:
    local = targets - vocab_start
    here = (local >= 0) & (local < x.shape[1])
    picked = x.gather(1, local.clamp(0, x.shape[1] - 1).unsqueeze(1)).squeeze(1).float()
    return torch.where(here, picked, torch.zeros_like(picked))


def lse_partials(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, *, entropy: bool = True, inplace: bool = False
) -> torch.Tensor:
    """[T, 4] float32 per row: (max m, sum e^(x-m), sum e^(x-m)(x-m), target logit or 0).

    Without `entropy`, the first two are (logsumexp, 1) and the moment is 0: one fused reduction.
    """
    T, V = logits.shape
    out = torch.empty(T, 4, dtype=torch.float32, device=logits.device)
    for s, e in _chunks(T, V):
        x = logits[s:e]
        out[s:e, 3] = _target_logits(x, targets[s:e], vocab_start)
        fresh = x.dtype != torch.float32  # .float() below copies: ours to overwrite
        x = x.float()
        if not entropy:
            out[s:e, 0] = torch.logsumexp(x, dim=1)
            out[s:e, 1] = 1.0
            out[s:e, 2] = 0.0
            continue
        m = x.amax(dim=1)
        centred = x.sub_(m[:, None]) if inplace or fresh else x - m[:, None]
        p = centred.exp()
        centred.clamp_(min=torch.finfo(torch.float32).min)  # -inf (masked columns) has p = 0: no 0 * inf
        out[s:e, 0] = m
        out[s:e, 1] = p.sum(dim=1)
        out[s:e, 2] = torch.bmm(p.unsqueeze(1), centred.unsqueeze(2)).flatten()  # no [rows, V] product
    return out


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
    """d(loss)/d(logits) = g_lp (onehot - p) - g_ent p (x - E_p[x]), in the logits' dtype.

    `out` may be `logits` itself (a float32 chunk the caller owns): it is then overwritten.
    """
    T, V = logits.shape
    grad = torch.empty_like(logits) if out is None else out
    for s, e in _chunks(T, V):
        x = logits[s:e].float()
        fresh = logits.dtype != torch.float32
        work = x if fresh or x.data_ptr() == grad[s:e].data_ptr() else x.clone()
        g_lp = grad_lp[s:e, None].float()
        if grad_ent is None:
            work.sub_(lse[s:e, None]).exp_().mul_(-g_lp)
        else:
            work.sub_(mean_logit[s:e, None])  # x - E[x]
            p = torch.exp(work + (mean_logit[s:e] - lse[s:e])[:, None])
            work.masked_fill_(p == 0, 0.0)  # masked (-inf) columns have p = 0: keep 0 * inf out
            work.mul_(grad_ent[s:e, None].float()).add_(g_lp).mul_(p).neg_()
        local = targets[s:e] - vocab_start
        here = (local >= 0) & (local < V)
        rows = torch.nonzero(here).flatten()
        work[rows, local[rows]] += g_lp[rows, 0]
        if work.data_ptr() != grad[s:e].data_ptr():
            grad[s:e].copy_(work)
    return grad


def _accumulation_dtype(values: torch.Tensor) -> torch.dtype:
    return torch.promote_types(values.dtype, torch.float32)  # float64 stays float64 (exact checks)


def segment_sum(values: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    dtype = _accumulation_dtype(values)
    out = torch.zeros(num_segments, dtype=dtype, device=values.device)
    return out.index_add_(0, index, values.to(dtype))


def segment_max_sumexp(values: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[2, G]: per-segment max (-inf when empty) and sum of exp(v - max) (0 when empty)."""
    values = values.to(_accumulation_dtype(values))
    seg_max = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    seg_max = seg_max.scatter_reduce(0, index, values, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(seg_max), seg_max, torch.zeros_like(seg_max))
    sums = torch.zeros_like(seg_max).index_add_(0, index, torch.exp(values - shift[index]))
    return torch.stack([seg_max, sums])
