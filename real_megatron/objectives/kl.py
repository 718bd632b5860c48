"""KL penalties per sequence, from token log-probs (no full distributions needed)."""

from __future__ import annotations

import torch

from .segments import segment_sum


def k3_kl(logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased, non-negative estimate of KL(pi_theta || pi_target) from samples of pi_theta:
    exp(q - p) - (q - p) - 1 with p = log pi_theta, q = log pi_target (Schulman's k3)."""
    delta = (target_logprobs.detach() - logprobs).clamp(-20.0, 20.0)  # exp stays finite
    return torch.exp(delta) - delta - 1.0


def sequence_kl(
    logprobs: torch.Tensor,
    target_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_sequences: int,
) -> torch.Tensor:
    """Token-mean k3 KL per sequence, shape [num_sequences]."""
    mask = loss_mask.to(logprobs.dtype)
    total = segment_sum(k3_kl(logprobs, target_logprobs) * mask, seq_index, num_sequences)
    return total / segment_sum(mask, seq_index, num_sequences).clamp_min(1.0)
