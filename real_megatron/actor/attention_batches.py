"""Packed sequences grouped for attention, and the attention kernel the local spec runs on them.

The local spec's attention runs one batched product per group of sequences of similar length
([n, heads, L, d] for a group padded to its longest L), so a few long sequences do not pad many
short ones to their length. Each group goes through torch's scaled_dot_product_attention: the
flash or memory-efficient kernel on GPUs and the flash kernel on CPU, which never hold the
[L, L] scores (memory linear in L). A group's padding sits after every real position of each
sequence, so the causal kernel (queries attend to keys at or before their own position) needs no
mask: a real query never reaches a padding key, and the padding queries' outputs are dropped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def attend(query, key, value, *, scale: float, dropout: float = 0.0, mask=None):
    """query [n, heads, Lq, d], key/value [n, groups, Lk, d] -> [n, heads, Lq, d]: causal attention
    (mask None) or attention with the additive `mask` ([n, 1, Lq, Lk] in the query's dtype: 0 where
    a query may attend, -inf elsewhere). Grouped-query
    attention goes to the kernel as is (enable_gqa) where its fused kernel takes it (CPU's flash
    kernel; the GPU's flash kernel for 16-bit causal attention); elsewhere (a mask, fp32 on a GPU:
    the memory-efficient kernel) the keys and values are repeated per query head, which costs
    O(L) memory, where the kernel's fallback would cost O(L^2)."""
    repeat = query.shape[1] // key.shape[1]
    native = query.device.type == "cpu" or (mask is None and query.dtype in (torch.float16, torch.bfloat16))
    if repeat > 1 and not native:
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=repeat > 1 and native,
    )


def host_to(values, device: torch.device) -> torch.Tensor:
    """A host tensor (or a list of ints) on `device`, without waiting for the device (pinned,
    non-blocking)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Group:
    """One batch of similar-length segments: `start` (one segment: a slice of the row) or `index`
    ([n, L] row positions, padding reading position 0), `keep` (the real tokens among the [n x L]
    outputs) and `where` (their row positions)."""

    length: int
    start: int | None
    index: torch.Tensor | None
    keep: torch.Tensor | None
    where: torch.Tensor


@functools.lru_cache(maxsize=16)  # every layer of a micro-batch asks for the same plan
def plan(bounds: tuple[int, ...], device: torch.device) -> tuple[list[Group], torch.Tensor]:
    """The groups of a packed row with segment `bounds`, every index computed once on the host and
    sent to `device` without a sync; and all groups' row positions, in output order."""
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    groups = []
    for batch in length_batches(lengths):
        longest = lengths[batch[0]]
        if len(batch) == 1:
            s = starts[batch[0]]
            groups.append(Group(longest, s, None, None, torch.arange(s, s + longest)))
            continue
        offsets = torch.arange(longest)
        start, length = torch.tensor([starts[i] for i in batch]), torch.tensor([lengths[i] for i in batch])
        valid = offsets[None, :] < length[:, None]  # [n, L]
        index = torch.where(valid, start[:, None] + offsets[None, :], 0)
        groups.append(Group(longest, None, index, valid.flatten().nonzero().squeeze(1), index[valid]))
    where = torch.cat([g.where for g in groups]) if groups else torch.zeros(0, dtype=torch.long)
    moved = [
        Group(g.length, g.start, *(None if x is None else host_to(x, device) for x in (g.index, g.keep, g.where)))
        for g in groups
    ]
    return moved, host_to(where, device)


def packed_causal_attention(query, key, value, bounds: tuple[int, ...], *, scale: float, dropout=0.0):
    """Block-diagonal causal attention over a packed row: query [t, heads, d], key/value
    [t, groups, d] (THD), `bounds` the host-side segment starts and end (cu_seqlens, a tuple);
    each segment attends causally to itself only. Returns [t, heads * d]."""
    total = query.shape[0]
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens end at {bounds[-1]} but the packed row holds {total} tokens")
    groups, where = plan(tuple(bounds), query.device)
    pieces = []
    for g in groups:
        if g.index is None:  # one segment: a slice, no gather
            q, k, v = (x[g.start : g.start + g.length].transpose(0, 1)[None] for x in (query, key, value))
            pieces.append(attend(q, k, v, scale=scale, dropout=dropout)[0].transpose(0, 1).flatten(1))
            continue
        q, k, v = (x[g.index].transpose(1, 2) for x in (query, key, value))  # [n, heads, L, d]
        context = attend(q, k, v, scale=scale, dropout=dropout).transpose(1, 2)  # [n, L, heads, d]
        pieces.append(context.flatten(0, 1).flatten(1)[g.keep])  # the real tokens, in (segment, position) order
    out = torch.cat(pieces)
    return out.new_zeros(total, out.shape[-1]).index_put((where,), out)  # [t, heads * d]
