"""Core attention of the local (pure-torch) layer spec for packed sequences.

Several rollouts share one row (megatron's THD format: tokens [1, T], `PackedSeqParams` with
cu_seqlens). Transformer Engine's attention reads cu_seqlens itself; megatron-core's local
DotProductAttention refuses packed input and builds fp32 [L, L] scores and probabilities of every
head. This subclass computes the block-diagonal causal attention with torch's
scaled_dot_product_attention (attention_batches.py): each sequence attends causally to itself
only, sequences of similar length batched (sorted by length, a batch padded to its longest, each
batch wasting at most as much area as it uses), so a row of hundreds of short rollouts costs a few
batched calls, a long-tailed mix neither pays T^2 nor pads every sequence to the longest, and the
memory is linear in the length (flash or memory-efficient kernels on GPUs, the flash kernel on
CPU). Padded rows ([b, s], no mask: right padding) take the same kernel. RoPE positions restart at
each sequence before this point (megatron applies THD RoPE per cu_seqlens segment), so a packed
rollout sees exactly what it would see alone in a padded row.

The segment bounds come from the host (`PackedRow.bounds`, read once per micro-batch by
MicroBatch.to): no layer waits for the device to read cu_seqlens.

Under context parallelism (parallel.cp > 1) a rank holds two chunks of each sequence
(context_parallel.py); megatron's own DotProductAttention refuses CP, so this class builds it as
cp = 1 and attends across the CP group itself: keys and values are all-gathered (backward: their
gradients summed back to their owners), each sequence's keys put back in order, and the rank's
queries attend to the keys at or before their original position (cp_attention.py, the same
kernel with a mask).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from .attention_batches import attend, packed_causal_attention
from .cp_attention import context_parallel_attention


@dataclass
class PackedRow(PackedSeqParams):
    """megatron's PackedSeqParams and the host copy of the segment bounds the attention reads
    (cu_seqlens_q_padded where set, else cu_seqlens_q)."""

    bounds: tuple[int, ...] = ()


def host_bounds(params: PackedSeqParams) -> tuple[int, ...]:
    """The segment bounds on the host: carried by PackedRow, else read from the device (a sync)."""
    if getattr(params, "bounds", None):
        return params.bounds
    cu = params.cu_seqlens_q if params.cu_seqlens_q_padded is None else params.cu_seqlens_q_padded
    return tuple(cu.tolist())


class PackedDotProductAttention(DotProductAttention):
    def __init__(self, config, *args, **kwargs):
        self.cp_size = config.context_parallel_size
        if self.cp_size > 1:  # the parent refuses CP; the attention across CP ranks is ours (forward)
            config = copy.copy(config)
            config.context_parallel_size = 1
        super().__init__(config, *args, **kwargs)
        if config.softmax_type != "vanilla" or self.scale_mask_softmax.window_size is not None:
            raise ValueError(
                "the local spec's packed attention computes plain causal softmax attention; "
                f"softmax_type={config.softmax_type!r}, window_size={config.window_size} need Transformer Engine"
            )
        # the parent splits the scale as softmax_scale / layer_number x layer_number (query-key layer scaling)
        self.scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

    def _dropout(self):
        """(dropout probability, the RNG context megatron's own attention draws it in)."""
        p = self.attention_dropout.p if self.training else 0.0
        if p and not self.config.sequence_parallel:
            return p, tensor_parallel.get_cuda_rng_tracker().fork()
        return p, contextlib.nullcontext()

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if attention_bias is not None:
            raise ValueError("the local spec's attention takes no attention bias")
        dropout, rng = self._dropout()
        if self.cp_size > 1:
            if packed_seq_params is None or packed_seq_params.cu_seqlens_q_padded is None:
                raise ValueError(
                    "context parallelism needs packed sequences with padded cu_seqlens (context_parallel.py)"
                )
            with rng:
                return context_parallel_attention(
                    query, key, value, host_bounds(packed_seq_params), self.cp_size, scale=self.scale, dropout=dropout
                )
        if packed_seq_params is None:
            if attention_mask is not None or (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal:
                return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type)  # megatron's
            # padded rows [s, b, heads, d], right-padded: causal attention needs no mask
            with rng:
                context = attend(
                    *(x.permute(1, 2, 0, 3) for x in (query, key, value)), scale=self.scale, dropout=dropout
                )
            return context.permute(2, 0, 1, 3).flatten(2)  # [s, b, heads * d]
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences must use the 'thd' format, got {packed_seq_params.qkv_format!r}")
        # query/key/value arrive as [t, heads, dim] (THD)
        with rng:
            out = packed_causal_attention(
                query, key, value, host_bounds(packed_seq_params), scale=self.scale, dropout=dropout
            )
        return out.unsqueeze(1)  # [t, 1, heads * dim]
