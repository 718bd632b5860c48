"""Streaming export: HF-named tensors from a live sharded model, one at a time or in buckets.

Weight sync uses the bucketed form (each bucket one broadcast or one file), the converter the
plain one; both come from `weights.iter_hf_tensors`, which gathers one parameter at a time over
tensor parallelism, so memory stays at one full tensor (plus one bucket).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def iter_buckets(
    tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs in order into lists of at most `bucket_bytes` (a tensor larger
    than that travels alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket, size = [], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
