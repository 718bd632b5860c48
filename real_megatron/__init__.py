"""real-megatron: REAL (Rewards as Labels) RL post-training on megatron-core."""

__version__ = "0.1.0"
