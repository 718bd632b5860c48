"""Per-group log-sum-exp over all data-parallel ranks, and token -> sequence sums.

REAL needs, per prompt group, log-sum-exps of its rollouts' scores, and a group's rollouts may sit
on different DP ranks. Each rank reduces its members to per-group (max, sum-exp) partials; one
all_gather of those [2, G] partials gives every rank the exact result. Scores cross the wire, never
tokens; backward is local (softmax weights against the global result).
"""

from __future__ import annotations

import torch

from .collectives import all_gather_stack
from .dispatch import backend, value_checks_enabled


def _check_index(index: torch.Tensor, n: int, num_segments: int, name: str) -> None:
    if index.shape != (n,) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name}: index must be an integer tensor of shape [{n}], got {index.dtype} {tuple(index.shape)}"
        )
    if (
        n
        and not index.is_meta
        and value_checks_enabled()
        and (bool((index < 0).any()) or bool((index >= num_segments).any()))
    ):  # meta: no values
        raise ValueError(
            f"{name}: index values must lie in [0, {num_segments}), got min {int(index.min())} max {int(index.max())}"
        )


class _GroupLogsumexp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, group_index, num_groups, dp_group, impl):
        parts = backend(impl, values).segment_max_sumexp(values, group_index, num_groups)
        gathered = all_gather_stack(
            parts, dp_group, f"group_logsumexp of {num_groups} groups over the data-parallel group"
        )
        seg_max, sums = gathered[:, 0], gathered[:, 1]  # [dp, G]
        top = seg_max.amax(dim=0)
        shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = (sums * torch.exp(seg_max - shift)).sum(dim=0)  # empty parts: 0 * exp(-inf) = 0
        # only an empty group sums to 0; a NaN score must reach the loss (the step is then skipped), not vanish
        lse = torch.where(total == 0, torch.full_like(total, float("-inf")), shift + torch.log(total))
        lse = lse.to(torch.promote_types(values.dtype, torch.float32))
        ctx.save_for_backward(values, group_index, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        values, group_index, lse = ctx.saved_tensors
        member_lse = lse[group_index]
        empty = member_lse == float("-inf")  # every member -inf: no weight (NaN still propagates)
        weight = torch.exp(values.to(lse.dtype) - torch.where(empty, torch.zeros_like(member_lse), member_lse))
        weight = torch.where(empty, torch.zeros_like(weight), weight)
        return (grad[group_index] * weight).to(values.dtype), None, None, None, None


def group_logsumexp(values, group_index, num_groups, *, dp_group=None, impl="auto"):
    """[num_groups]: log sum_{i: group_index_i = g} exp(values_i), over every rank of dp_group.

    group_index holds global group numbers in [0, num_groups) (a group's members may be on any
    ranks). Empty groups give -inf with zero gradient. float32 result (float64 for float64 input
    on the torch path); exact local backward.
    """
    if values.dim() != 1:
        raise ValueError(f"group_logsumexp: values must be 1-D, got shape {tuple(values.shape)}")
    _check_index(group_index, values.shape[0], num_groups, "group_logsumexp")
    return _GroupLogsumexp.apply(values, group_index, num_groups, dp_group, impl)


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, index, num_segments, impl):
        out = backend(impl, values).segment_sum(values, index, num_segments)
        ctx.save_for_backward(index)
        ctx.dtype = values.dtype
        return out.to(torch.promote_types(values.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad[index].to(ctx.dtype), None, None, None


def segment_sum(values, index, num_segments, *, impl="auto"):
    """[num_segments]: sum of values per segment (token -> sequence sums), index in any order."""
    if values.dim() != 1:
        raise ValueError(f"segment_sum: values must be 1-D, got shape {tuple(values.shape)}")
    _check_index(index, values.shape[0], num_segments, "segment_sum")
    return _SegmentSum.apply(values, index, num_segments, impl)
