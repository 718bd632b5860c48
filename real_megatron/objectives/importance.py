"""Importance weights that correct for the train-inference mismatch (pi_engine != pi_old).

Rollouts are sampled by the inference engine, whose numerics differ from the trainer's: the ratio
r = pi_old / pi_engine (pi_old: the actor's recomputation) is not 1. Two corrections, both
detached weights on the loss, from a cap C (algorithm.is_cap):

    tis  truncated importance sampling: w = min(r, C)
    mis  masked importance sampling:    w = r if 1/C <= r <= C, else 0 (the token or sequence
         leaves the loss; the normaliser is unchanged, so masking never rescales the rest)

Per token (r_t = exp(log pi_old - log pi_engine)) for GRPO and DAPO, whose ratios are per token;
per sequence (r = exp(mean_t of that log-ratio), the length-normalised ratio) for GSPO and REAL,
whose units are sequences.
"""

from __future__ import annotations

import math

import torch

from .segments import segment_sum
from .settings import IMPORTANCE_CORRECTIONS as MODES


def _weights(log_ratio: torch.Tensor, mode: str, cap: float) -> torch.Tensor:
    log_cap = math.log(cap)
    if mode == "tis":
        return torch.exp(log_ratio.clamp(max=log_cap))
    if mode == "mis":
        inside = (log_ratio >= -log_cap) & (log_ratio <= log_cap)
        return torch.where(inside, torch.exp(log_ratio.clamp(-log_cap, log_cap)), torch.zeros_like(log_ratio))
    raise ValueError(f"importance correction must be one of {', '.join(MODES)}, got {mode!r}")


def token_importance_weights(
    old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, *, mode: str, cap: float
) -> torch.Tensor:
    """[T] per-token weights from pi_old / pi_engine."""
    return _weights((old_logprobs - engine_logprobs).detach().double(), mode, cap).to(old_logprobs.dtype)


def sequence_importance_weights(
    old_logprobs: torch.Tensor,
    engine_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_sequences: int,
    *,
    mode: str,
    cap: float,
) -> torch.Tensor:
    """[N] per-sequence weights from the length-normalised ratio exp(mean_t log(pi_old / pi_engine));
    a sequence without tokens in the loss gets weight 1 (its terms are zero anyway)."""
    mask = loss_mask.double()
    log_ratio = (old_logprobs - engine_logprobs).detach().double() * mask
    mean = segment_sum(log_ratio, seq_index, num_sequences) / segment_sum(mask, seq_index, num_sequences).clamp_min(1.0)
    return _weights(mean, mode, cap).to(old_logprobs.dtype)


def mismatch_partials(
    old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, threshold: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[5] partial sums of the train-inference mismatch over tokens, to merge over micro-batches
    and ranks: (sum |d|, max |d|, sum of k3, tokens with |d| > threshold, tokens), d = log pi_old -
    log pi_engine. k3 = (r - 1) - log r with r = pi_old / pi_engine estimates KL(pi_engine || pi_old)
    from the engine's own samples, unbiased and >= 0 per token. mask: the tokens the engine sampled
    (multi-turn: the model's turns); None: all."""
    d = (old_logprobs.double() - engine_logprobs.double()).detach()
    if mask is not None:
        d = d[mask.bool()]
    clamped = d.clamp(-20.0, 20.0)  # an engine's -inf or clamped log-prob keeps k3 finite and >= 0
    k3 = torch.expm1(clamped) - clamped
    absolute = d.abs()
    top = absolute.max() if d.numel() else absolute.new_zeros(())
    return torch.stack(
        [absolute.sum(), top, k3.sum(), (absolute > threshold).sum().double(), absolute.new_tensor(float(d.numel()))]
    )
