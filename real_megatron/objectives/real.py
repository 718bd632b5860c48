"""REAL (Rewards as Labels): each prompt group is a classification of its rollouts by reward.

A rollout's score is its length-normalised log-ratio to the old policy,
s = mean_t(log pi_theta(o_t) - log pi_old(o_t)); rewards in {0,1} are its class label. With
temperature tau, per group (P = positives, N = negatives):

    real      (Eq. 8)  log(1 + sum_{i in P} exp(-s_i/tau)) + log(1 + sum_{j in N} exp(s_j/tau))
    no_anchor (Eq. 2)  log(1 + sum_{i in P} sum_{j in N} exp((s_j - s_i)/tau))
    bce       (Eq. 11) sum_{i in P} -log sigmoid(s_i/tau) + sum_{j in N} -log(1 - sigmoid(s_j/tau))

The anchor logit 0 (the old policy's own score) keeps positives pulled up and negatives pushed
down independently, each with a gradient of magnitude at most 1/tau (Eq. 9/10).
"""

from __future__ import annotations

import torch

from ..kernels import segment_sum as token_segment_sum
from .segments import dense_group_index, segment_count, segment_logsumexp, segment_sum

VARIANTS = ("real", "no_anchor", "bce")


def sequence_scores(
    token_logprobs: torch.Tensor,
    old_token_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_sequences: int | None = None,
) -> torch.Tensor:
    """s per sequence for a packed 1-D token layout: masked mean of log pi - log pi_old.

    seq_index[t] names the sequence token t belongs to (0..num_sequences-1). A sequence with no
    masked tokens scores 0 (the old policy's own score) with a zero gradient.
    """
    shapes = {tuple(x.shape) for x in (token_logprobs, old_token_logprobs, loss_mask, seq_index)}
    if len(shapes) != 1 or token_logprobs.dim() != 1:
        raise ValueError(
            "sequence_scores expects 1-D tensors of one length [T]; got "
            f"token_logprobs {tuple(token_logprobs.shape)}, old_token_logprobs {tuple(old_token_logprobs.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}, seq_index {tuple(seq_index.shape)}"
        )
    if num_sequences is None:
        num_sequences = int(seq_index.max()) + 1 if seq_index.numel() else 0
    dtype = torch.promote_types(token_logprobs.dtype, torch.float32)
    mask = loss_mask.to(dtype)
    ratio = (token_logprobs.to(dtype) - old_token_logprobs.to(dtype).detach()) * mask
    # token -> sequence sums: a Triton kernel on CUDA, index_add elsewhere
    total = token_segment_sum(ratio, seq_index, num_sequences)
    length = token_segment_sum(mask, seq_index, num_sequences)
    return total / length.clamp_min(1.0)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), exact at every magnitude (F.softplus returns x itself above a threshold)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def _check_inputs(scores: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor, tau: float, variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"unknown REAL variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if scores.dim() != 1 or labels.shape != scores.shape or group_ids.shape != scores.shape:
        raise ValueError(
            "real_loss expects scores, labels and group_ids of one shape [N]; got "
            f"{tuple(scores.shape)}, {tuple(labels.shape)}, {tuple(group_ids.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a float tensor, got {scores.dtype}")
    # the value check reads labels back to the host: free on CPU, a device sync per micro-batch on a
    # GPU, where the actor has already checked every rollout's reward on the host (Actor.train_step)
    if labels.device.type == "cpu" and labels.numel() and not bool(((labels == 0) | (labels == 1)).all()):
        bad = labels[(labels != 0) & (labels != 1)][:5].tolist()
        raise ValueError(f"labels must be 0/1 rewards, found {bad}")


def weighted_sides(labels: torch.Tensor, weights: torch.Tensor | None):
    """(positive, negative, log-weight) per rollout: a rollout of weight 0 is on neither side."""
    positive = labels.bool()
    if weights is None:
        return positive, ~positive, torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    keep = weights > 0
    log_w = torch.log(torch.where(keep, weights, torch.ones_like(weights))).detach()
    return positive & keep, ~positive & keep, log_w


def real_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    tau: float = 0.5,
    variant: str = "real",
    skip_uniform_groups: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over prompt groups of the REAL loss of `variant` (no normalisation: the caller divides).

    skip_uniform_groups: groups whose labels are all equal contribute exactly 0.
    weights: [N] per-rollout weights >= 0 on its group terms (None: all 1): a rollout's exp-term
    inside the log-sum-exp (its BCE term) is multiplied by its weight; weight 0 takes the rollout
    out of its group (excluded responses; masked importance sampling).
    """
    _check_inputs(scores, labels, group_ids, tau, variant)
    if scores.numel() == 0:
        return scores.sum()
    index, num_groups = dense_group_index(group_ids)
    positive, negative, log_w = weighted_sides(labels, weights)
    logits = scores / tau

    if variant == "real":
        per_group = segment_logsumexp(
            -logits + log_w, index, num_groups, mask=positive, anchor=True
        ) + segment_logsumexp(logits + log_w, index, num_groups, mask=negative, anchor=True)
    elif variant == "no_anchor":
        pair_logit = segment_logsumexp(logits + log_w, index, num_groups, mask=negative) + segment_logsumexp(
            -logits + log_w, index, num_groups, mask=positive
        )
        per_group = _softplus(pair_logit)  # 0 when either class is absent
    else:  # bce
        per_rollout = torch.where(positive, _softplus(-logits), _softplus(logits)) * log_w.exp()
        per_group = segment_sum(
            torch.where(positive | negative, per_rollout, torch.zeros_like(per_rollout)), index, num_groups
        )

    if skip_uniform_groups:
        mixed = (segment_count(positive, index, num_groups) > 0) & (segment_count(negative, index, num_groups) > 0)
        per_group = torch.where(mixed, per_group, torch.zeros_like(per_group))
    return per_group.sum()
