"""Exact causal attention across context-parallel ranks for the local layer spec (no TE).

Each CP rank holds chunks r and 2C-1-r of every packed sequence (context_parallel.py). Keys and
values are all-gathered over the CP group in one collective ([C, 2, t, groups, dim]) and put back
in each sequence's order; the rank's queries then attend to their sequence's keys at or before
their own original position, sequences of similar length batched as in packed_attention.py. In
backward, autograd sums the key/value gradients each rank's queries produced and a reduce-scatter
hands every rank the sum for its own chunks. Memory per rank: the gathered K/V of the whole row
(2 x T x groups x dim per layer, kept for backward) and scores [local queries x sequence length],
1/C of the cp = 1 scores.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.enums import AttnMaskType

from ..kernels.collectives import all_gather_stack, reduce_scatter_stack
from .attention_batches import length_batches
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


@functools.lru_cache(maxsize=8)  # every layer of a micro-batch asks for the same one
def _index(padded: tuple[int, ...], cp: int, rank: int, local: int):
    """For the row's segments of global padded lengths `padded`: (global index -> place in the
    gathered [C * local] tokens, this rank's tokens' positions within their sequence)."""
    layout = Layout(list(padded), list(padded), cp)
    sizes = torch.tensor(padded)
    segment = torch.repeat_interleave(torch.arange(len(padded)), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(int(sizes.sum())) - starts[segment]
    owner, column = layout.locate(segment, position)
    query_position = torch.zeros(local, dtype=torch.long)
    mine = owner == rank
    query_position[column[mine]] = position[mine]
    return owner * local + column, query_position, layout.local_starts, starts.tolist()


def context_parallel_attention(attend, query, key, value, cu_seqlens_padded: torch.Tensor, cp: int):
    """attend: DotProductAttention.forward (sbhd, explicit mask). query/key/value [t, heads, dim],
    this rank's two chunks of every sequence; returns [t, 1, heads * dim]."""
    from megatron.core import parallel_state as ps

    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    bounds = cu_seqlens_padded.tolist()
    padded = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    local = query.shape[0]
    if sum(padded) != cp * local or any(n % (2 * cp) for n in padded):
        raise ValueError(
            f"context parallelism: padded cu_seqlens {bounds} do not match {local} tokens per rank x cp={cp}"
            " in 2*cp chunks per sequence"
        )
    device = query.device
    gather_index, query_position, local_starts, global_starts = (
        x.to(device) if isinstance(x, torch.Tensor) else x for x in _index(tuple(padded), cp, rank, local)
    )
    kv = _GatherKV.apply(torch.stack([key, value]), group)  # [C, 2, t, groups, dim]
    kv = kv.transpose(0, 1).reshape(2, cp * local, *key.shape[1:])[:, gather_index]  # [2, T, groups, dim], global order
    keys, values = kv[0], kv[1]
    pieces, places = [], []
    for batch in length_batches(padded):
        n_keys, n_queries = padded[batch[0]], padded[batch[0]] // cp
        k_off, q_off = torch.arange(n_keys, device=device), torch.arange(n_queries, device=device)
        k_len = torch.tensor([padded[i] for i in batch], device=device)
        q_valid = q_off[None, :] < (k_len // cp)[:, None]  # [n, Lq]
        k_valid = k_off[None, :] < k_len[:, None]  # [n, Lk]
        q_index = torch.where(
            q_valid, torch.tensor([local_starts[i] for i in batch], device=device)[:, None] + q_off, 0
        )
        k_index = torch.where(
            k_valid, torch.tensor([global_starts[i] for i in batch], device=device)[:, None] + k_off, 0
        )
        q_pos = query_position[q_index]  # [n, Lq]: each query's position in its sequence
        # masked (True): keys after the query (causal) and the batch's padding keys
        mask = (k_off[None, None, :] > q_pos[:, :, None]) | ~k_valid[:, None, :]
        sbhd = lambda x, index: x[index].transpose(0, 1)  # noqa: E731
        context = attend(
            sbhd(query, q_index),
            sbhd(keys, k_index),
            sbhd(values, k_index),
            mask[:, None],
            attn_mask_type=AttnMaskType.causal,
        )  # [Lq, n, heads * dim]
        pieces.append(context.transpose(0, 1)[q_valid])
        places.append(q_index[q_valid])
    out = torch.cat(pieces)
    return out.new_zeros(local, out.shape[-1]).index_put((torch.cat(places),), out).unsqueeze(1)
