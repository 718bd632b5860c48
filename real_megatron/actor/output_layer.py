"""Token log-probs on the last pipeline stage, from hidden states and the output weight.

The fused path (default): GPTModel's output layer is set to hand back its input, so the last stage
returns hidden states [b, s, h] instead of logits [b, s, V/tp]; the rows that predict response
tokens are picked ([N, h]) and `linear_token_logprobs` computes log-probs and entropy against the
vocabulary-parallel output weight tile by tile: the [tokens, V] logits never exist, in forward or
backward. Under sequence parallelism the hidden states are all-gathered first (backward:
reduce-scatter, so the kernel leaves its hidden gradient unsummed). With tied embeddings the weight
is the shared one, so its gradient reaches the embedding (megatron syncs first and last stage).

The naive path (actor.fused_output_layer: false) keeps GPTModel's logits and picks their rows.
"""

from __future__ import annotations

import torch

from ..kernels import linear_token_logprobs, token_logprobs


def return_hidden_states(model) -> None:
    """Make `model`'s output layer (a last-stage GPTModel) return its input hidden states."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    layer = model.output_layer
    group = getattr(layer, "tp_group", None)  # megatron-core >= 0.13 keeps it on the layer; else the default TP group

    def forward(hidden_states, weight=None, runtime_gather_output=None):
        if layer.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward reduce-scatters (sums over TP)
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=group
            )
        return hidden_states, None

    layer.forward = forward  # an instance attribute: module names and the state dict are unchanged


def output_weight(model) -> torch.Tensor:
    """The vocabulary-parallel output weight [V/tp, h] (the shared embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def fused_token_logprobs(
    model, hidden: torch.Tensor, mb, *, vocab_size: int, tp_group, sequence_parallel: bool, temperature: float = 1.0
):
    """(log-probs, entropy) [N] of the response tokens from hidden states [b, s, h], under
    softmax(logits / temperature), the logits divided in float32 as the engines do."""
    picked = hidden[mb.rows, mb.cols]  # [N, h]: the positions that predict response tokens
    return linear_token_logprobs(
        picked,
        output_weight(model),
        mb.targets,
        tp_group=tp_group,
        vocab_size=vocab_size,
        sum_grad_hidden=not sequence_parallel,
        return_entropy=True,
        scale=1.0 / temperature,
        check_ids=False,
    )  # the actor checked every id on the host (Actor.train_step)


def logits_token_logprobs(
    logits: torch.Tensor, mb, *, vocab_size: int, tp_group, tp_rank: int, temperature: float = 1.0
):
    """(log-probs, entropy) [N] from full logits [b, s, V/tp] (the naive path), under softmax(logits / T)."""
    picked = logits[mb.rows, mb.cols]  # [N, V/tp]
    if temperature != 1.0:  # in float32, as the engines divide
        picked = picked.float() / temperature
    vocab_local = picked.shape[1]
    first = tp_rank * vocab_local
    if first + vocab_local > vocab_size:  # vocabulary padding for TP: not a real token
        keep = max(0, vocab_size - first)
        picked = torch.cat([picked[:, :keep], picked.new_full((picked.shape[0], vocab_local - keep), float("-inf"))], 1)
    return token_logprobs(picked, mb.targets, tp_group=tp_group, return_entropy=True)
