"""Let megatron-core run on a machine without CUDA (gloo, CPU tensors).

megatron-core (0.16-0.19) hard-codes CUDA in a handful of places that the CPU path reaches. Each
redirect below names the megatron-core call that needs it. `enable()` does nothing when CUDA is
available, so GPU runs take megatron-core's own paths untouched. It must run before megatron-core
builds models, optimizers or schedules (the actor calls it first).

Two functions here are not CPU redirects but megatron-core gaps a GPU meets too, installed by the
actor only where a setting reaches them: hybrid_optimizer_fp32_shards_as_leaves (optim.cpu_offload
with the distributed optimizer) and precision_aware_optimizer_without_te.
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_enabled = False


class _NullStream:
    """Stands in for torch.cuda.current_stream(): every wait or sync is already done on CPU."""

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _NullEvent()


class _NewNullStream(_NullStream):
    """torch.cuda.Stream(...) on CPU: a new stream that is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass


class _NullEvent:
    """Stands in for a CUDA event recorded on a _NullStream: already complete."""

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


class _CudaFactoryToCpu(TorchFunctionMode):
    """Tensor factories called with device="cuda" get the CPU instead.

    Needed by: pipeline schedules (total_num_tokens = torch.zeros(..., device="cuda")), the
    optimizer's found_inf / _scale tensors, and
    clip_grads' total-norm tensor.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None:
            device = torch.device(device) if not isinstance(device, torch.device) else device
            if device.type == "cuda":
                kwargs["device"] = _CPU
        return func(*args, **kwargs)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32 without its assertion that
    grads are torch.cuda.FloatTensor (and without the multi_tensor_applier CUDA kernel): same math."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


# megatron-core warns at import and model build that optional CUDA extensions are absent; on a
# machine without CUDA that is expected and says nothing (on a GPU it matters: kept there).
_CPU_EXPECTED_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed\. Falling back to Torch Norm",
)
# megatron-core 0.16's own TransformerConfig default, whatever the config says
_ALWAYS_EXPECTED_WARNINGS = (r"full scope is deprecated",)


def quiet_known_warnings() -> None:
    import warnings

    patterns = _ALWAYS_EXPECTED_WARNINGS + (() if torch.cuda.is_available() else _CPU_EXPECTED_WARNINGS)
    for pattern in patterns:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def _enable_moe() -> None:
    """The mixture-of-experts layer's CUDA-only spots (megatron.core.transformer.moe)."""
    import contextlib

    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # router_gating_linear (TopKRouter.gating) calls `te_general_gemm`, a name moe_utils binds only
    # when Transformer Engine imports (a NameError without it); None selects its torch.mm branch.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # MoEAlltoAllTokenDispatcher.__init__ creates a torch.cuda.Stream for its device-to-host copies
    # of the split sizes (a class attribute, made once), and _maybe_dtoh_and_synchronize enters
    # torch.cuda.stream(...) and records an event on it: on CPU the sizes are already on the host.
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NullStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()

    # ...and there maybe_move_tensor_to_cpu turns the all-to-all split sizes into numpy arrays only
    # when they are CUDA tensors; CPU tensors would reach all_to_all_single as tensors, which gloo
    # refuses as split sizes: the same conversion for host tensors.
    def split_sizes_on_host(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = split_sizes_on_host


def _enable_hybrid_optimizer() -> None:
    """megatron-core's HybridDeviceOptimizer (optim.cpu_offload) on a machine without CUDA.

    _get_sub_optimizer_param_groups puts on the "GPU" side exactly the parameters that are CUDA
    tensors and makes the offloaded ones pinned host clones (`.cpu().pin_memory()`): on CPU no
    parameter is a CUDA tensor and nothing can be pinned. Here the parameters it is given are the
    "device" side and the offloaded ones plain host clones, so the same fraction of them goes to the
    CPU optimizers through the same copies (gradients out, parameters back); its CUDA streams
    (overlap_cpu_optimizer_d2h_h2d) are the already-synchronous _NullStream."""
    from megatron.core.optimizer.cpu_offloading import hybrid_optimizer

    torch.cuda.Stream = _NewNullStream  # a class: annotations such as `torch.cuda.Stream | None` still work
    plain = hybrid_optimizer.HybridDeviceOptimizer._get_sub_optimizer_param_groups

    class _DeviceSide:
        """A parameter as megatron-core's grouping sees it: `is_cuda` true (it is on the device side),
        `.cpu().pin_memory()` a host clone (the offloaded copy)."""

        def __init__(self, param):
            self.param = param
            self.is_cuda = True
            self.dtype = param.dtype

        def numel(self):
            return self.param.numel()

        def detach(self):
            return self

        def clone(self):
            return self

        def cpu(self):
            return self

        def pin_memory(self):
            return self.param.detach().clone()

        def float(self):  # param_update_in_fp32: the fp32 copy of a 16-bit parameter
            return self.param.detach().clone().float()

    def groups(self, offload_fraction):
        self.pin_cpu_grads = self.pin_cpu_params = False  # the host gradient copies: no pinned allocator
        # run megatron-core's own grouping over stand-ins, then put the real parameters back
        originals = [group["params"] for group in self.param_groups]
        side = {}
        for group in self.param_groups:
            group["params"] = [side.setdefault(id(p), _DeviceSide(p)) for p in group["params"]]
        try:
            cpu_groups, gpu_groups, gpu_to_cpu, cpu_to_gpu, to_fp32 = plain(self, offload_fraction)
        finally:
            for group, params in zip(self.param_groups, originals):
                group["params"] = params
        real = lambda t: t.param if isinstance(t, _DeviceSide) else t  # noqa: E731
        for group in cpu_groups + gpu_groups:
            group["params"] = [real(p) for p in group["params"]]
        gpu_to_cpu = {real(k): v for k, v in gpu_to_cpu.items()}
        cpu_to_gpu = {k: real(v) for k, v in cpu_to_gpu.items()}
        to_fp32 = {real(k): v for k, v in to_fp32.items()}
        return cpu_groups, gpu_groups, gpu_to_cpu, cpu_to_gpu, to_fp32

    hybrid_optimizer.HybridDeviceOptimizer._get_sub_optimizer_param_groups = groups


def precision_aware_optimizer_without_te() -> None:
    """OptimizerConfig.__post_init__ with use_precision_aware_optimizer asks is_te_min_version("2.1.0"),
    which compares None with a version when Transformer Engine is absent (a TypeError in 0.16): an
    absent TE is no minimum version (store_param_remainders off, as for an old TE). Not a CPU
    redirect: a GPU machine without TE needs it as much (with optim.cpu_offload the
    HybridDeviceOptimizer, not TE's FusedAdam, keeps the master copies). Nothing changes where TE is
    installed. The actor calls it for optim.use_precision_aware_optimizer."""
    from megatron.core import utils
    from megatron.core.optimizer import optimizer_config

    if utils.get_te_version() is None:
        optimizer_config.is_te_min_version = lambda version, check_equality=True: False


def hybrid_optimizer_fp32_shards_as_leaves() -> None:
    """The distributed optimizer's fp32 parameter shards as leaf tensors, so that it can rebuild the
    HybridDeviceOptimizer (optim.cpu_offload with use_distributed_optimizer) over them.

    Not a CPU redirect: a GPU needs it as much. DistributedOptimizer._build_model_and_main_param_groups
    shards a 16-bit parameter as `model_param.detach().view(-1)[a:b]` (a leaf) but an fp32 one as
    `model_param.view(-1)[a:b]`, a view of a parameter that requires grad: a non-leaf tensor. The plain
    optimizer takes it (its param_groups are assigned directly); the HybridDeviceOptimizer is rebuilt
    through torch.optim.Optimizer.__init__, whose add_param_group refuses it ("can't optimize a non-leaf
    Tensor"). Any fp32 parameter reaches this: every parameter of an fp32 model, and in a 16-bit model
    the fp32 ones (the local spec's torch RMSNorm weights; megatron-core 0.16-0.19 alike). The shard is
    replaced by `shard.detach()`: the same storage (the optimizer's in-place update still lands in the
    model parameter, and the gradient is still set on the shard's `.grad`), with the same
    tensor-parallel attributes. Installed by the actor only for that combination; idempotent."""
    from megatron.core import tensor_parallel
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    plain = DistributedOptimizer._build_model_and_main_param_groups.__func__
    if getattr(plain, "_fp32_shards_as_leaves", False):
        return

    def build(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        groups = plain(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        _, model_fp32_groups, _, shard_fp32_groups, _ = groups
        for group_range, models, shards in zip(opt_group_ranges, model_fp32_groups, shard_fp32_groups):
            leaves = {}
            for i, (model_param, shard) in enumerate(zip(models, shards)):
                if shard.is_leaf:
                    continue
                leaf = shard.detach()
                tensor_parallel.copy_tensor_model_parallel_attributes(leaf, model_param)
                if hasattr(model_param, "shared"):
                    leaf.shared = model_param.shared
                leaves[id(shard)] = shards[i] = leaf
            params = group_range["orig_group"]["params"]
            group_range["orig_group"]["params"] = [leaves.get(id(p), p) for p in params]
        return groups

    build._fp32_shards_as_leaves = True
    DistributedOptimizer._build_model_and_main_param_groups = classmethod(build)


def enable() -> bool:
    """Install the redirects when CUDA is unavailable; return whether they are active."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True

    # `device=torch.cuda.current_device()`: core attention's buffers, RoPE inv_freq, TP gather
    # buffers, pipeline p2p shape tensors, DDP grad buffers.
    torch.cuda.current_device = lambda: _CPU
    # torch.cuda.synchronize(): after pipeline p2p (p2p_communication) and in DDP helpers.
    torch.cuda.synchronize = lambda device=None: None
    # tensor.cuda(): the tied embedding/output weight with PP > 1 (GPTModel's
    # setup_embeddings_and_output_layer) and optimizer state reload.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # torch.cuda.current_stream(): DDP's start_grad_sync (0.19) and param-gather overlap.
    torch.cuda.current_stream = lambda device=None: _NullStream()

    # tensor_parallel.random's CUDA RNG tracker (model_parallel_cuda_manual_seed, dropout forks):
    # the "CUDA" generator becomes the CPU default generator, which CPU dropout draws from.
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # ...which makes CudaRNGStatesTracker.fork()'s "CPU RNG state changed" warning expected noise.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )

    # tensor.type() == 'torch.cuda.FloatTensor' picks the main-param layout in DistributedOptimizer
    # (_build_model_and_main_param_groups) and Float16OptimizerWithFloat16Params: CPU tensors
    # answer with the CUDA name (only megatron-core compares these strings).
    plain_type = torch.Tensor.type

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = plain_type(self)  # may re-enter through the factory mode: rename once
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return plain_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_named_type

    # clip_grads asserts grads are torch.cuda.FloatTensor (optimizer.clip_grad_norm).
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    # The default causal mask (fused_softmax's torch path) is made with device="cuda"; with
    # activation recompute it is made again inside autograd's backward, where the factory mode
    # below is not active: build it on the CPU directly.
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    @functools.lru_cache(maxsize=8)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()

    transformer_utils.get_default_causal_mask = fused_softmax.get_default_causal_mask = cpu_causal_mask

    _enable_moe()
    _enable_hybrid_optimizer()

    # Literal device="cuda" in factory calls, for the rest of the process (main thread).
    _CudaFactoryToCpu().__enter__()
    _enabled = True
    return True
