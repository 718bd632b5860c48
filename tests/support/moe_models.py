"""Tiny mixture-of-experts HF checkpoints built offline with transformers (tests and tools).

    make_moe_checkpoint(path, "qwen3_moe")             # 2 layers, 4 experts, top-2, no shared expert
    make_moe_checkpoint(path, "qwen2_moe", num_hidden_layers=4, mlp_only_layers=[1])

Weights are transformers' own random initialisation under `seed`; the router is drawn with a
larger spread than transformers' default (zeros for Qwen3-MoE's router) so that top-k choices are
well separated and every expert receives tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=301,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts=4,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.01,
)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(head_dim=16, norm_topk_prob=True)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(shared_expert_intermediate_size=48, norm_topk_prob=False),
    ),
}


def make_moe_checkpoint(
    path: str | Path,
    family: str = "qwen3_moe",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    router_std: float = 0.5,
    **overrides,
) -> Path:
    """Save a tiny `family` model (qwen3_moe | qwen2_moe) at `path`; returns the path."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, router_std)
    model.to(dtype).save_pretrained(path)
    return Path(path)
