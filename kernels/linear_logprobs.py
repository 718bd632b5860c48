"""The output layer fused with token log-probs: [T, V] logits never exist at once.

Forward walks token chunks: logits_c = hidden_c @ weight^T, then the same per-token partials as
`token_logprobs`; one all_gather of all partials at the end. Backward recomputes each chunk's
logits, overwrites them with their gradient, and accumulates into grad_hidden and grad_weight.
`hidden` is taken as replicated over the TP group (Megatron's output-layer input); its gradient
is summed over the group in backward, as Megatron's copy-to-TP-region does.
"""

from __future__ import annotations

import torch

from .collectives import all_reduce_sum_, group_rank, group_size
from .dispatch import backend
from .token_logprobs import check_targets, combine_partials

CHUNK_LOGITS = 1 << 24  # default budget: float32 elements of one chunk of logits (64 MB)


def default_chunk_tokens(vocab_local: int) -> int:
    return max(1, CHUNK_LOGITS // vocab_local)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, chunk, want_entropy, impl):
        ops = backend(impl, hidden)
        vocab_start = group_rank(tp_group) * weight.shape[0]
        parts = torch.empty(hidden.shape[0], 4, dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = hidden[s : s + chunk] @ weight.t()
            parts[s : s + chunk] = ops.lse_partials(
                logits, targets[s : s + chunk], vocab_start, entropy=want_entropy, inplace=True
            )
            del logits
        lse, logprobs, mean_logit, entropy = combine_partials(parts, tp_group)
        ctx.save_for_backward(hidden, weight, targets, lse, mean_logit)
        ctx.ops, ctx.vocab_start, ctx.chunk, ctx.want_entropy, ctx.tp_group = ops, vocab_start, chunk, want_entropy, tp_group
        ctx.set_materialize_grads(False)
        if not want_entropy:
            entropy = torch.zeros_like(logprobs)
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, targets, lse, mean_logit = ctx.saved_tensors
        if grad_lp is None and grad_ent is None:
            return (None,) * 7
        grad_lp = torch.zeros_like(lse) if grad_lp is None else grad_lp
        grad_ent = grad_ent if ctx.want_entropy else None
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # low-precision weights accumulate their gradient over chunks in float32
        acc_dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        chunk = ctx.chunk
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            logits = h @ weight.t()
            g = ctx.ops.logprob_grad(
                logits, targets[s : s + chunk], ctx.vocab_start, lse[s : s + chunk],
                None if mean_logit is None else mean_logit[s : s + chunk],
                grad_lp[s : s + chunk], None if grad_ent is None else grad_ent[s : s + chunk], out=logits,
            )
            if need_hidden:
                torch.mm(g, weight, out=grad_hidden[s : s + chunk])
            if need_weight:
                if g.dtype == acc_dtype:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight.addmm_(g.t().to(acc_dtype), h.to(acc_dtype))
            del logits, g
        if need_hidden:
            all_reduce_sum_(grad_hidden, ctx.tp_group, "linear_token_logprobs backward: grad of the replicated hidden states")
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_token_logprobs(
    hidden, weight, targets, *, tp_group=None, chunk_tokens=None, return_entropy=False, impl="auto"
):
    """log p(target) per token of (hidden [T, H] @ weight[V_local, H]^T), never materialising [T, V].

    Same outputs as token_logprobs(hidden @ weight.T, ...); gradients for hidden and weight.
    chunk_tokens: tokens per chunk (default: 64 MB of float32 logits per chunk).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_token_logprobs: expected hidden [T, H] and weight [V_local, H], got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    check_targets(targets, hidden.shape[0], weight.shape[0] * group_size(tp_group), "linear_token_logprobs")
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"linear_token_logprobs: chunk_tokens must be >= 1, got {chunk_tokens}")
    logprobs, entropy = _LinearTokenLogprobs.apply(hidden, weight, targets, tp_group, chunk, return_entropy, impl)
    return (logprobs, entropy) if return_entropy else logprobs
