"""Per-step statistics of a mixture-of-experts model's routing: the load-balancing loss and expert load.

A forward hook on each router (training passes only: gradients on, module in training mode) adds,
per MoE layer, the top-k assignments per expert (c_e), the router probabilities per expert summed
over tokens (s_e, softmax over all experts in float32) and the token count T. At the end of a step
they are summed over the ranks that saw different tokens (data parallel; tensor parallel too under
sequence parallelism) and reported as:

    moe_aux_loss          mean over MoE layers of E/k * sum_e (c_e/T) (s_e/T): the Switch
                          load-balancing loss over all of the step's training tokens (1 = uniform
                          routing at uniform probabilities; the per-micro-batch term that enters
                          the gradient, times model.moe_aux_loss_coef, estimates it)
    moe_expert_load_max   mean over MoE layers of max_e c_e / (T k / E): the busiest expert's load
                          relative to a uniform split (1 = balanced)
    moe_expert_load_min   the same for the idlest expert (0 = an expert received no token)

The numbers do not depend on the parallel layout or the micro-batch split of a step (sums only;
padding tokens, which GPTModel's padding_mask marks, are left out).
With activation recompute a layer's forward runs twice in training; the statistics count both
runs (same routing, so the ratios are unchanged).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .moe import MoESpec, moe_layers


class MoEStats:
    def __init__(self, chunks: list[torch.nn.Module], moe: MoESpec, reduce_groups: list, device: torch.device):
        """reduce_groups: the process groups whose ranks see different tokens or hold different
        layers (data parallel; tensor parallel under sequence parallelism; pipeline), summed in turn."""
        self.moe, self.groups = moe, [g for g in reduce_groups if g is not None and dist.get_world_size(g) > 1]
        # one row per MoE layer of the whole model: [counts (E), probability sums (E), tokens]
        self.sums = torch.zeros(len(moe.moe_layers), 2 * moe.num_experts + 1, dtype=torch.float64, device=device)
        for index, layer in moe_layers(chunks):
            layer.router.register_forward_hook(self._hook(moe.moe_layers.index(index)))

    def _hook(self, slot: int):
        experts = self.moe.num_experts

        def record(router, args, output):
            if not (router.training and torch.is_grad_enabled()):
                return
            with torch.no_grad():
                hidden = args[0].detach().reshape(-1, router.weight.shape[1])
                routing_map = output[1].reshape(-1, experts)
                padding = args[1] if len(args) > 1 else None  # GPTModel's padding_mask: True = padding
                probs = torch.softmax(torch.nn.functional.linear(hidden, router.weight.detach()).float(), dim=-1)
                row = self.sums[slot]
                if padding is None:
                    row[:experts] += routing_map.sum(dim=0).to(row.dtype)
                    row[experts : 2 * experts] += probs.sum(dim=0).to(row.dtype)
                    row[-1] += hidden.shape[0]
                else:  # weighted by the mask, not boolean-indexed: indexing reads the count back (a sync)
                    keep = (~padding.reshape(-1, 1)).to(row.dtype)
                    row[:experts] += (routing_map.to(row.dtype) * keep).sum(dim=0)
                    row[experts : 2 * experts] += (probs.to(row.dtype) * keep).sum(dim=0)
                    row[-1] += keep.sum()

        return record

    def step_metrics(self) -> dict[str, float]:
        """The step's statistics (every rank gets the same numbers); resets for the next step."""
        sums = self.sums.clone()
        self.sums.zero_()
        for group in self.groups:
            dist.all_reduce(sums, group=group)
        E, k = self.moe.num_experts, self.moe.top_k
        seen = sums[:, -1] > 0
        if not bool(seen.any()):
            return {}
        counts, prob_sums, tokens = sums[seen, :E], sums[seen, E : 2 * E], sums[seen, -1:]
        aux = (E / k) * ((counts / tokens) * (prob_sums / tokens)).sum(dim=1)
        load = counts / (tokens * k / E)
        return {
            "moe_aux_loss": aux.mean().item(),
            "moe_expert_load_max": load.max(dim=1).values.mean().item(),
            "moe_expert_load_min": load.min(dim=1).values.mean().item(),
        }
