"""Mixture-of-experts facts of an HF config (Qwen3-MoE, Qwen2-MoE) and their megatron-core settings.

transformers' routers (both families): logits = h W^T in the model dtype; p = softmax(logits) in
float32; the top-k of p; renormalised to sum 1 iff `norm_topk_prob`. megatron-core's TopKRouter
gives the same numbers with `moe_router_pre_softmax` = not norm_topk_prob (softmax over all experts,
then top-k, no renormalisation) and, with norm_topk_prob, top-k of the logits then a softmax over
those k (= the renormalised top-k probabilities; the top-k of logits and of p are the same experts).
Qwen2-MoE's shared expert (an MLP of `shared_expert_intermediate_size`, scaled by
sigmoid(h w_gate)) is megatron's SharedExpertMLP with `moe_shared_expert_gate`.

Which layers are sparse: layer i (from 0) is an MoE layer iff i is not in `mlp_only_layers` and
(i + 1) % decoder_sparse_step == 0; the others are dense MLPs of `intermediate_size`
(megatron's `moe_layer_freq` as a 0/1 list).

The load-balancing loss is the Switch loss per MoE layer and micro-batch over all of the
micro-batch's tokens (moe_router.py: megatron's TopKRouter with f summed over the TP/DP/CP ranks),
summed over layers, times the coefficient. transformers pools the layers into one f and P and does
not divide f by k; the coefficient's default is the HF config's `router_aux_loss_coef` all the
same (what the model was trained with), and `model.moe_aux_loss_coef` overrides it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

MOE_FAMILIES = ("qwen3_moe", "qwen2_moe")

# HF keys whose non-default values change the model in ways this mapping does not reproduce:
# key -> (accepted values, why). Anything else is refused naming the key.
_REFUSED = {
    "scoring_func": (("softmax", None), "only softmax router scores are mapped"),
    "topk_method": (("greedy", None), "only plain top-k routing is mapped"),
    "n_group": ((None, 1), "group-limited routing is not mapped"),
    "topk_group": ((None, 1), "group-limited routing is not mapped"),
    "routed_scaling_factor": ((None, 1, 1.0), "scaled routing weights are not mapped"),
    "moe_latent_size": ((None, 0), "latent MoE projections are not mapped"),
    "n_shared_experts": ((None, 0), "counted shared experts are not mapped (Qwen2-MoE's one gated shared expert is)"),
}


class UnsupportedMoEError(ValueError):
    pass


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: Optional[int]  # Qwen2-MoE's gated shared expert; None: none
    router_aux_loss_coef: float
    layer_pattern: tuple[int, ...]  # 1 = MoE layer, 0 = dense MLP, per layer

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, sparse in enumerate(self.layer_pattern) if sparse]

    @classmethod
    def from_hf(cls, cfg: dict, family: str, num_layers: int, source: str) -> MoESpec:
        for key, (accepted, why) in _REFUSED.items():
            if cfg.get(key) not in accepted:
                raise UnsupportedMoEError(f"{source}: {key}={cfg[key]!r} is not supported for {family}: {why}")
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")  # transformers 5 saves the latter
        top_k = cfg.get("num_experts_per_tok")
        size = cfg.get("moe_intermediate_size")
        for key, value in (("num_experts", experts), ("num_experts_per_tok", top_k), ("moe_intermediate_size", size)):
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedMoEError(f"{source}: {family} config needs a positive {key!r}, got {value!r}")
        if top_k > experts:
            raise UnsupportedMoEError(f"{source}: num_experts_per_tok={top_k} exceeds num_experts={experts}")
        shared = cfg.get("shared_expert_intermediate_size") or None
        if family == "qwen3_moe" and shared:
            raise UnsupportedMoEError(
                f"{source}: shared_expert_intermediate_size={shared} but Qwen3-MoE has no shared expert "
                "(transformers' Qwen3MoeForCausalLM would ignore it): refusing rather than dropping it"
            )
        if family == "qwen2_moe" and not shared:
            raise UnsupportedMoEError(
                f"{source}: Qwen2-MoE needs 'shared_expert_intermediate_size' > 0, got {shared!r}"
            )
        step = cfg.get("decoder_sparse_step", 1)
        if not isinstance(step, int) or step < 1:
            raise UnsupportedMoEError(f"{source}: decoder_sparse_step must be an integer >= 1, got {step!r}")
        dense = cfg.get("mlp_only_layers") or []
        bad = [i for i in dense if not isinstance(i, int) or not 0 <= i < num_layers]
        if bad:
            raise UnsupportedMoEError(f"{source}: mlp_only_layers {bad} are not layer indices in [0, {num_layers})")
        pattern = tuple(int(i not in dense and (i + 1) % step == 0) for i in range(num_layers))
        if not any(pattern):
            raise UnsupportedMoEError(
                f"{source}: decoder_sparse_step={step} and mlp_only_layers={dense} leave no MoE layer (a dense model)"
            )
        return cls(
            num_experts=experts,
            top_k=top_k,
            moe_intermediate_size=size,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", family == "qwen3_moe")),
            shared_expert_intermediate_size=shared,
            router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0),
            layer_pattern=pattern,
        )


def moe_config_kwargs(
    moe: MoESpec,
    *,
    ep: int = 1,
    etp: int | None = None,
    dispatcher: str = "alltoall",
    aux_loss_coef: float | None = None,
    grouped_gemm: bool = False,
) -> dict[str, Any]:
    """TransformerConfig arguments for this MoE model. aux_loss_coef None: the HF config's."""
    coef = moe.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.moe_intermediate_size,
        moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if coef > 0 else "none",
        moe_aux_loss_coeff=coef,
        moe_shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
        moe_shared_expert_gate=moe.shared_expert_intermediate_size is not None,
        moe_layer_freq=list(moe.layer_pattern),
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=grouped_gemm,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def moe_layers(chunks: list[torch.nn.Module]) -> Iterator[tuple[int, torch.nn.Module]]:
    """(global layer index from 0, megatron MoELayer) of this rank's model chunks, in order. The
    layer's `.router` is megatron's TopKRouter (weight [E, H]); `.experts` this rank's experts."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for chunk in chunks:
        model = chunk
        while hasattr(model, "module"):
            model = model.module
        for layer in getattr(getattr(model, "decoder", None), "layers", []):
            if isinstance(layer.mlp, MoELayer):
                yield layer.layer_number - 1, layer.mlp


def mark_expert_params(model: torch.nn.Module) -> int:
    """Routed experts' parameters as expert-parallel (`allreduce = False`) at every EP size.

    megatron marks them so only when ep > 1 (its linears: not (is_expert and expert_parallel)); the
    mark sends them to DDP's expert buffers (reduced over the expert-data-parallel group, which is
    the data-parallel group at ep = 1 with etp = tp) and to a second, chained optimizer. Marking
    them at ep = 1 too gives every layout the same optimizer structure, so a checkpoint's
    optimizer state loads across EP sizes (megatron's ChainedOptimizer state at ep > 1 against a
    single optimizer's at ep = 1 would not). Returns how many parameters were marked."""
    count = 0
    for name, param in model.named_parameters():
        if ".mlp.experts." in name and getattr(param, "allreduce", True):
            param.allreduce = False
            count += 1
    return count
