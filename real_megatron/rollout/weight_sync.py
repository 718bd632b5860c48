"""Moving the actor's weights to the generation engines after each update.

disk:        global rank 0 streams the live model (TP-gathered, stage by stage) into HF safetensors
             in a shared directory; the fleet's servers load it (/update_weights_from_disk).
embedded:    the local engine takes the same HF-named tensors in memory.
(distributed, an NCCL broadcast in buckets via /init_weights_update_group and
/update_weights_from_distributed, is not implemented yet: it needs GPUs to be tested.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from ..convert.convert import write_hf_checkpoint
from .sglang_fleet import SGLangFleet


def sync_to_fleet_from_disk(actor, fleet: SGLangFleet, directory: str | Path, version: int, side_dir: Path | None) -> Path:
    """Write weights version `version` under `directory` and have every server load them."""
    target = Path(directory) / f"v{version:06d}"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    write_hf_checkpoint(actor.chunks, actor.spec, target, side_dir, actor.settings.dtype)
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        fleet.update_weights_from_disk(target, version)
        for old in sorted(Path(directory).glob("v*")):  # keep only the version the servers hold
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return target


def sync_to_embedded(actor, engine, version: int) -> None:
    """In memory: this process's full model (single-process trainer) into the local engine."""
    engine.update_weights(actor.hf_tensors(), version)
