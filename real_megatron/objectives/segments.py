"""Per-group reductions over a flat batch: rollouts carry a group index, tensors stay 1-D."""

from __future__ import annotations

import torch


def dense_group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids (any values, any order) to 0..G-1; return (index, G)."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
    unique, index = torch.unique(group_ids, return_inverse=True)
    return index, unique.numel()


def segment_sum(values: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    out = values.new_zeros(num_segments)
    return out.index_add(0, index, values)


def segment_count(mask: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    return torch.zeros(num_segments, dtype=torch.long, device=index.device).index_add(0, index, mask.long())


def segment_logsumexp(
    values: torch.Tensor,
    index: torch.Tensor,
    num_segments: int,
    *,
    mask: torch.Tensor | None = None,
    anchor: bool = False,
) -> torch.Tensor:
    """log(sum over members i of segment g with mask_i of exp(values_i)) for each g.

    anchor=True adds one more member of value 0 to every segment (REAL's anchor logit), so the
    result is log(1 + sum exp(values)) >= 0. Without the anchor an empty segment gives -inf, with a
    zero gradient to every input. Stable for any finite values: the shift is the detached segment
    maximum (the result does not depend on it, so detaching keeps the gradient exact).
    """
    if mask is not None:
        values = torch.where(mask, values, torch.full_like(values, float("-inf")))
    seg_max = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    seg_max = seg_max.scatter_reduce(0, index, values.detach(), reduce="amax", include_self=True)
    if anchor:
        seg_max = seg_max.clamp_min(0.0)
    shift = torch.where(torch.isfinite(seg_max), seg_max, torch.zeros_like(seg_max))
    sums = segment_sum(torch.exp(values - shift[index]), index, num_segments)
    if anchor:
        return shift + torch.log(sums + torch.exp(-shift))
    empty = sums == 0  # (a NaN value gives a NaN result, never a silent -inf)
    safe = torch.where(empty, torch.ones_like(sums), sums)
    return torch.where(empty, torch.full_like(sums, float("-inf")), shift + torch.log(safe))
