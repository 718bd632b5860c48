"""Test servers only (tests/support goes first on their PYTHONPATH): SGLang's routed-experts capture on CPU.

Why it exists: SGLang 0.5.23 keeps the routed experts of every cached token (`--enable-return-routed-
experts`) in a pinned host buffer that it registers with `cudaHostRegister` (mem_cache/pool_host/
common.py, `_cuda_host_register`), which fails without a CUDA driver, so a CPU server with the flag
stops at start. Registration only speeds up device-to-host copies; on a CPU server there is no device,
so it is skipped there. Nothing else of SGLang changes, and nothing changes where CUDA exists.
"""

import importlib.abc
import importlib.util
import sys

_MODULE = "sglang.srt.mem_cache.pool_host.common"


class _SkipHostRegistrationOnCpu(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)  # find the real module, then patch it once loaded
        spec = importlib.util.find_spec(fullname)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            import torch

            if not torch.cuda.is_available():
                module._cuda_host_register = lambda buffer, registration_granularity_bytes=None: None

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _SkipHostRegistrationOnCpu())
