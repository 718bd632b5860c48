"""Core attention of the local (pure-torch) layer spec for packed sequences.

Several rollouts share one row (megatron's THD format: tokens [1, T], `PackedSeqParams` with
cu_seqlens). Transformer Engine's attention reads cu_seqlens itself; megatron-core's local
DotProductAttention refuses packed input. This subclass computes the block-diagonal causal
attention block by block: each sequence attends causally to itself only, which is exactly a
block-diagonal causal mask over the row, with memory and work sum_i L_i^2 instead of T^2.
RoPE positions restart at each sequence before this point (megatron applies THD RoPE per
cu_seqlens segment), so a packed rollout sees what it would see alone in a padded row.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class PackedDotProductAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences must use the 'thd' format, got {packed_seq_params.qkv_format!r}")
        cu = packed_seq_params.cu_seqlens_q_padded
        cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        bounds = cu.tolist()  # a few dozen ints per micro-batch
        if bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens end at {bounds[-1]} but the packed row holds {query.shape[0]} tokens")
        # query/key/value arrive as [t, heads, dim] (THD); each block is one sequence as [s, b=1, heads, dim]
        blocks = [
            super(PackedDotProductAttention, self).forward(
                query[s:e].unsqueeze(1), key[s:e].unsqueeze(1), value[s:e].unsqueeze(1), None,
                attn_mask_type=AttnMaskType.causal,
            )
            for s, e in zip(bounds[:-1], bounds[1:]) if e > s
        ]
        return torch.cat(blocks)  # [t, 1, heads * dim]
