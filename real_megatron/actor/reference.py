"""The reference policy of `algorithm.kl: reference`: the run's initial weights, frozen, on the
actor's own layout, and the record that says which weights those are.

The reference is built like the actor's chunks (the same TransformerConfig: TP, PP, VPP, sequence
parallelism, layer spec; the fused output layer), so log pi_ref at the response positions comes out
of the same forward-only schedule as log pi_old: one extra forward per rollout batch, nothing
gathered. It holds weights only: no gradients, no DDP buffers, no optimizer state. With `offload`
the weights wait in (pinned) host memory between log-prob passes, so they never share the GPU with
the updates' activations.

A checkpoint holds the trained weights, not the reference. On resume the reference is rebuilt from
the model the run began from, which a fresh start records in the run directory (`initial_model.json`:
its path and a fingerprint), so a resumed run penalises the same KL as the uninterrupted one even if
model.path or the task's cache has moved on since; a mismatch is an error, never a silent change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from .model import build_model_chunks
from .model_state import load_model_weights
from .output_layer import return_hidden_states
from .weights import load_hf_weights

RECORD = "initial_model.json"
_SAMPLE_BYTES = 1 << 20  # fingerprint: each weight file's size, header and ends, not all its bytes


def fingerprint(model_dir: str | Path) -> str:
    """A cheap identity of an HF checkpoint: config.json, and each weight file's name, size, first
    and last MiB (safetensors' first bytes are its header: every tensor's name, shape and offset).
    A different or rewritten model changes it; reading gigabytes at every start would not pay."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(_SAMPLE_BYTES))
            f.seek(max(0, size - _SAMPLE_BYTES))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def record_initial_model(run_dir: str | Path, model_dir: str | Path) -> Path:
    """Write RUN_DIR/initial_model.json for a fresh start (rank 0)."""
    path = Path(run_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"path": str(Path(model_dir).resolve()), "fingerprint": fingerprint(model_dir)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def recorded_initial_model(run_dir: str | Path) -> Path:
    """The model a resumed run began from, checked against its fingerprint; errors name the file."""
    path = Path(run_dir) / RECORD
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: a run resumed with algorithm.kl='reference' rebuilds its reference from the model "
            "it began from, which a fresh start records there (a checkpoint from another run directory has it "
            "in that directory: copy its initial_model.json here)"
        )
    record = json.loads(path.read_text())
    model = Path(record["path"])
    if not (model / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: the run began from {model}, which is no longer an HF checkpoint "
            "(no config.json); the reference model cannot be rebuilt without it"
        )
    if fingerprint(model) != record["fingerprint"]:
        raise ValueError(
            f"{path}: {model} has changed since the run began (fingerprint differs); the reference "
            "model would not be the run's initial model"
        )
    return model


class ReferenceModel:
    """Frozen model chunks of this rank's pipeline stage(s), filled from `weights` (HF tensors by
    name, or a megatron dist checkpoint directory), optionally offloaded between passes."""

    def __init__(
        self, spec, config, weights: Callable[[str], torch.Tensor] | str, *, fused_output_layer: bool, offload: bool
    ):
        self.chunks = build_model_chunks(spec, config)
        for chunk in self.chunks:
            if fused_output_layer and chunk.post_process:
                return_hidden_states(chunk)
            chunk.requires_grad_(False)
        if callable(weights):
            load_hf_weights(self.chunks, spec, weights)
        else:
            load_model_weights(self.chunks, weights)
        self.device = next(self.chunks[0].parameters()).device
        # on a CPU-only machine the weights already live in host memory: nothing to move
        self.offload = offload and self.device.type == "cuda"
        if self.offload:
            self._move(torch.device("cpu"))

    def _move(self, device: torch.device) -> None:
        """Frozen weights: the pinned host copy is made once (copied straight into pinned memory)
        and kept; offloading again only drops the device copy, reloading copies it up."""
        params = [param for chunk in self.chunks for param in chunk.parameters()]
        if device.type == "cpu" and not hasattr(self, "_host"):
            self._host = []
            for param in params:
                host = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=True)
                self._host.append(host.copy_(param.data))
        for param, host in zip(params, getattr(self, "_host", [])):
            param.data = host if device.type == "cpu" else host.to(device, non_blocking=True)

    @contextlib.contextmanager
    def resident(self):
        """The weights on the device for the duration of a log-prob pass."""
        if self.offload:
            self._move(self.device)
        try:
            yield self.chunks
        finally:
            if self.offload:
                self._move(torch.device("cpu"))
