"""Clipped policy-gradient baselines for side-by-side runs: GRPO, DAPO, GSPO.

All three use the group-normalised advantage A_i = (r_i - mean_g r) / (std_g r + eps). They differ
in the ratio and in the reduction:
    GRPO  token ratio, clip [1-0.2, 1+0.2], mean over a sequence's tokens, then over sequences
    DAPO  token ratio, clip-higher [1-0.2, 1+0.28], mean over all tokens of the batch
    GSPO  sequence ratio exp(mean_t log-ratio), clip [1-3e-4, 1+4e-4], mean over sequences
Each function returns the *sum* over its reduction unit (tokens or sequences); the caller divides
by the global count of that unit in the mini-batch so the gradient is layout independent.
"""

from __future__ import annotations

import torch

from .real import sequence_scores
from .segments import dense_group_index, segment_count, segment_sum


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps), unbiased std; a group of one rollout gets advantage 0.
    Computed in float64 (rewards are exact small numbers; the caller casts)."""
    index, num_groups = dense_group_index(group_ids)
    rewards = rewards.to(torch.float64)
    count = segment_count(torch.ones_like(index, dtype=torch.bool), index, num_groups).to(rewards.dtype)
    mean = segment_sum(rewards, index, num_groups) / count
    centred = rewards - mean[index]
    var = segment_sum(centred**2, index, num_groups) / (count - 1).clamp_min(1.0)
    adv = centred / (var.sqrt()[index] + eps)
    return torch.where(count[index] > 1, adv, torch.zeros_like(adv))


def clipped_surrogate(ratio: torch.Tensor, advantage: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """PPO's pessimistic objective as a loss: -min(ratio*A, clip(ratio, 1-lo, 1+hi)*A)."""
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return -torch.minimum(ratio * advantage, clipped * advantage)


def token_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_sequences: int,
    *,
    clip_low: float,
    clip_high: float,
    reduce: str,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level clipped loss; reduce="sequence_mean" sums per-sequence token means (GRPO),
    reduce="token_sum" sums over all tokens (DAPO). weights: [T] importance weights per token."""
    mask = loss_mask.to(logprobs.dtype)
    if weights is not None:
        mask = mask * weights.detach().to(logprobs.dtype)
    ratio = torch.exp((logprobs - old_logprobs.detach()).clamp(-20.0, 20.0))
    per_token = clipped_surrogate(ratio, advantages[seq_index], clip_low, clip_high) * mask
    if reduce == "token_sum":
        return per_token.sum()
    if reduce == "sequence_mean":  # over the sequence's tokens in the loss (weights do not change the count)
        per_seq = segment_sum(per_token, seq_index, num_sequences)
        return (per_seq / segment_sum(loss_mask.to(logprobs.dtype), seq_index, num_sequences).clamp_min(1.0)).sum()
    raise ValueError(f"unknown reduce {reduce!r}")


def sequence_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_sequences: int,
    *,
    clip_low: float,
    clip_high: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """GSPO: ratio s_i = exp(mean_t log-ratio) per sequence, clipped; summed over sequences.
    weights: [N] importance weights per sequence."""
    log_ratio = sequence_scores(logprobs, old_logprobs, loss_mask, seq_index, num_sequences)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    has_tokens = segment_sum(loss_mask.to(logprobs.dtype), seq_index, num_sequences) > 0
    per_seq = clipped_surrogate(ratio, advantages, clip_low, clip_high)
    if weights is not None:
        per_seq = per_seq * weights.detach().to(per_seq.dtype)
    return torch.where(has_tokens, per_seq, torch.zeros_like(per_seq)).sum()
