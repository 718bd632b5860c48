"""A tiny Qwen2-shaped model and a rollout batch for tests that build a real Actor."""

import torch

TINY = dict(
    model_type="qwen2",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def tiny_rollouts(engine_logprobs: bool = False, nan_at: tuple[int, int, int] | None = None):
    """4 groups x 4 rollouts (rewards 1, 0, 1, 0), prompts of 5 tokens, responses of 3-6, from seed 0.
    engine_logprobs: each rollout carries engine log-probs; nan_at (group, rollout, token): one is NaN."""
    from real_megatron.rollout.types import Rollout

    gen = torch.Generator().manual_seed(0)
    out = []
    for group in range(4):
        prompt = torch.randint(1, 96, (5,), generator=gen).tolist()
        for k, reward in enumerate([1.0, 0.0, 1.0, 0.0]):
            response = torch.randint(1, 96, (3 + k,), generator=gen).tolist()
            logprobs = None
            if engine_logprobs:
                logprobs = (-torch.rand(len(response), generator=gen) - 0.1).tolist()
                if nan_at is not None and nan_at[:2] == (group, k):
                    logprobs[nan_at[2]] = float("nan")
            out.append(Rollout(prompt, response, reward, group, engine_logprobs=logprobs))
    return out
