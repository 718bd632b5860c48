"""How the actor's weights reach the generation engine: one path per engine, chosen when the
engine is built (engine_setup.py), so the loop only ever calls `engine.load_weights(actor, version)`.

in memory:   the embedded engine (local.py); the full model gathered onto global rank 0 as HF tensors.
disk:        global rank 0 streams the live model (TP-gathered, stage by stage) into HF safetensors
             in a shared directory; the fleet's servers load it (/update_weights_from_disk).
broadcast:   an NCCL (gloo on CPU) broadcast in buckets to the fleet, see broadcast_sync.py.

Every path is a collective over the trainer's ranks: rank 0 holds the engine, the other ranks a
`PeerEngine` that takes their part in it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..convert.convert import iter_whole_model, write_hf_checkpoint
from ..rank0_phases import on_rank0
from .fleet_auth import private_dir


class DiskWeights:
    """The fleet's disk path: safetensors under `directory`, loaded by every server."""

    def __init__(self, directory: str | Path, side_dir: Path | None, timeout_s: float):
        self.directory, self.side_dir, self.timeout_s = Path(directory), side_dir, timeout_s

    def send(self, actor, fleet, version: int) -> None:
        sync_to_fleet_from_disk(actor, fleet, self.directory, version, self.side_dir, self.timeout_s)

    def close(self) -> None:
        pass


class BroadcastWeights:
    """The fleet's broadcast path: every rank drains the model export, rank 0 pushes it to the
    fleet's weight group (`sync`, a BroadcastWeightSync; None on the other ranks)."""

    def __init__(self, sync=None):
        self.sync = sync

    def send(self, actor, fleet, version: int) -> None:
        tensors = iter_whole_model(actor.chunks, actor.spec)  # a collective: every rank drains it
        if self.sync is not None:
            self.sync.push(tensors, version, actor.settings.dtype)
        else:
            for _ in tensors:
                pass

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()


class PeerEngine:
    """A trainer rank other than 0: no engine of its own, only its part of the weight path."""

    def __init__(self, weights):
        self.weights, self.weight_version = weights, 0

    def generate(self, prompts, n, params):
        raise RuntimeError("only global rank 0 generates; this rank holds no engine")

    def load_weights(self, actor, version: int) -> None:
        self.weights.send(actor, None, version)
        self.weight_version = version

    def close(self) -> None:
        self.weights.close()


def sync_to_fleet_from_disk(
    actor, fleet, directory: str | Path, version: int, side_dir: Path | None, timeout_s: float = 600.0
) -> Path:
    """Write weights version `version` under `directory` and have every server load them (`fleet`
    is rank 0's SGLangFleet; None on the other ranks, which only write their shards)."""
    target = private_dir(directory) / f"v{version:06d}"  # the job's user only (files: the trainer's umask)
    write_hf_checkpoint(actor.chunks, actor.spec, target, side_dir, actor.settings.dtype)

    def load_on_servers():  # rank 0 alone; minutes for a large model
        fleet.update_weights_from_disk(target, version)
        for old in sorted(Path(directory).glob("v*")):  # keep only the version the servers hold
            if old != target:
                shutil.rmtree(old, ignore_errors=True)

    on_rank0(f"servers loading weights v{version}", load_on_servers, timeout_s=timeout_s, share=False)
    return target
