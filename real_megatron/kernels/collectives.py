"""The collectives of the loss path and of context-parallel attention, with errors that say what was being waited for.

Deadlines are the process group's timeout (set at init from parallel.timeout_s); when one passes,
torch raises, and the error here names the operation, the group and the payload.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group) if group_size(group) > 1 else 0


def all_gather_stack(tensor: torch.Tensor, group, what: str) -> torch.Tensor:
    """[world, *tensor.shape]: every rank's tensor, in rank order. One collective."""
    world = group_size(group)
    if world == 1:
        return tensor.unsqueeze(0)
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    try:
        dist.all_gather(parts, tensor, group=group)
    except Exception as exc:  # gloo/nccl raise RuntimeError or DistBackendError
        raise RuntimeError(
            f"{what}: all_gather of {tuple(tensor.shape)} {tensor.dtype} over a group of {world} ranks failed "
            f"(a peer is late, dead or disagrees on the shape): {exc}"
        ) from exc
    return torch.stack(parts)


def all_reduce_sum_(tensor: torch.Tensor, group, what: str) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return tensor
    try:
        dist.all_reduce(tensor, group=group)
    except Exception as exc:
        raise RuntimeError(
            f"{what}: all_reduce of {tuple(tensor.shape)} {tensor.dtype} over a group of {world} ranks failed: {exc}"
        ) from exc
    return tensor


def reduce_scatter_stack(tensor: torch.Tensor, group, what: str) -> torch.Tensor:
    """tensor [world, *shape] on every rank -> [*shape]: the sum over ranks of their slice for this
    rank. NCCL reduce-scatters; gloo has no reduce-scatter, so it all-reduces and keeps the slice."""
    world = group_size(group)
    if world == 1:
        return tensor[0]
    tensor = tensor.contiguous()
    try:
        if dist.get_backend(group) == "nccl":
            out = torch.empty_like(tensor[0])
            dist.reduce_scatter_tensor(out, tensor, group=group)
            return out
        dist.all_reduce(tensor, group=group)
    except Exception as exc:
        raise RuntimeError(
            f"{what}: reduce_scatter of {tuple(tensor.shape)} {tensor.dtype} over a group of {world} ranks failed "
            f"(a peer is late, dead or disagrees on the shape): {exc}"
        ) from exc
    return tensor[group_rank(group)]
