"""Float64 references for the kernel tests: the naive path, written the obvious way."""

import torch


def naive_logprobs(logits: torch.Tensor, targets: torch.Tensor):
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (log-probs near 0 make elementwise ratios meaningless)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
