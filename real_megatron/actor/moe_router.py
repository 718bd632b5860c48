"""megatron-core's TopKRouter with the load-balancing loss taken over a whole micro-batch.

megatron's `aux_loss` counts the expert assignments f_e over the tokens of one data-parallel rank
(and its TP/CP peers), so the loss, and its gradient, change with how a micro-batch's rollouts are
spread over DP ranks (and hence with EP, which megatron carves out of DP). Here f_e and the token
count T are summed over the tensor-, data- and context-parallel ranks (one all-reduce of E + 1
numbers per MoE layer and micro-batch, no gradient through it), and each rank adds

    dp * coef * E / (k T^2) * sum_e c_e * sum_{t on this rank} p_{t,e}

whose sum over the ranks, after DDP averages gradients over DP, is the micro-batch's
Switch loss coef * E * sum_e (c_e / (k T)) (sum_t p_{t,e} / T): what one process computes for
the same micro-batch, whatever TP (with sequence parallelism), DP or EP. Micro-batches still
count separately (megatron averages their terms), so the micro-batch plan must match for equal
numbers. Without sequence parallelism TP ranks hold the same tokens, and megatron refuses to
train an MoE layer under TP then.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter


class MicroBatchAuxLossRouter(TopKRouter):
    def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask: bool = False):
        coef = self.get_aux_loss_coeff("aux_loss")
        if coef == 0:
            return probs
        group = self.tp_dp_cp_group
        with torch.no_grad():
            # padding tokens (GPTModel's padding_mask) are zero rows of routing_map: each token
            # routed counts k assignments, so T = assignments / k counts real tokens only
            counts = routing_map.sum(dim=0).float()
            stats = torch.cat([counts, counts.sum().reshape(1) / self.topk])
            if dist.get_world_size(group) > 1:
                dist.all_reduce(stats, group=group)
        tokens_per_expert, total = stats[:-1], stats[-1]
        dp = dist.get_world_size(group) // dist.get_world_size(self.tp_cp_group)  # DDP averages over these
        aux = (scores_for_aux_loss.sum(dim=0) * tokens_per_expert).sum() * (
            dp * coef * self.config.num_moe_experts / (self.topk * total * total)
        )
        return MoEAuxLossAutoScaler.apply(probs, aux)


def moe_padding_mask(spec, config, mb) -> dict:
    """GPTModel's `padding_mask` (True = padding) for an MoE model's packed row: the row's tail
    after its rollouts' tokens is padding, which the routers then leave out of the load-balancing
    loss (and the statistics). Empty for dense models and right-padded rows, and under PP with
    sequence parallelism, where megatron-core 0.16 scatters the mask on the first stage only."""
    if (
        spec.moe is None
        or mb.cu_seqlens is None
        or (config.pipeline_model_parallel_size > 1 and config.sequence_parallel)
    ):
        return {}
    columns = torch.arange(mb.tokens.shape[1], device=mb.tokens.device)
    return {"padding_mask": (columns >= mb.sequence_tokens).unsqueeze(0).expand_as(mb.tokens)}
