"""The model part of every checkpoint, in one layout whatever the layer spec that wrote it.

megatron-core already saves the local spec's norms under Transformer Engine's names
(`input_layernorm.weight` -> `self_attention.linear_qkv.layer_norm_weight`, likewise the MLP's).
What still differs is `_extra_state`: TE modules (linears, core attention) carry FP8 scaling
metadata there, the local spec has it on some modules and not on others. None of it is needed to
train or serve in bf16/fp32 (TE rebuilds it at the first forward), so it is neither saved nor
expected: a checkpoint from the converter (no GPU: local spec) loads in a GPU trainer (TE spec) and
the reverse. Used by the converter, the trainer's checkpoints and weight loading.
"""

from __future__ import annotations

import torch

from .weights import unwrap

EXTRA_STATE = "_extra_state"


def chunk_key(index: int, chunks: list) -> str:
    return f"model{index}" if len(chunks) > 1 else "model"


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """{model | model<i>: sharded state dict} of every chunk, without TE's FP8 metadata."""
    out = {}
    for index, chunk in enumerate(chunks):
        state = unwrap(chunk).sharded_state_dict()
        out[chunk_key(index, chunks)] = {k: v for k, v in state.items() if not k.endswith(EXTRA_STATE)}
    return out


def load_model_state(chunks: list[torch.nn.Module], loaded: dict) -> None:
    """Put loaded tensors into the chunks; only `_extra_state` may be absent (see above)."""
    for index, chunk in enumerate(chunks):
        result = unwrap(chunk).load_state_dict(loaded[chunk_key(index, chunks)], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint does not fit the model: missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}"
            )


def load_model_weights(chunks: list[torch.nn.Module], directory) -> None:
    """Fill model chunks from the model part of a dist checkpoint (converted or from training)."""
    from megatron.core import dist_checkpointing

    load_model_state(chunks, dist_checkpointing.load(model_sharded_state_dict(chunks), str(directory)))
