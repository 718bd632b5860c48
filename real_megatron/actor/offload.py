"""The actor's device state moved to host memory and back, for the colocated layout (the SGLang
servers use the same GPUs while the actor's state is out; rollout/colocate.py).

Parameters and gradients live in megatron-core's DDP buffers, and move with their own API
(`_ParamAndGradBuffer.offload_to_cpu` / `reload_from_cpu`): the parameters are copied into a host
buffer and the device storage is released; the gradients are dropped (released, zeroed when they
come back: a step starts from zero gradients anyway). The host buffer is set here before the first
offload, once, pinned where CUDA exists, and kept between steps (megatron-core would otherwise make a
pinned copy itself, which fails without CUDA, where `.cpu()` returns the buffer itself).

The optimizer's state (Adam's moments, the fp32 main parameters of 16-bit models) moves storage by
storage into host buffers kept between steps, the device storage released and re-allocated on the
way back, so every tensor object and view (the distributed optimizer's shards among them) stays the
same. megatron-core's own `MegatronOptimizer.offload_to_cpu` / `restore_from_cpu` (0.16) is not
used: it only moves CUDA tensors (nothing at all on a CPU run, so nothing a CPU test could check)
and makes fresh pageable copies at each offload. The APIs named here are the same in megatron-core
0.16.1 and 0.19.2 (this project's two tiers). Storages of the DDP parameter buffers (the main
parameters of an fp32 model are views into them) move with the buffers, not twice.

Nothing here changes a number: a cycle is bit-identical (tests/integration/test_actor_offload.py).
"""

from __future__ import annotations

import torch


def _buffers(chunks) -> list:
    return [b for chunk in chunks for b in list(chunk.buffers) + list(chunk.expert_parallel_buffers)]


def _torch_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    return [o.optimizer for o in (chained if chained is not None else [optimizer]) if getattr(o, "optimizer", None)]


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class _Storages:
    """Storages moved byte for byte into host buffers kept between steps; the device storage is
    released (resized to 0) and re-allocated on the way back, so every tensor and view stays valid."""

    def __init__(self, pin: bool):
        self.pin, self.host, self.out = pin, {}, {}

    def offload(self, storages: dict[int, torch.UntypedStorage]) -> None:
        for key, storage in storages.items():
            host = self.host.get(key)
            if host is None or host.numel() != storage.nbytes():
                host = self.host[key] = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=self.pin)
            host.copy_(_bytes_view(storage), non_blocking=self.pin)
            self.out[key] = (storage, storage.nbytes())
        if self.pin:
            torch.cuda.synchronize()
        for storage, _ in self.out.values():
            storage.resize_(0)

    def onload(self) -> None:
        for key, (storage, nbytes) in self.out.items():
            storage.resize_(nbytes)
            _bytes_view(storage).copy_(self.host[key], non_blocking=self.pin)
        self.out = {}


class HostOffload:
    """Moves an actor's parameters, gradients and optimizer state out of device memory and back."""

    def __init__(self, chunks, optimizer):
        self.chunks, self.optimizer = chunks, optimizer
        self.pin = torch.cuda.is_available()
        self.params_out = self.state_out = False
        self._params, self._state = _Storages(self.pin), _Storages(self.pin)

    # --- what moves ----------------------------------------------------------------------------

    def _model_params(self) -> list[torch.Tensor]:
        return [p for chunk in self.chunks for p in chunk.parameters()]

    def _buffer_storages(self) -> set[int]:
        return {b.param_data.untyped_storage()._cdata for b in _buffers(self.chunks) if b.param_data is not None}

    def _param_storages(self) -> dict[int, torch.UntypedStorage]:
        """Parameters outside the DDP buffers (no buffer without the distributed optimizer)."""
        skip = self._buffer_storages()
        found = {p.untyped_storage()._cdata: p.untyped_storage() for p in self._model_params()}
        return {k: s for k, s in found.items() if k not in skip and s.nbytes() > 0}

    def _optimizer_storages(self) -> dict[int, torch.UntypedStorage]:
        """Every storage of the optimizer's parameters and state that is not the model's own."""
        skip = self._buffer_storages() | {p.untyped_storage()._cdata for p in self._model_params()}
        found = {}
        for opt in _torch_optimizers(self.optimizer):
            tensors = [p for group in opt.param_groups for p in group["params"]]
            tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
            for t in tensors:
                storage = t.untyped_storage()
                if storage._cdata not in skip and storage.nbytes() > 0:
                    found[storage._cdata] = storage
        return found

    def bytes_on_device(self) -> int:
        """Bytes the actor holds in the storages this moves (0 when all is out)."""
        total = sum(s.nbytes() for s in self._optimizer_storages().values())
        total += sum(s.nbytes() for s in self._param_storages().values())
        for b in _buffers(self.chunks):
            for data in (b.param_data, b.grad_data):
                if data is not None:
                    total += data.untyped_storage().nbytes()
        return total

    # --- out and back --------------------------------------------------------------------------

    def offload(self, params: bool = True, grads_and_state: bool = True) -> None:
        """Gradients and optimizer state (`grads_and_state`) and/or parameters to host memory."""
        if grads_and_state and not self.state_out:
            self._state.offload(self._optimizer_storages())
            for b in _buffers(self.chunks):
                b.offload_to_cpu(move_params=False, move_grads=True)
            self.state_out = True
        if params and not self.params_out:
            for b in _buffers(self.chunks):
                if b.param_data is not None and b.param_data_cpu is None:
                    b.param_data_cpu = torch.empty(
                        b.param_data.shape, dtype=b.param_data.dtype, device="cpu", pin_memory=self.pin
                    )
                b.offload_to_cpu(move_params=True, move_grads=False)
            self._params.offload(self._param_storages())
            self.params_out = True
        self._sync()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def onload(self) -> None:
        """Everything offload() moved, back on the device (gradients zeroed)."""
        if self.params_out:
            for b in _buffers(self.chunks):
                b.reload_from_cpu(move_params=True, move_grads=False)
            self._params.onload()
            self.params_out = False
        if self.state_out:
            self._state.onload()
            for b in _buffers(self.chunks):
                b.reload_from_cpu(move_params=False, move_grads=True)
            self.state_out = False
        self._sync()

    @property
    def resident(self) -> bool:
        return not (self.params_out or self.state_out)

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
