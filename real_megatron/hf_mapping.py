"""Tensor-by-tensor mapping between Hugging Face and megatron-core GPT parameter names and layouts.

Each megatron-core parameter has a `Rule`: the HF tensors it is made of and how it is split over
tensor-parallel ranks. `shard_from_hf` builds one TP rank's shard from HF tensors;
`hf_from_shards` rebuilds the HF tensors from all TP shards. Both are exact (no arithmetic).

Layouts (megatron-core, per TP rank):
  qkv   linear_qkv rows: for each query group of this rank, its q heads, then k, then v
  glu   linear_fc1 rows: this rank's slice of gate_proj, then its slice of up_proj
  vocab embedding / output rows: the vocabulary padded to a multiple of tp, split evenly
  column / row   split along dim 0 / dim 1;   replicated   the same on every rank

Mixture-of-experts layers (Qwen3-MoE, Qwen2-MoE): the router and Qwen2-MoE's shared-expert gate
are replicated; a shared expert is a dense MLP over TP; each routed expert is a glu/row pair split
over expert-tensor-parallel (ETP) ranks, and expert-parallel (EP) rank r holds experts
r*E/ep .. (r+1)*E/ep - 1 (local index j = global e - r*E/ep). Rules of routed experts have
`expert=True`, their HF names an "{e}" for the global expert index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only its fields are read: this map sits below actor/ and convert/, both of which use it
    from .actor.model import ArchSpec


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # HF names, "{i}" = global layer index, "{e}" = global expert index
    kind: str  # qkv | glu | vocab | column | row | replicated
    expert: bool = False  # a routed expert's weight: split over ETP, spread over EP


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron suffix within a layer -> rule; TE's spec fuses the norms into the next linear
_LAYER_RULES = {
    "input_layernorm.weight": Rule(("model.layers.{i}.input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.layer_norm_weight": Rule(("model.layers.{i}.input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.weight": Rule(
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ),
        "qkv",
    ),
    "self_attention.linear_qkv.bias": Rule(
        (
            "model.layers.{i}.self_attn.q_proj.bias",
            "model.layers.{i}.self_attn.k_proj.bias",
            "model.layers.{i}.self_attn.v_proj.bias",
        ),
        "qkv",
    ),
    "self_attention.q_layernorm.weight": Rule(("model.layers.{i}.self_attn.q_norm.weight",), "replicated"),
    "self_attention.k_layernorm.weight": Rule(("model.layers.{i}.self_attn.k_norm.weight",), "replicated"),
    "self_attention.linear_proj.weight": Rule(("model.layers.{i}.self_attn.o_proj.weight",), "row"),
    "pre_mlp_layernorm.weight": Rule(("model.layers.{i}.post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.layer_norm_weight": Rule(("model.layers.{i}.post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.weight": Rule(
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "glu"
    ),
    "mlp.linear_fc2.weight": Rule(("model.layers.{i}.mlp.down_proj.weight",), "row"),
    # mixture-of-experts layers (megatron's MoELayer)
    "mlp.router.weight": Rule(("model.layers.{i}.mlp.gate.weight",), "replicated"),
    "mlp.shared_experts.linear_fc1.weight": Rule(
        ("model.layers.{i}.mlp.shared_expert.gate_proj.weight", "model.layers.{i}.mlp.shared_expert.up_proj.weight"),
        "glu",
    ),
    "mlp.shared_experts.linear_fc2.weight": Rule(("model.layers.{i}.mlp.shared_expert.down_proj.weight",), "row"),
    "mlp.shared_experts.gate_weight": Rule(("model.layers.{i}.mlp.shared_expert_gate.weight",), "replicated"),
}

_EXPERT_RULES = {
    "linear_fc1": Rule(
        ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "model.layers.{i}.mlp.experts.{e}.up_proj.weight"),
        "glu",
        expert=True,
    ),
    "linear_fc2": Rule(("model.layers.{i}.mlp.experts.{e}.down_proj.weight",), "row", expert=True),
}
# SequentialMLP (local spec): experts.local_experts.<j>.linear_fc1.weight; TEGroupedMLP: experts.linear_fc1.weight<j>
_EXPERT = re.compile(r"^mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))$")

_MODEL_RULES = {
    "embedding.word_embeddings.weight": Rule(("model.embed_tokens.weight",), "vocab"),
    "decoder.final_layernorm.weight": Rule(("model.norm.weight",), "replicated"),
    "output_layer.weight": Rule(("lm_head.weight",), "vocab"),
}


def rule_for(
    name: str, spec: ArchSpec, layer_number: int | None = None, expert_offset: int = 0
) -> tuple[Rule, list[str]]:
    """The rule of megatron parameter `name` and its HF names (layer index made global; a routed
    expert's local index plus `expert_offset`, this EP rank's first expert, made global)."""
    match = _LAYER.match(name)
    if match:
        suffix = match.group(2)
        rule = _LAYER_RULES.get(suffix)
        index = layer_number if layer_number is not None else int(match.group(1))
        expert = _EXPERT.match(suffix)
        if expert:
            local, linear = (
                (expert.group(1), expert.group(2)) if expert.group(1) else (expert.group(4), expert.group(3))
            )
            rule = _EXPERT_RULES[linear]
            return rule, [h.format(i=index, e=int(local) + expert_offset) for h in rule.hf]
        if rule is None:
            raise KeyError(f"no HF mapping for megatron parameter {name!r} (layer suffix {suffix!r})")
        return rule, [h.format(i=index) for h in rule.hf]
    rule = _MODEL_RULES.get(name)
    if rule is None:
        raise KeyError(f"no HF mapping for megatron parameter {name!r}")
    if name == "output_layer.weight" and spec.tie_word_embeddings:
        return rule, ["model.embed_tokens.weight"]  # tied: the output layer is the embedding
    return rule, list(rule.hf)


def _qkv_full(spec: ArchSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups, per_group, hd = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, spec.head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * hd, *rest)
    k = k.reshape(groups, hd, *rest)
    v = v.reshape(groups, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * hd, *rest)


def _qkv_split(spec: ArchSpec, full: torch.Tensor) -> list[torch.Tensor]:
    groups, per_group, hd = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, spec.head_dim
    rest = full.shape[1:]
    grouped = full.reshape(groups, (per_group + 2) * hd, *rest)
    q, k, v = grouped.split([per_group * hd, hd, hd], dim=1)
    return [q.reshape(groups * per_group * hd, *rest), k.reshape(groups * hd, *rest), v.reshape(groups * hd, *rest)]


def shard_from_hf(rule: Rule, tensors: list[torch.Tensor], spec: ArchSpec, tp: int, rank: int) -> torch.Tensor:
    """One TP rank's shard of a megatron parameter from its HF tensors."""
    if rule.kind == "replicated":
        return tensors[0]
    if rule.kind == "column":
        return tensors[0].chunk(tp, dim=0)[rank]
    if rule.kind == "row":
        return tensors[0].chunk(tp, dim=1)[rank]
    if rule.kind == "vocab":
        table = tensors[0]
        padded = spec.padded_vocab(tp)
        if padded > table.shape[0]:
            table = torch.cat([table, table.new_zeros(padded - table.shape[0], *table.shape[1:])])
        return table.chunk(tp, dim=0)[rank]
    if rule.kind == "qkv":
        return _qkv_full(spec, *tensors).chunk(tp, dim=0)[rank]  # whole query groups per rank
    if rule.kind == "glu":
        gate, up = tensors
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def hf_from_shards(rule: Rule, shards: list[torch.Tensor], spec: ArchSpec) -> list[torch.Tensor]:
    """The HF tensors of a megatron parameter from all its TP shards (in rank order)."""
    if rule.kind == "replicated":
        return [shards[0]]
    if rule.kind == "column":
        return [torch.cat(shards, dim=0)]
    if rule.kind == "row":
        return [torch.cat(shards, dim=1)]
    if rule.kind == "vocab":
        return [torch.cat(shards, dim=0)[: spec.vocab_size]]
    if rule.kind == "qkv":
        return _qkv_split(spec, torch.cat(shards, dim=0))
    if rule.kind == "glu":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def expected_hf_names(spec: ArchSpec) -> list[str]:
    """Every tensor an HF checkpoint of this architecture holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if spec.moe is not None and spec.moe.layer_pattern[i]:
            names.append(p + "mlp.gate.weight")
            names += [
                p + f"mlp.experts.{e}.{x}_proj.weight"
                for e in range(spec.moe.num_experts)
                for x in ("gate", "up", "down")
            ]
            if spec.moe.shared_expert_intermediate_size:
                names += [p + f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")]
                names.append(p + "mlp.shared_expert_gate.weight")
        else:
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if spec.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if spec.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names
