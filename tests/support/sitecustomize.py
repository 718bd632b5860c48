"""Test servers only (tests/support goes first on their PYTHONPATH): SGLang's routed-experts capture
and memory release on CPU.

Why it exists: SGLang 0.5.23 keeps the routed experts of every cached token (`--enable-return-routed-
experts`) in a pinned host buffer that it registers with `cudaHostRegister` (mem_cache/pool_host/
common.py, `_cuda_host_register`), which fails without a CUDA driver, so a CPU server with the flag
stops at start. Registration only speeds up device-to-host copies; on a CPU server there is no device,
so it is skipped there. And /release_memory_occupation ends with `torch.get_device_module().synchronize()`
(managers/scheduler_components/weight_updater.py), which in the CUDA build of torch the server runs is
torch.cuda's and fails without a driver: on a CPU server the device module is torch.cpu's there (its
synchronize has nothing to wait for). Nothing else of SGLang changes, and nothing changes where CUDA exists.
"""

import importlib.abc
import importlib.util
import sys

_HOST_POOL = "sglang.srt.mem_cache.pool_host.common"
_WEIGHT_UPDATER = "sglang.srt.managers.scheduler_components.weight_updater"


class _CpuTorch:
    """torch, except that the current device module is torch.cpu's (a CPU server has no other)."""

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    @staticmethod
    def get_device_module(device=None):
        import torch

        return torch.cpu if device is None else torch.get_device_module(device)


def _patch(module) -> None:
    import torch

    if torch.cuda.is_available():
        return
    if module.__name__ == _HOST_POOL:
        module._cuda_host_register = lambda buffer, registration_granularity_bytes=None: None
    else:
        module.torch = _CpuTorch()


class _CpuServerPatches(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.pending = {_HOST_POOL, _WEIGHT_UPDATER}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real module, patched once loaded
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _CpuServerPatches())
