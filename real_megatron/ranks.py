"""Where this process stands among the trainer's ranks: one copy of each helper, and of megatron's
rank order. A process without a process group (a one-process run, a tool) is rank 0 of 1."""

from __future__ import annotations

import torch.distributed as dist


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    """True on global rank 0, and in a process without a process group."""
    return global_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def stage_first_rank(stage: int, pp: int) -> int:
    """Global rank of (pipeline stage `stage`, tp 0, cp 0, dp 0): megatron orders ranks tp-cp-dp-pp,
    pipeline stages outermost, so each stage holds world / pp consecutive ranks."""
    return stage * (world_size() // pp)
