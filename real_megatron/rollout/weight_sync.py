"""Moving the actor's weights to the generation engines after each update.

disk:        global rank 0 streams the live model (TP-gathered, stage by stage) into HF safetensors
             in a shared directory; the fleet's servers load it (/update_weights_from_disk).
embedded:    the local engine takes the same HF-named tensors in memory.
distributed: an NCCL (gloo on CPU) broadcast in buckets, see broadcast_sync.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..convert.convert import write_hf_checkpoint
from ..rank0_phases import on_rank0
from .fleet_auth import private_dir
from .sglang_fleet import SGLangFleet


def sync_to_fleet_from_disk(actor, fleet: SGLangFleet, directory: str | Path, version: int, side_dir: Path | None,
                            timeout_s: float = 600.0) -> Path:
    """Write weights version `version` under `directory` and have every server load them."""
    target = private_dir(directory) / f"v{version:06d}"  # the job's user only (files: the trainer's umask)
    write_hf_checkpoint(actor.chunks, actor.spec, target, side_dir, actor.settings.dtype)

    def load_on_servers():  # rank 0 alone; minutes for a large model
        fleet.update_weights_from_disk(target, version)
        for old in sorted(Path(directory).glob("v*")):  # keep only the version the servers hold
            if old != target:
                shutil.rmtree(old, ignore_errors=True)

    on_rank0(f"servers loading weights v{version}", load_on_servers, timeout_s=timeout_s, share=False)
    return target


def sync_to_embedded(actor, engine, version: int) -> None:
    """In memory: this process's full model (single-process trainer) into the local engine."""
    engine.update_weights(actor.hf_tensors(), version)
