"""The output layer fused with token log-probs: [T, V] logits never exist at once.

Tokens are processed in chunks and, within a chunk, the vocabulary in blocks, so one tile of
logits (chunk x block, at most CHUNK_LOGITS elements) exists at a time. Forward: each tile's
per-token partials (as in `token_logprobs`) are merged online; one all_gather over the TP group
at the end. Backward recomputes each tile, overwrites it with its gradient, accumulates grad_hidden
and writes that tile's contribution to grad_weight. Walking the vocabulary in blocks streams the
weight once per token chunk instead of once per small token chunk.

`hidden` is taken as replicated over the TP group (Megatron's output-layer input); its gradient
is summed over the group in backward, as Megatron's copy-to-TP-region does (or left per rank, for
a caller whose own collective sums it: sequence parallelism's gather reduce-scatters in backward).
Rows of the last shard past `vocab_size` (Megatron pads the vocabulary to a multiple of TP) are
not tokens and are left out.
"""

from __future__ import annotations

import torch

from .collectives import all_reduce_sum_, group_rank, group_size
from .dispatch import backend
from .token_logprobs import check_targets, combine_partials, finish_forward, merge_partials, upstream_grads

CHUNK_LOGITS = 1 << 25  # float32 elements of one tile of logits (128 MB)
MAX_CHUNK_TOKENS = 8192  # default token chunk: all tokens up to this


def default_chunk_tokens(num_tokens: int) -> int:
    return max(1, min(num_tokens, MAX_CHUNK_TOKENS))


def _tiles(num_tokens: int, vocab: int, chunk: int):
    """(token slice, [(vocab start, vocab end), ...]) per token chunk."""
    block = max(1, min(vocab, CHUNK_LOGITS // max(1, min(chunk, num_tokens))))
    blocks = [(b, min(vocab, b + block)) for b in range(0, vocab, block)]
    for s in range(0, num_tokens, chunk):
        yield slice(s, min(num_tokens, s + chunk)), blocks


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, chunk, want_entropy, impl, vocab_start, sum_grad_hidden, scale):
        ops = backend(impl, hidden)
        parts = torch.empty(hidden.shape[0], 4, dtype=torch.float32, device=hidden.device)
        for rows, blocks in _tiles(hidden.shape[0], weight.shape[0], chunk):
            pieces = []
            for b0, b1 in blocks:
                logits = _scaled(hidden[rows] @ weight[b0:b1].t(), scale)
                pieces.append(
                    ops.lse_partials(logits, targets[rows], vocab_start + b0, entropy=want_entropy, inplace=True)
                )
                del logits
            parts[rows] = merge_partials(torch.stack(pieces))
        lse, logprobs, mean_logit, entropy = combine_partials(parts, tp_group)
        ctx.save_for_backward(hidden, weight, targets, lse, mean_logit)
        ctx.ops, ctx.vocab_start, ctx.chunk, ctx.want_entropy, ctx.tp_group = (
            ops,
            vocab_start,
            chunk,
            want_entropy,
            tp_group,
        )
        ctx.sum_grad_hidden, ctx.scale = sum_grad_hidden, scale
        return finish_forward(ctx, logprobs, entropy, want_entropy)

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, targets, lse, mean_logit = ctx.saved_tensors
        if grad_lp is None and grad_ent is None:
            return (None,) * 10
        grad_lp, grad_ent = upstream_grads(ctx, lse, grad_lp, grad_ent)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        low_precision = hidden.dtype in (torch.bfloat16, torch.float16)
        # sums over vocabulary blocks (dh) and token chunks (dW) accumulate in float32 for bf16/fp16;
        # the GEMMs themselves take 16-bit inputs (tensor cores) with float32 output (see _mm_f32)
        acc = torch.float32 if low_precision else hidden.dtype
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        for rows, blocks in _tiles(hidden.shape[0], weight.shape[0], ctx.chunk):
            h = hidden[rows]
            h_in = _gemm_input(h)  # one conversion per token chunk where the GEMM cannot take 16-bit inputs
            for b0, b1 in blocks:
                w = weight[b0:b1]
                logits = _scaled(h @ w.t(), ctx.scale)
                g = ctx.ops.logprob_grad(
                    logits,
                    targets[rows],
                    ctx.vocab_start + b0,
                    lse[rows],
                    None if mean_logit is None else mean_logit[rows],
                    grad_lp[rows],
                    None if grad_ent is None else grad_ent[rows],
                    out=logits,
                )
                if ctx.scale != 1.0:  # d(x * scale)/dx
                    g.mul_(ctx.scale)
                g = g.to(hidden.dtype)  # a no-op unless scaled: 16-bit GEMM inputs
                if need_hidden:
                    _add_mm(grad_hidden[rows], g, _gemm_input(w))
                if need_weight:
                    _add_mm(grad_weight[b0:b1], g.t(), h_in)
                del logits, g
        if need_hidden and ctx.sum_grad_hidden:
            all_reduce_sum_(
                grad_hidden, ctx.tp_group, "linear_token_logprobs backward: grad of the replicated hidden states"
            )
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _scaled(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """logits * scale in float32 (a fresh tile): temperature applied as the engines apply it, to
    the rounded logits, not to 16-bit hidden states (which would add a rounding they lack)."""
    return logits if scale == 1.0 else logits.float().mul_(scale)


def _fp32_out_gemm(device: torch.device) -> bool:
    """Whether torch.mm takes 16-bit inputs with a float32 output here (CUDA, torch >= 2.8)."""
    return device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype")


def _gemm_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32 or _fp32_out_gemm(x.device):
        return x
    return x.float()


def _add_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, out in float32 (or float64): on CUDA with 16-bit a and b, one tensor-core GEMM
    with float32 accumulation and output (~14x a float32 GEMM on Hopper); elsewhere in out's dtype."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        out.addmm_(a, b)
    elif a.dtype == b.dtype and _fp32_out_gemm(a.device):
        out += torch.mm(a, b, out_dtype=out.dtype)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


def linear_token_logprobs(
    hidden,
    weight,
    targets,
    *,
    tp_group=None,
    vocab_size=None,
    sum_grad_hidden=True,
    chunk_tokens=None,
    return_entropy=False,
    impl="auto",
    scale=1.0,
    check_ids=True,
):
    """log p(target) per token of (hidden [T, H] @ weight[V_local, H]^T), never materialising [T, V].

    Same outputs as token_logprobs(hidden @ weight.T, ...); gradients for hidden and weight.
    vocab_size: the real vocabulary when the TP shards are padded (rows of this shard at global ids
    >= vocab_size are skipped; their weight gradient is zero). sum_grad_hidden=False leaves the
    hidden-state gradient unsummed over the TP group (the caller's collective sums it).
    chunk_tokens: tokens per chunk (default: all, up to 8192); the vocabulary is walked in blocks
    so that one tile of logits holds at most CHUNK_LOGITS (2^25) elements.
    scale: the logits are multiplied by it in float32 (1 / the sampling temperature).
    check_ids=False skips the targets' range check (one device sync): for callers that checked the
    ids on the host, as the actor does for every rollout before its step.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_token_logprobs: expected hidden [T, H] and weight [V_local, H], got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    shard = weight.shape[0]
    vocab_start = group_rank(tp_group) * shard
    padded = shard * group_size(tp_group)
    vocab = padded if vocab_size is None else vocab_size
    if not padded - shard < vocab <= padded:
        raise ValueError(
            f"linear_token_logprobs: vocab_size={vocab} does not fit {group_size(tp_group)} shards of {shard} rows "
            "(padding must be less than one shard)"
        )
    check_targets(targets, hidden.shape[0], vocab, "linear_token_logprobs", values=check_ids)
    if vocab_start + shard > vocab:  # this shard ends in padding rows: leave them out (a view; grads flow back)
        weight = weight[: vocab - vocab_start]
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"linear_token_logprobs: chunk_tokens must be >= 1, got {chunk_tokens}")
    chunk = chunk_tokens or default_chunk_tokens(hidden.shape[0])
    logprobs, entropy = _LinearTokenLogprobs.apply(
        hidden, weight, targets, tp_group, chunk, return_entropy, impl, vocab_start, sum_grad_hidden, float(scale)
    )
    return (logprobs, entropy) if return_entropy else logprobs
