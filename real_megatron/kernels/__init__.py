"""Fused kernels of the loss path (imported as real_megatron.kernels).

Triton on CUDA, a torch reference everywhere else, one entry point per operation choosing
between them (`impl="auto"`). Verified on CPU: the Triton kernels run under TRITON_INTERPRET=1
against the torch reference and float64 in CI; on CUDA the same kernels compile (not run in CI).
"""

from .dispatch import IMPLS, interpreting, triton_available, value_checks, value_checks_enabled, without_value_checks
from .group_lse import group_logsumexp, segment_sum
from .linear_logprobs import default_chunk_tokens, linear_token_logprobs
from .token_logprobs import token_logprobs

__all__ = [
    "IMPLS",
    "default_chunk_tokens",
    "group_logsumexp",
    "interpreting",
    "linear_token_logprobs",
    "segment_sum",
    "token_logprobs",
    "triton_available",
    "value_checks",
    "value_checks_enabled",
    "without_value_checks",
]
