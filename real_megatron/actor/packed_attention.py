"""Core attention of the local (pure-torch) layer spec for packed sequences.

Several rollouts share one row (megatron's THD format: tokens [1, T], `PackedSeqParams` with
cu_seqlens). Transformer Engine's attention reads cu_seqlens itself; megatron-core's local
DotProductAttention refuses packed input. This subclass computes the block-diagonal causal
attention: each sequence attends causally to itself only. Sequences of similar length are batched
(sorted by length, a batch padded to its longest, each batch wasting at most as much area as it
uses), so a row of hundreds of short rollouts costs a few batched calls, and a long-tailed mix
neither pays T^2 nor pads every sequence to the longest. RoPE positions restart at each sequence
before this point (megatron applies THD RoPE per cu_seqlens segment), so a packed rollout sees
exactly what it would see alone in a padded row.

Under context parallelism (parallel.cp > 1) a rank holds two chunks of each sequence
(context_parallel.py); megatron's own DotProductAttention refuses CP, so this class builds it as
cp = 1 and attends across the CP group itself: keys and values are all-gathered (backward: their
gradients summed back to their owners), each sequence's keys put back in order, and the rank's
queries attend causally to the keys at or before their original position (cp_attention.py).
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from .attention_batches import length_batches
from .cp_attention import context_parallel_attention


class PackedDotProductAttention(DotProductAttention):
    def __init__(self, config, *args, **kwargs):
        self.cp_size = config.context_parallel_size
        if self.cp_size > 1:  # the parent refuses CP; the attention across CP ranks is ours (forward)
            config = copy.copy(config)
            config.context_parallel_size = 1
        super().__init__(config, *args, **kwargs)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if self.cp_size > 1:
            if packed_seq_params is None or packed_seq_params.cu_seqlens_q_padded is None:
                raise ValueError(
                    "context parallelism needs packed sequences with padded cu_seqlens (context_parallel.py)"
                )
            return context_parallel_attention(
                super().forward, query, key, value, packed_seq_params.cu_seqlens_q_padded, self.cp_size
            )
        if packed_seq_params is None:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type=attn_mask_type, attention_bias=attention_bias
            )
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences must use the 'thd' format, got {packed_seq_params.qkv_format!r}")
        cu = packed_seq_params.cu_seqlens_q_padded
        cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        bounds = cu.tolist()  # a few dozen ints per micro-batch
        total = query.shape[0]
        if bounds[-1] != total:
            raise ValueError(f"cu_seqlens end at {bounds[-1]} but the packed row holds {total} tokens")
        starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        device = query.device
        pieces, positions = [], []
        # query/key/value arrive as [t, heads, dim] (THD)
        for batch in length_batches(lengths):
            longest = lengths[batch[0]]
            offsets = torch.arange(longest, device=device)
            start = torch.tensor([starts[i] for i in batch], device=device)
            length = torch.tensor([lengths[i] for i in batch], device=device)
            valid = offsets[None, :] < length[:, None]  # [n, L]
            index = torch.where(valid, start[:, None] + offsets[None, :], 0)  # padding reads token 0, masked
            q, k, v = (x[index].transpose(0, 1) for x in (query, key, value))  # [L, n, heads, dim]
            # masked (True): later positions (causal) and the batch's padding keys
            mask = (offsets[None, :] > offsets[:, None])[None] | ~valid[:, None, :]
            context = super().forward(q, k, v, mask[:, None], attn_mask_type=AttnMaskType.causal)  # [L, n, heads * dim]
            pieces.append(context.transpose(0, 1)[valid])  # the batch's real tokens, in (sequence, position) order
            positions.append(index[valid])
        out = torch.cat(pieces)
        where = torch.cat(positions)
        return out.new_zeros(total, out.shape[-1]).index_put((where,), out).unsqueeze(1)  # [t, 1, heads * dim]
