"""Moving weights between a live, sharded megatron-core model and HF-named tensors.

`load_hf_weights` fills this rank's parameters from HF tensors (a checkpoint, or a deterministic
initialisation) and `iter_hf_tensors` yields HF-named full tensors of this rank's pipeline stage,
gathered over tensor parallelism one parameter at a time (bounded memory). A routed expert's weight
is gathered over expert-tensor parallelism, then over expert parallelism (each EP rank holds other
experts: one gather yields ep experts' tensors).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

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

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_group(),
    )


def _etp():
    from megatron.core import parallel_state as ps

    return (
        ps.get_expert_tensor_parallel_world_size(),
        ps.get_expert_tensor_parallel_rank(),
        ps.get_expert_tensor_parallel_group(check_initialized=False),
    )


def _ep():
    from megatron.core import parallel_state as ps

    return (
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_model_parallel_rank(),
        ps.get_expert_model_parallel_group(check_initialized=False),
    )


def _expert_offset(spec: ArchSpec) -> int:
    """Global index of this EP rank's first expert (megatron's BaseMoELayer.local_expert_indices)."""
    if spec.moe is None:
        return 0
    ep, ep_rank, _ = _ep()
    return ep_rank * (spec.moe.num_experts // ep)


@torch.no_grad()
def load_hf_weights(chunks: list[torch.nn.Module], spec: ArchSpec, get_tensor: Callable[[str], torch.Tensor]) -> None:
    """Copy HF tensors (`get_tensor(hf_name)`) into this rank's shards of every parameter."""
    tp, rank, _ = _tp()
    etp, etp_rank, _ = _etp() if spec.moe is not None else (1, 0, None)
    offset = _expert_offset(spec)
    for chunk in chunks:
        for name, param, layer in named_params(chunk):
            rule, hf_names = rule_for(name, spec, layer, offset)
            tensors = [get_tensor(n) for n in hf_names]
            size, index = (etp, etp_rank) if rule.expert else (tp, rank)
            shard = shard_from_hf(rule, tensors, spec, size, index)
            if shard.shape != param.shape:
                raise ValueError(
                    f"HF tensor(s) {', '.join(hf_names)} give shape {tuple(shard.shape)} for megatron parameter "
                    f"{name!r}, which has shape {tuple(param.shape)} ({'etp' if rule.expert else 'tp'}={size}): "
                    "is the checkpoint for this model?"
                )
            param.data.copy_(shard.to(param.dtype))


@torch.no_grad()
def iter_hf_tensors(chunks: list[torch.nn.Module], spec: ArchSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of this rank's pipeline stage (identical on every TP rank)."""
    tp, _, group = _tp()
    offset = _expert_offset(spec)
    for chunk in chunks:
        for name, param, layer in named_params(chunk):
            if name == "output_layer.weight" and spec.tie_word_embeddings:
                continue  # the first stage's embedding is the same tensor
            rule, hf_names = rule_for(name, spec, layer, offset)
            if rule.expert:
                yield from _gather_expert(rule, param, spec, name, layer)
                continue
            shards = _gather(param, tp, group) if rule.kind != "replicated" else [param.detach()]
            yield from zip(hf_names, hf_from_shards(rule, shards, spec))


def _gather(param: torch.Tensor, size: int, group) -> list[torch.Tensor]:
    if size == 1:
        return [param.detach()]
    shards = [torch.empty_like(param) for _ in range(size)]
    dist.all_gather(shards, param.detach().contiguous(), group=group)
    return shards


def _gather_expert(rule, param: torch.Tensor, spec: ArchSpec, name: str, layer: int | None):
    """One local expert weight, gathered over ETP into its HF tensors, then over EP: the HF
    tensors of the same local index on every EP rank (global experts j, j + E/ep, ...)."""
    etp, _, etp_group = _etp()
    ep, _, ep_group = _ep()
    local = hf_from_shards(rule, _gather(param, etp, etp_group), spec)
    gathered = [_gather(tensor.contiguous(), ep, ep_group) for tensor in local]  # [HF tensor][EP rank]
    per_rank = spec.moe.num_experts // ep
    for source in range(ep):
        _, hf_names = rule_for(name, spec, layer, source * per_rank)
        yield from zip(hf_names, (tensors[source] for tensors in gathered))


def init_hf_state_dict(
    spec: ArchSpec,
    seed: int,
    dtype: torch.dtype = torch.float32,
    bias_std: float = 0.0,
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
    moe = spec.moe
    F = moe.moe_intermediate_size if moe else 0
    S = (moe.shared_expert_intermediate_size or 0) if moe else 0
    moe_shapes = {
        "mlp.gate.weight": (moe.num_experts if moe else 0, H),
        "mlp.experts.E.gate_proj.weight": (F, H),
        "mlp.experts.E.up_proj.weight": (F, H),
        "mlp.experts.E.down_proj.weight": (H, F),
        "mlp.shared_expert.gate_proj.weight": (S, H),
        "mlp.shared_expert.up_proj.weight": (S, H),
        "mlp.shared_expert.down_proj.weight": (H, S),
        "mlp.shared_expert_gate.weight": (1, H),
    }

    def shape(name: str) -> tuple[int, ...]:
        last = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        last = re.sub(r"^mlp\.experts\.\d+\.", "mlp.experts.E.", last)
        if last in moe_shapes:
            return moe_shapes[last]
        table = {
            "model.embed_tokens.weight": (spec.vocab_size, H),
            "lm_head.weight": (spec.vocab_size, H),
            "model.norm.weight": (H,),
            "input_layernorm.weight": (H,),
            "post_attention_layernorm.weight": (H,),
            "self_attn.q_proj.weight": (q, H),
            "self_attn.k_proj.weight": (kv, H),
            "self_attn.v_proj.weight": (kv, H),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (H, q),
            "self_attn.q_norm.weight": (hd,),
            "self_attn.k_norm.weight": (hd,),
            "mlp.gate_proj.weight": (I, H),
            "mlp.up_proj.weight": (I, H),
            "mlp.down_proj.weight": (H, I),
        }
        return table[last]

    return shape
