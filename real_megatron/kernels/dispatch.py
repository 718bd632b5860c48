"""Which implementation runs: Triton on CUDA, the torch reference elsewhere.

`impl="triton"` on CPU tensors works only under TRITON_INTERPRET=1 (Triton's interpreter), which
is how CI runs the Triton kernels on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings

import torch

from . import reference

IMPLS = ("auto", "triton", "torch")
INTERPRETER_ON_GPU = (
    "TRITON_INTERPRET is set on a machine with a GPU: Triton kernels would run in its CPU "
    "interpreter (orders of magnitude slower); unset it for GPU runs"
)
_warned = False


def _warn_interpreter_on_gpu() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(INTERPRETER_ON_GPU, stacklevel=3)


# Value checks (index and target ids in range) read tensors back to the host: one device sync
# each, about ten per micro-batch. On by default (direct calls, tests); the training step turns
# them off (its ids are checked on the host once per batch); REAL_MEGATRON_KERNEL_CHECKS=1 keeps
# them on everywhere (the test suite sets it).
KERNEL_CHECKS_ENV = "REAL_MEGATRON_KERNEL_CHECKS"
_value_checks = [True]


def value_checks_enabled() -> bool:
    return _value_checks[-1] or os.environ.get(KERNEL_CHECKS_ENV, "0") not in ("", "0")


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the kernels' value checks on or off inside the block (see KERNEL_CHECKS_ENV)."""
    _value_checks.append(enabled)
    try:
        yield
    finally:
        _value_checks.pop()


def without_value_checks(fn):
    """Decorator: run `fn` with the kernels' value checks off (no device syncs for them)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with value_checks(False):
            return fn(*args, **kwargs)

    return wrapper


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting(environ=None) -> bool:
    return (os.environ if environ is None else environ).get("TRITON_INTERPRET", "0") not in ("", "0")


def backend(impl: str, tensor: torch.Tensor):
    """The module (`triton_kernels` or `reference`) that implements `impl` for `tensor`'s device."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if tensor.is_cuda and triton_available() else "torch"
    if tensor.is_cuda and impl == "triton" and interpreting():
        _warn_interpreter_on_gpu()
    if impl == "torch":
        return reference
    if not triton_available():
        raise RuntimeError("impl='triton' needs the `triton` package (pip install triton)")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            f"impl='triton' got {tensor.device.type} tensors: Triton compiles for CUDA only; set TRITON_INTERPRET=1 "
            "(before importing real_megatron.kernels) to run the kernels in Triton's interpreter"
        )
    from . import triton_kernels

    return triton_kernels
