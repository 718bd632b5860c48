"""The tiny Qwen2 models tests build offline (no hub here): each test picks the shape; the rest is
shared (the MLP twice the hidden size, the seed of the initial weights)."""

import torch
import transformers


def tiny_qwen2_config(
    vocab_size: int,
    *,
    hidden: int = 32,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int = 1,
    positions: int = 512,
    **extra,
) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        **extra,
    )


def tiny_qwen2(vocab_size: int, *, seed: int = 0, **shape) -> transformers.Qwen2ForCausalLM:
    """A freshly initialised model (in eval mode) whose weights depend on `seed` alone."""
    config = tiny_qwen2_config(vocab_size, **shape)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config).eval()
