"""Exact causal attention across context-parallel ranks for the local layer spec (no TE).

Each CP rank holds chunks r and 2C-1-r of every packed sequence (context_parallel.py). Keys and
values are all-gathered over the CP group in one collective ([C, 2, t, groups, dim]) and put back
in each sequence's order; the rank's queries then attend to their sequence's keys at or before
their own original position through torch's scaled_dot_product_attention with an additive mask
(attention_batches.py), sequences of similar length batched as in packed_attention.py. In
backward, autograd sums the key/value gradients each rank's queries produced and a reduce-scatter
hands every rank the sum for its own chunks. Memory per rank: the gathered K/V of the whole row
(2 x T x groups x dim per layer, kept for backward) and one mask [local queries x sequence length]
per micro-batch in the model's dtype, shared by every layer (the kernel never holds the scores).
"""

from __future__ import annotations

import functools

import torch

from ..kernels.collectives import all_gather_stack, reduce_scatter_stack
from .attention_batches import attend, host_to, length_batches
from .context_parallel import Layout


class _GatherKV(torch.autograd.Function):
    """All-gather over the CP group; backward: reduce-scatter (each rank's K/V gradient summed
    over the ranks whose queries used it)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group):
        ctx.group = group
        return all_gather_stack(local, group, "context-parallel attention: keys and values")

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_stack(grad, ctx.group, "context-parallel attention: key/value gradients"), None


@functools.lru_cache(maxsize=2)  # every layer of a micro-batch asks for the same one; one mask per micro-batch
def _index(padded: tuple[int, ...], cp: int, rank: int, local: int, device: torch.device, dtype: torch.dtype):
    """For the row's segments of global padded lengths `padded`, on `device` (sent once per
    micro-batch, without a sync): the gather of the [C * local] tokens into global order; per
    batch of similar lengths the query index [n, Lq], the key index [n, Lk], the additive mask
    [n, 1, Lq, Lk] (0 where a query may attend: its sequence's keys at or before its own position;
    -inf elsewhere; one tensor that every layer's kernel reads and keeps for backward) and the real
    queries among the [n x Lq] outputs; and those queries' places in the rank's row."""
    layout = Layout(list(padded), list(padded), cp)
    sizes = torch.tensor(padded)
    segment = torch.repeat_interleave(torch.arange(len(padded)), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(int(sizes.sum())) - starts[segment]
    owner, column = layout.locate(segment, position)
    query_position = torch.zeros(local, dtype=torch.long)
    mine = owner == rank
    query_position[column[mine]] = position[mine]
    batches, places = [], []
    for batch in length_batches(list(padded)):
        n_keys, n_queries = padded[batch[0]], padded[batch[0]] // cp
        k_off, q_off = torch.arange(n_keys), torch.arange(n_queries)
        k_len = torch.tensor([padded[i] for i in batch])
        q_valid = q_off[None, :] < (k_len // cp)[:, None]  # [n, Lq]
        k_valid = k_off[None, :] < k_len[:, None]  # [n, Lk]
        q_index = torch.where(q_valid, torch.tensor([layout.local_starts[i] for i in batch])[:, None] + q_off, 0)
        k_index = torch.where(k_valid, starts[batch][:, None] + k_off, 0)
        q_pos = query_position[q_index]  # [n, Lq]: each query's position in its sequence
        allowed = (k_off[None, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))[:, None]
        keep = q_valid.flatten().nonzero().squeeze(1)
        places.append(q_index[q_valid])
        batches.append(tuple(host_to(x, device) for x in (q_index, k_index, mask, keep)))
    return host_to(owner * local + column, device), batches, host_to(torch.cat(places), device)


def context_parallel_attention(query, key, value, bounds: tuple[int, ...], cp: int, *, scale: float, dropout=0.0):
    """query/key/value [t, heads or groups, dim], this rank's two chunks of every sequence; `bounds`
    the host-side global padded cu_seqlens; returns [t, 1, heads * dim]."""
    from megatron.core import parallel_state as ps

    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    padded = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    local = query.shape[0]
    if sum(padded) != cp * local or any(n % (2 * cp) for n in padded):
        raise ValueError(
            f"context parallelism: padded cu_seqlens {list(bounds)} do not match {local} tokens per rank x cp={cp}"
            " in 2*cp chunks per sequence"
        )
    gather_index, batches, places = _index(tuple(padded), cp, rank, local, query.device, query.dtype)
    kv = _GatherKV.apply(torch.stack([key, value]), group)  # [C, 2, t, groups, dim]
    kv = kv.transpose(0, 1).reshape(2, cp * local, *key.shape[1:])[:, gather_index]  # [2, T, groups, dim], global order
    keys, values = kv[0], kv[1]
    pieces = []
    for q_index, k_index, mask, keep in batches:
        q, k, v = (x[index].transpose(1, 2) for x, index in ((query, q_index), (keys, k_index), (values, k_index)))
        context = attend(q, k, v, scale=scale, dropout=dropout, mask=mask).transpose(1, 2)  # [n, Lq, heads, dim]
        pieces.append(context.flatten(0, 1).flatten(1)[keep])
    out = torch.cat(pieces)
    return out.new_zeros(local, out.shape[-1]).index_put((places,), out).unsqueeze(1)
