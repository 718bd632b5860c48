"""The actor's settings: its own section (`actor`: how an update is cut into micro-batches, computed
and guarded), the model's (`model`), its optimizer's (`optim`) and its checkpoints' (`checkpoint`),
each with its defaults and its own checks. Checks that involve other sections are config.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

# float16 needs a dynamic loss scale wired through the schedule and an overflow-skip policy that
# lets the scaler back off; neither exists here, and without them updates vanish (the optimizer
# unscales gradients that were never scaled) or every overflow stops the run
FLOAT16_REFUSED = (
    "float16 training has no loss scaling here (its gradients would be unscaled by 2^32 "
    "without ever being scaled); use bfloat16 (or float32)"
)


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF checkpoint directory (config.json + safetensors)
    tokenizer: Optional[str] = None  # defaults to `path`
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    recompute_activations: bool = False
    # with recompute_activations: how many layers of each pipeline stage are recomputed (megatron's
    # block method: the first N); null = the fewest that fit parallel.gpu_memory_gb by the memory
    # estimate (--dry-run prints the choice; 0 when everything fits without)
    recompute_layers: Optional[int] = None
    # An HF checkpoint is authoritative for the architecture; these build a fresh model when no
    # checkpoint exists yet (tiny models in tests and the CPU quickstart), and give --dry-run's
    # memory estimate the architecture when the checkpoint is not on this machine.
    hf_config_overrides: dict[str, Any] = field(default_factory=dict)
    # mixture-of-experts models (docs/moe.md): megatron's token dispatcher between expert-parallel
    # ranks, and the load-balancing loss's coefficient (null: the HF config's router_aux_loss_coef)
    moe_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    moe_aux_loss_coef: Optional[float] = None

    def check(self) -> list[str]:
        errors = []
        if self.recompute_layers is not None and self.recompute_layers < 0:
            errors.append(f"model.recompute_layers must be >= 0 (or null: sized to fit), got {self.recompute_layers}")
        if self.dtype == "float16":
            errors.append("model.dtype=float16: " + FLOAT16_REFUSED)
        return errors


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    # megatron-core's HybridDeviceOptimizer: this fraction of the optimizer's main parameters and Adam
    # state lives in host memory and is stepped there (torch's AdamW); the rest on the GPU
    cpu_offload: bool = False
    cpu_offload_fraction: float = 1.0
    # the host part's gradient copies out and parameter copies back on their own CUDA streams,
    # one CPU optimizer per parameter so each steps as soon as its gradient is on the host
    overlap_cpu_optimizer_d2h_h2d: bool = False
    # megatron-core's precision-aware optimizer (distributed optimizer only; with cpu_offload the
    # HybridDeviceOptimizer keeps the fp32 master copies, without it Transformer Engine's FusedAdam)
    use_precision_aware_optimizer: bool = False

    def check(self) -> list[str]:
        errors = [f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}"] if self.min_lr > self.lr else []
        if self.clip_grad < 0:
            errors.append(
                f"optim.clip_grad must be >= 0 (the gradient norm's bound; 0: no clipping), got {self.clip_grad}"
            )
        if self.weight_decay < 0:
            errors.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 < self.cpu_offload_fraction <= 1.0:
            errors.append(f"optim.cpu_offload_fraction must be in (0, 1], got {self.cpu_offload_fraction}")
        if self.use_precision_aware_optimizer and not self.use_distributed_optimizer:
            errors.append("optim.use_precision_aware_optimizer needs optim.use_distributed_optimizer: true")
        if self.use_precision_aware_optimizer and not self.cpu_offload:
            errors.append(
                "optim.use_precision_aware_optimizer without optim.cpu_offload needs Transformer Engine's "
                "FusedAdam, which this project does not install: use it with optim.cpu_offload: true"
            )
        return errors


@dataclass
class ActorConfig:
    """The `actor` section: how the actor cuts a mini-batch, computes log-probs and guards an update."""

    prompts_per_micro_batch: int = 8  # one forward/backward, whole groups, spread over DP ranks
    # micro-batches by tokens instead: each rank's share of a micro-batch holds at most this many
    # prompt + response tokens (whole groups still; their number per mini-batch then varies)
    max_tokens_per_micro_batch: Optional[int] = None
    pack_sequences: bool = True  # each rank's rollouts one after another in one row (else padded rows)
    fused_output_layer: bool = True  # log-probs from hidden states without [tokens, vocab] logits
    # an update whose loss or gradient is NaN/inf is skipped (weights and optimizer untouched);
    # this many skipped updates in a row stop the run with an error naming the step
    max_consecutive_skips: int = 5
    # algorithm.kl=reference: the reference model's weights wait in host memory between log-prob passes
    reference_offload: bool = False
    # mixture-of-experts models: "rollout" = every actor forward (old log-probs, updates) routes each
    # token to the experts the rollout engine routed it to; "none" = the actor's own routers.
    # routing_mismatch_frac is measured either way (docs/moe_routing_replay.md)
    routing_replay: Literal["none", "rollout"] = "rollout"


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <output_dir>/checkpoints
    every_steps: int = 50
    keep_last: int = 3
    resume: str = "auto"  # "auto" (latest in dir), "none", or a checkpoint path
    save_hf_final: bool = True
    # fully_reshardable: loads under any layout and layer spec (host memory at save and load: 12 B
    # per parameter of a model-parallel shard, on one rank of each DP group); dp_reshardable: each
    # rank its own shard (cheap at any size), same spec and TP/PP only; auto: fully_reshardable while
    # that host memory is at most memory.FULLY_RESHARDABLE_MAX_GB, else dp_reshardable (7B at TP=2
    # would gather ~46 GB onto one host)
    optimizer_format: Literal["auto", "fully_reshardable", "dp_reshardable"] = "auto"
