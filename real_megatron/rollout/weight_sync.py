"""How the actor's weights reach the generation engine: one path per engine, chosen when the
engine is built (engine_setup.py), so the loop only ever calls `engine.load_weights(actor, version)`.

in memory:   the embedded engine (local.py); the full model gathered onto global rank 0 as HF tensors.
disk:        global rank 0 streams the live model (TP-gathered, stage by stage) into HF safetensors
             in a shared directory; the fleet's servers load it (/update_weights_from_disk).
broadcast:   an NCCL (gloo on CPU) broadcast in buckets to the fleet, see broadcast_sync.py.
tensors:     the colocated layout (rollout.colocate): the servers share the trainer's GPUs and take
             turns with the actor; buckets of HF-named tensors go in through SGLang's
             /update_weights_from_tensor as handles, not bytes: CUDA IPC on GPUs (the server maps
             the trainer's memory and copies), shared memory (/dev/shm) on CPU. TensorWeights also
             moves the actor's state out and back around generation (actor/offload.py).

Every path is a collective over the trainer's ranks: rank 0 holds the engine, the other ranks a
`PeerEngine` that takes their part in it.
"""

from __future__ import annotations

import base64
import io
import shutil
import time
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


def _device_uuid_reducer(tensor):
    """torch's reduction of a CUDA tensor, its device index replaced by the device's UUID (what
    SGLang's patched rebuild expects: the server sees the GPU under another index)."""
    import torch
    from torch.multiprocessing import reductions

    rebuild, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda:
        args = (*args[:6], str(torch.cuda.get_device_properties(args[6]).uuid), *args[7:])
    return rebuild, args


def serialize_tensors(named: list) -> str:
    """[(name, tensor)] as SGLang's MultiprocessingSerializer payload (ForkingPickler, base64):
    CUDA tensors as IPC handles, CPU tensors as files in shared memory (the file_system strategy:
    an unrelated process opens them by name; the default passes file descriptors over a socket only
    a child of this process could use)."""
    from multiprocessing.reduction import ForkingPickler

    import torch
    import torch.multiprocessing as mp

    if mp.get_sharing_strategy() != "file_system":
        mp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    pickler.dispatch_table[torch.Tensor] = _device_uuid_reducer  # the instance's own copy of the table
    pickler.dump(named)
    return base64.b64encode(buf.getvalue()).decode()


def tensor_buckets(tensors, bucket_bytes: int):
    """(payload, is_last) per bucket of about `bucket_bytes`: the tensors copied into one flat
    buffer per dtype (shared memory on CPU, the tensors' own device on GPUs), named views of it."""
    import torch

    def pack(group):
        flats, named = {}, []
        for dtype in {t.dtype for _, t in group}:
            members = [(n, t) for n, t in group if t.dtype == dtype]
            device = members[0][1].device
            flat = torch.empty(sum(t.numel() for _, t in members), dtype=dtype, device=device)
            if device.type == "cpu":
                flat.share_memory_()
            offset = 0
            for n, t in members:
                flat[offset : offset + t.numel()].view(t.shape).copy_(t)
                named.append((n, flat[offset : offset + t.numel()].view(t.shape)))
                offset += t.numel()
            flats[dtype] = flat
        return serialize_tensors(named), flats  # the buffers live until the servers have copied

    group, size, pending = [], 0, None
    for name, tensor in tensors:
        group.append((name, tensor.detach()))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            if pending is not None:
                yield pending[0], False
            pending, group, size = pack(group), [], 0
    if group:
        if pending is not None:
            yield pending[0], False
        pending = pack(group)
    if pending is not None:
        yield pending[0], True


class TensorWeights:
    """The colocated layout's weight path, on every trainer rank (`fleet`: rank 0's SGLangFleet, None
    elsewhere). One step: generate -> release() [servers release their memory, the actor comes back]
    -> train -> send() [the actor's gradients and optimizer state out, the servers' weights back,
    the new weights in as tensors, the actor's parameters out, the servers' KV cache back]. Each
    phase's seconds are in `phases` (release_s, onload_s after release(); offload_s, resume_s,
    weight_update_s after send()), with the GPU memory free after the release where CUDA reports it."""

    def __init__(self, bucket_bytes: int, timeout_s: float):
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.host = None  # actor/offload.HostOffload, made at the first use
        self.phases: dict = {}

    def _host(self, actor):
        if self.host is None:
            from ..actor.offload import HostOffload

            self.host = HostOffload(actor.chunks, actor.optimizer)
        return self.host

    def _rank0(self, what: str, fn) -> float:
        start = time.perf_counter()
        on_rank0(what, fn, timeout_s=self.timeout_s, share=False)
        return time.perf_counter() - start

    def release(self, actor, fleet) -> dict:
        """The servers release their memory (once idle); the actor's state comes back to its GPU."""
        host = self._host(actor)
        self.phases = {"release_s": self._rank0("servers releasing memory", lambda: fleet.release_memory())}
        free = _gpu_free_gb()
        if free is not None:
            self.phases["gpu_free_after_release_gb"] = free
        start = time.perf_counter()
        host.onload()
        self.phases["onload_s"] = time.perf_counter() - start
        return dict(self.phases)

    def send(self, actor, fleet, version: int) -> None:
        from ..convert.convert import iter_whole_model

        host = self._host(actor)
        start = time.perf_counter()
        host.offload(params=False)  # the weights stay for the export
        offload = time.perf_counter() - start
        resume = self._rank0("servers resuming weights", lambda: fleet.resume_memory(["weights"]))
        start = time.perf_counter()
        tensors = iter_whole_model(actor.chunks, actor.spec)  # a collective: every rank drains it
        if fleet is not None:
            fleet.update_weights_from_tensors(tensor_buckets(tensors, self.bucket_bytes), version)
        else:
            for _ in tensors:
                pass
        update = time.perf_counter() - start
        start = time.perf_counter()
        host.offload(params=True)
        offload += time.perf_counter() - start
        free = _gpu_free_gb()
        resume += self._rank0("servers resuming the KV cache", lambda: fleet.resume_memory(["kv_cache", "cuda_graph"]))
        self.phases.update(offload_s=offload, resume_s=resume, weight_update_s=update)
        if free is not None:
            self.phases["gpu_free_after_offload_gb"] = free

    def close(self) -> None:
        pass


def _gpu_free_gb():
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0] / 2**30


def colocated(engine) -> bool:
    return isinstance(getattr(engine, "weights", None), TensorWeights)


def release_for_training(engine, actor) -> dict:
    """Colocated: the servers release their memory and the actor comes back (its phases' seconds);
    nothing in the split layout. Every trainer rank calls it."""
    if not colocated(engine):
        return {}
    return engine.weights.release(actor, None if isinstance(engine, PeerEngine) else engine)


def colocation_phases(engine) -> dict:
    """The last release and weight update's phase timings (colocated), else {}."""
    return dict(engine.weights.phases) if colocated(engine) else {}


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
