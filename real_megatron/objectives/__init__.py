"""Policy objectives: REAL and its variants, and the GRPO/DAPO/GSPO baselines, by name.

The names below load on first use: the config reads the objective's settings (settings.py) without
importing torch, so `--dry-run` and the launcher stay light."""

import importlib

_EXPORTS = {
    "AlgorithmConfig": "settings",
    "OBJECTIVES": "settings",
    "Objective": "registry",
    "PolicyBatch": "registry",
    "build_objective": "registry",
    "normalise": "registry",
    "objective_from_config": "registry",
    "real_loss_across_ranks": "distributed",
    "k3_kl": "kl",
    "sequence_kl": "kl",
    "group_advantages": "policy_gradient",
    "real_loss": "real",
    "sequence_scores": "real",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
