"""Packed sequences grouped for attention: the local spec's attention runs one dense
[batch, heads, length, length] product per group of sequences of similar length, so a few
long sequences do not pad many short ones to their length."""

from __future__ import annotations

WASTE = 1.0  # a batch's padded area may exceed its sequences' own area by at most this share


def length_batches(lengths: list[int]) -> list[list[int]]:
    """Sequence indices in batches of similar length: longest first, a batch grows while
    count x longest^2 <= (1 + WASTE) x sum of its length^2."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    area = 0  # sum of length^2 over the last batch
    for i in order:
        if batches:
            batch = batches[-1]
            if (len(batch) + 1) * lengths[batch[0]] ** 2 <= (1 + WASTE) * (area + lengths[i] ** 2):
                batch.append(i)
                area += lengths[i] ** 2
                continue
        batches.append([i])
        area = lengths[i] ** 2
    return batches
