"""Token log-probs (and entropy) from vocabulary-parallel logits, with an exact backward.

Each tensor-parallel rank holds a contiguous shard of the vocabulary. Forward: one pass over the
local logits gives per-token partials (max, sum-exp, entropy moment, target logit); one all_gather
of those O(T) partials gives every rank the same log-sum-exp, log-prob and entropy. Backward is
local: d/dx_v = g_lp (1[v = target] - p_v) - g_ent p_v (x_v - E_p[x]).
"""

from __future__ import annotations

import torch

from .collectives import all_gather_stack, group_rank, group_size
from .dispatch import backend, value_checks_enabled


def merge_partials(parts: torch.Tensor) -> torch.Tensor:
    """Merge [k, T, 4] partials of disjoint vocabulary pieces into [T, 4] (about the common max)."""
    m, s, moment, target = parts.unbind(-1)
    top = m.amax(dim=0)
    weight = torch.exp(m - top)
    total = (weight * s).sum(dim=0)
    total_moment = (weight * (moment + (m - top) * s)).sum(dim=0)  # sum_v e^(x_v - top) (x_v - top)
    return torch.stack([top, total, total_moment, target.sum(dim=0)], dim=-1)


def combine_partials(parts: torch.Tensor, tp_group) -> tuple[torch.Tensor, ...]:
    """Gather [T, 4] partials over the TP group; return (lse, logprob, mean_logit, entropy), each [T]."""
    gathered = all_gather_stack(parts, tp_group, "token_logprobs: vocab-parallel (max, sum-exp) partials")
    top, total, total_moment, target = merge_partials(gathered).unbind(-1)
    lse = top + torch.log(total)
    mean_over_total = total_moment / total
    return lse, target - lse, top + mean_over_total, torch.log(total) - mean_over_total


def check_targets(targets: torch.Tensor, rows: int, vocab: int, name: str, values: bool = True) -> None:
    """Shape and dtype always; the ids' range unless `values` is False (a caller that checked them
    on the host: reading them back from a GPU is a device sync per call)."""
    if targets.shape != (rows,):
        raise ValueError(f"{name}: targets must have shape [{rows}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: targets must be int32/int64 token ids, got {targets.dtype}")
    if (
        targets.is_meta or not values or not value_checks_enabled()
    ):  # meta: no values (shape-only runs, such as device-placement tests)
        return
    bad = (targets < 0) | (targets >= vocab)
    if rows and bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{name}: target id {int(targets[first])} at position {first} is outside the vocabulary [0, {vocab})"
        )


def finish_forward(ctx, logprobs: torch.Tensor, entropy: torch.Tensor, want_entropy: bool):
    """Shared end of both autograd forwards: optional grads in backward, entropy only if asked."""
    ctx.set_materialize_grads(False)
    if not want_entropy:
        entropy = torch.zeros_like(logprobs)
        ctx.mark_non_differentiable(entropy)
    return logprobs, entropy


def upstream_grads(ctx, lse: torch.Tensor, grad_lp, grad_ent):
    """(grad of log-probs, grad of entropy or None) as the backward kernels take them."""
    grad_lp = torch.zeros_like(lse) if grad_lp is None else grad_lp
    return grad_lp, grad_ent if ctx.want_entropy else None


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, want_entropy, impl):
        ops = backend(impl, logits)
        vocab_start = group_rank(tp_group) * logits.shape[1]
        parts = ops.lse_partials(logits, targets, vocab_start, entropy=want_entropy)
        lse, logprobs, mean_logit, entropy = combine_partials(parts, tp_group)
        ctx.save_for_backward(logits, targets, lse, mean_logit)
        ctx.ops, ctx.vocab_start, ctx.want_entropy = ops, vocab_start, want_entropy
        return finish_forward(ctx, logprobs, entropy, want_entropy)

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        logits, targets, lse, mean_logit = ctx.saved_tensors
        if grad_lp is None and grad_ent is None:
            return None, None, None, None, None
        grad_lp, grad_ent = upstream_grads(ctx, lse, grad_lp, grad_ent)
        grad = ctx.ops.logprob_grad(logits, targets, ctx.vocab_start, lse, mean_logit, grad_lp, grad_ent)
        return grad, None, None, None, None


def token_logprobs(logits, targets, *, tp_group=None, return_entropy=False, impl="auto"):
    """log p(target) per token from [T, V_local] logits (this rank's vocabulary shard).

    Returns float32 [T] (and the entropy [T] with return_entropy), identical on every rank of
    tp_group, differentiable into `logits`. impl: "auto" (Triton on CUDA, torch otherwise),
    "triton" or "torch".
    """
    if logits.dim() != 2:
        raise ValueError(f"token_logprobs: logits must be [T, V_local], got shape {tuple(logits.shape)}")
    check_targets(targets, logits.shape[0], logits.shape[1] * group_size(tp_group), "token_logprobs")
    logprobs, entropy = _TokenLogprobs.apply(logits, targets, tp_group, return_entropy, impl)
    return (logprobs, entropy) if return_entropy else logprobs
