"""REAL when a prompt group's rollouts are spread over data-parallel ranks.

Built on `group_logsumexp`: positives of group g are members of slot g with value -s/tau,
negatives are members of slot G+g with value s/tau (rollouts of weight 0 go to a discard slot 2G),
so one collective of 2G + 1 (max, sum-exp) partials serves both sides of every group. The anchor
logit 0 is added after the collective (log(1 + e^lse) = logaddexp(lse, 0)), once, identically on
every rank.

The returned loss is the full-batch value on every rank; its gradient reaches only this rank's
scores. Summing parameter gradients over DP ranks (what DDP's all-reduce does, before any
averaging) therefore gives exactly the gradient of the full-batch loss.
"""

from __future__ import annotations

import torch

from ..kernels import group_logsumexp
from ..kernels.collectives import all_reduce_sum_
from .real import VARIANTS, _softplus, weighted_sides
from .segments import segment_sum


def real_loss_across_ranks(
    scores: torch.Tensor,
    labels: torch.Tensor,
    group_index: torch.Tensor,
    num_groups: int,
    *,
    tau: float = 0.5,
    variant: str = "real",
    skip_uniform_groups: bool = False,
    dp_group=None,
    impl: str = "auto",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over all `num_groups` groups of the REAL loss, with group members on any DP rank.

    group_index: global group number of each local rollout, in [0, num_groups). Equals
    `real_loss` on the gathered batch (tested), with one small collective. weights: as in
    `real_loss` (a rollout of weight 0 goes to a discard slot, in no group).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown REAL variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    positive, negative, log_w = weighted_sides(labels, weights)
    logits = scores / tau
    slot = torch.where(positive, group_index, torch.where(negative, group_index + num_groups, 2 * num_groups))
    side_values = torch.where(positive, -logits, logits) + log_w
    side_values = torch.where(positive | negative, side_values, torch.zeros_like(side_values))  # discarded: no NaN
    if variant == "bce":
        side_values = torch.zeros_like(side_values).detach()  # only which sides are present matters
    lse = group_logsumexp(side_values, slot, 2 * num_groups + 1, dp_group=dp_group, impl=impl)
    lse_pos, lse_neg = lse[:num_groups], lse[num_groups : 2 * num_groups]
    # both sides present (an empty side's lse is -inf); a NaN score keeps its group, and so reaches the loss
    mixed = (lse_pos != float("-inf")) & (lse_neg != float("-inf"))

    if variant == "real":
        per_group = _softplus(lse_pos) + _softplus(lse_neg)
    elif variant == "no_anchor":
        per_group = _softplus(lse_pos + lse_neg)
    else:
        per_rollout = torch.where(positive, _softplus(-logits), _softplus(logits)) * log_w.exp()
        per_rollout = torch.where(positive | negative, per_rollout, torch.zeros_like(per_rollout))
        local = segment_sum(per_rollout, group_index, num_groups)
        total = all_reduce_sum_(local.detach().clone(), dp_group, "real_loss_across_ranks (bce): per-group sums")
        per_group = local + (total - local).detach()  # full-batch value, local gradient
    if skip_uniform_groups:
        per_group = torch.where(mixed, per_group, torch.zeros_like(per_group))
    return per_group.to(scores.dtype).sum()
