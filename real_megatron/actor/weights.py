"""Moving weights between a live, sharded megatron-core model and HF-named tensors.

`load_hf_weights` fills this rank's parameters from HF tensors (a checkpoint, or a deterministic
initialisation) and `iter_hf_tensors` yields HF-named full tensors of this rank's pipeline stage,
gathered over tensor parallelism one parameter at a time (bounded memory).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..hf_mapping import expected_hf_names, hf_from_shards, rule_for, shard_from_hf
from .model import ArchSpec


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def named_params(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter, int | None]]:
    """(megatron name, parameter, global layer index or None) for one model chunk."""
    model = unwrap(chunk)
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    for name, param in model.named_parameters():
        layer = None
        if name.startswith("decoder.layers."):
            local = int(name.split(".")[2])
            layer = layers[local].layer_number - 1  # megatron numbers layers globally from 1
        yield name, param, layer


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()


@torch.no_grad()
def load_hf_weights(chunks: list[torch.nn.Module], spec: ArchSpec, get_tensor: Callable[[str], torch.Tensor]) -> None:
    """Copy HF tensors (`get_tensor(hf_name)`) into this rank's shards of every parameter."""
    tp, rank, _ = _tp()
    for chunk in chunks:
        for name, param, layer in named_params(chunk):
            rule, hf_names = rule_for(name, spec, layer)
            tensors = [get_tensor(n) for n in hf_names]
            shard = shard_from_hf(rule, tensors, spec, tp, rank)
            if shard.shape != param.shape:
                raise ValueError(
                    f"HF tensor(s) {', '.join(hf_names)} give shape {tuple(shard.shape)} for megatron parameter "
                    f"{name!r}, which has shape {tuple(param.shape)} (tp={tp}): is the checkpoint for this model?"
                )
            param.data.copy_(shard.to(param.dtype))


@torch.no_grad()
def iter_hf_tensors(chunks: list[torch.nn.Module], spec: ArchSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of this rank's pipeline stage (identical on every TP rank)."""
    tp, _, group = _tp()
    for chunk in chunks:
        for name, param, layer in named_params(chunk):
            if name == "output_layer.weight" and spec.tie_word_embeddings:
                continue  # the first stage's embedding is the same tensor
            rule, hf_names = rule_for(name, spec, layer)
            if rule.kind == "replicated" or tp == 1:
                shards = [param.detach()]
            else:
                shards = [torch.empty_like(param) for _ in range(tp)]
                dist.all_gather(shards, param.detach().contiguous(), group=group)
            yield from zip(hf_names, hf_from_shards(rule, shards, spec))


def init_hf_state_dict(
    spec: ArchSpec, seed: int, dtype: torch.dtype = torch.float32, bias_std: float = 0.0,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """A fresh model's weights in HF layout, from `seed` alone: the same numbers whatever the
    parallel layout that later loads them (on one device type: CUDA's generator draws other
    numbers than the CPU's). Norms 1, biases N(0, bias_std) (0 by default), matrices
    N(0, initializer_range), drawn in float32 and rounded once to `dtype`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = _hf_shapes(spec)
    out = {}
    for name in expected_hf_names(spec):
        shape = shapes(name)
        if name.endswith("norm.weight") or "layernorm" in name:
            out[name] = torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            out[name] = (torch.randn(shape, generator=gen, device=device) * bias_std).to(dtype)
        else:
            out[name] = (torch.randn(shape, generator=gen, device=device) * spec.initializer_range).to(dtype)
    return out


def _hf_shapes(spec: ArchSpec) -> Callable[[str], tuple[int, ...]]:
    H, I, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd

    def shape(name: str) -> tuple[int, ...]:
        last = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        table = {
            "model.embed_tokens.weight": (spec.vocab_size, H), "lm_head.weight": (spec.vocab_size, H),
            "model.norm.weight": (H,), "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
            "self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kv, H), "self_attn.v_proj.weight": (kv, H),
            "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (H, q), "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
            "mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H), "mlp.down_proj.weight": (H, I),
        }
        return table[last]

    return shape
