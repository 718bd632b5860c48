"""The policy on megatron-core: recompute old log-probs, then REAL (or a baseline) updates.

One `train_step(rollouts)` is lines 5-11 of Algorithm 1: the rollout batch becomes group-aligned
micro-batches cut by a token budget, each rank's share packed into one row (batching.py); log
pi_old is recomputed by a forward-only pass (so s = 0 at the first update); each mini-batch runs
megatron-core's forward/backward schedule (no pipelining, 1F1B or interleaved) whose last stage
returns hidden states, turned into token log-probs against the vocabulary-parallel output weight
without ever forming logits (output_layer.py) -> sequence scores -> the objective (REAL through a
group log-sum-exp across DP), then the (distributed) optimizer steps.

Loss scaling: each micro-batch's loss is sum_unit terms[unit] / count[unit], with counts over the
whole mini-batch (all micro-batches, all DP ranks). megatron-core divides the returned loss by the
number of micro-batches and DDP averages gradients over DP, so the returned loss is multiplied by
both: the gradient is then exactly that of the mini-batch loss, whatever TP, PP, DP and M are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from ..config import AlgorithmConfig, ParallelConfig, TrainConfig
from ..kernels import without_value_checks
from ..memory import architecture_of, recompute_layers
from ..objectives import PolicyBatch, normalise, sequence_scores
from ..objectives.importance import mismatch_partials
from ..objectives.kl import k3_kl
from ..objectives.registry import Objective, RealObjective
from ..ranks import is_rank0, stage_first_rank
from ..rollout.types import Rollout
from . import step_metrics
from .batching import MiniBatch, build_mini_batches, padding_fraction
from .context_parallel import full_token_values
from .model import ArchSpec, build_model_chunks, transformer_config
from .model_state import load_model_weights
from .moe_router import moe_padding_mask
from .moe_stats import MoEStats
from .output_layer import fused_token_logprobs, logits_token_logprobs, return_hidden_states
from .reference import ReferenceModel
from .routing_replay import RoutingReplay, check_routed_experts
from .settings import FLOAT16_REFUSED, ActorConfig, ModelConfig, OptimConfig
from .weights import iter_hf_tensors, load_hf_weights, unwrap

log = logging.getLogger(__name__)


@dataclass
class ActorSettings:
    """What an Actor is built from: its own section (`actor`), its optimizer's (`optim`) and the
    layout (`parallel`), each taken as loaded, and the few facts it reads from other sections
    (from_config gathers them; their defaults are those sections')."""

    actor: ActorConfig = field(default_factory=ActorConfig)  # micro-batches, output layer, skips, offload
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW, clipping, lr schedule
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # tp, pp, vpp, sequence_parallel
    dtype: torch.dtype = torch.float32  # model.dtype
    recompute_activations: bool = False  # model.recompute_activations
    recompute_layers: Optional[int] = None  # with recompute: the first N layers per stage (None: all)
    total_steps: int = 1000  # optimizer steps, for the lr schedule
    groups_per_mini_batch: int = TrainConfig.prompts_per_mini_batch  # one optimizer step
    updates_per_batch: int = AlgorithmConfig.updates_per_batch
    use_engine_logprobs: bool = False  # rollout.use_engine_logprobs
    # log-probs of the sampling distribution, softmax(logits / T), as the engines report them
    logprob_temperature: float = 1.0
    mismatch_threshold: float = AlgorithmConfig.mismatch_threshold  # |log pi_old - log pi_engine| in mismatch_frac
    pad_id: int = 0
    moe_dispatcher: str = ModelConfig.moe_dispatcher  # MoE models: model.moe_dispatcher
    moe_aux_loss_coef: Optional[float] = None  # model.moe_aux_loss_coef (None: the HF config's router_aux_loss_coef)

    @classmethod
    def from_config(cls, cfg, pad_id: int) -> ActorSettings:
        """The actor's settings for a run's config: its sections, and the facts of the run it needs."""
        t, r, a = cfg.train, cfg.rollout, cfg.algorithm
        return cls(
            actor=cfg.actor,
            optim=cfg.optim,
            parallel=cfg.parallel,
            dtype=getattr(torch, cfg.model.dtype),
            recompute_activations=cfg.model.recompute_activations,
            recompute_layers=recompute_layers(cfg, architecture_of(cfg)),
            total_steps=t.steps * (t.prompts_per_step // t.prompts_per_mini_batch) * a.updates_per_batch,
            groups_per_mini_batch=t.prompts_per_mini_batch,
            updates_per_batch=a.updates_per_batch,
            use_engine_logprobs=r.use_engine_logprobs,
            logprob_temperature=r.temperature if r.temperature > 0 else 1.0,
            mismatch_threshold=a.mismatch_threshold,
            pad_id=pad_id,
            moe_dispatcher=cfg.model.moe_dispatcher,
            moe_aux_loss_coef=cfg.model.moe_aux_loss_coef,
        )


# |s̄| allowed at the first update, where pi_theta is pi_old: the training forward and the
# recomputation should agree to rounding in the model's dtype
FIRST_UPDATE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


class NonFiniteUpdates(RuntimeError):
    """Too many updates in a row had a NaN or inf loss or gradient."""


def rollout_stats(rollouts: list[Rollout]) -> dict:
    """Reward mean and the fraction of prompt groups whose rewards are all equal (no signal)."""
    groups: dict[int, set] = {}
    for r in rollouts:
        groups.setdefault(r.group, set()).add(r.reward)
    return {
        "reward_mean": sum(r.reward for r in rollouts) / max(1, len(rollouts)),
        "uniform_group_fraction": sum(len(v) == 1 for v in groups.values()) / max(1, len(groups)),
        "response_length_mean": sum(len(r.response_ids) for r in rollouts) / max(1, len(rollouts)),
    }


def device_memory() -> dict:
    """Peak GPU memory of this process (torch) and the device's use, from the CUDA runtime of the
    current device (NVML counts devices physically, so its index is wrong under CUDA_VISIBLE_DEVICES)."""
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"gpu_peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30, "gpu_used_gb": (total - free) / 2**30}


class Actor:
    def __init__(
        self,
        spec: ArchSpec,
        settings: ActorSettings,
        objective: Objective,
        weights: Callable[[str], torch.Tensor] | str,
        reference: Callable[[str], torch.Tensor] | str | None = None,
    ):
        """weights: HF tensors by name (a checkpoint reader, or a fresh initialisation), or the
        directory of a megatron dist checkpoint (converted, or saved by training) to load.
        reference: the reference policy's weights for kl='reference' (default: `weights`, the
        initial model; a resumed run passes the model it began from, see reference.py)."""
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.spec, self.settings, self.objective = spec, settings, objective
        s, o = settings, settings.optim
        if s.dtype == torch.float16:
            raise ValueError("Actor: " + FLOAT16_REFUSED)
        # context parallelism: each packed sequence split over the CP group (context_parallel.py)
        self.cp_size, self.cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        self.cp_group = ps.get_context_parallel_group() if self.cp_size > 1 else None
        if self.cp_size > 1 and spec.moe is not None:
            raise ValueError(
                "Actor: context parallelism with a mixture-of-experts model is not supported yet "
                "(routing replay's experts are not split over the context-parallel ranks)"
            )
        self.config = transformer_config(
            spec,
            tp=s.parallel.tp,
            pp=s.parallel.pp,
            vpp=s.parallel.vpp,
            cp=self.cp_size,
            sequence_parallel=s.parallel.sequence_parallel,
            dtype=s.dtype,
            recompute=s.recompute_activations,
            recompute_layers=s.recompute_layers,
            ep=s.parallel.ep,
            etp=s.parallel.etp,
            moe_dispatcher=s.moe_dispatcher,
            moe_aux_loss_coef=s.moe_aux_loss_coef,
        )
        chunks = build_model_chunks(spec, self.config)
        if s.actor.fused_output_layer:
            for chunk in chunks:
                if chunk.post_process:
                    return_hidden_states(chunk)
        # weights go in before the optimizer copies them into its main params
        if callable(weights):
            load_hf_weights(chunks, spec, weights)
        else:
            load_model_weights(chunks, weights)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=o.use_distributed_optimizer
        )
        self.chunks = [
            DistributedDataParallel(
                config=self.config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0
            )
            for index, chunk in enumerate(chunks)
        ]
        self.config.finalize_model_grads_func = finalize_model_grads
        if o.cpu_offload and o.use_distributed_optimizer:  # megatron-core's own gaps, GPU and CPU alike
            from .cpu_compat import hybrid_optimizer_fp32_shards_as_leaves

            hybrid_optimizer_fp32_shards_as_leaves()
        if o.use_precision_aware_optimizer:
            from .cpu_compat import precision_aware_optimizer_without_te

            precision_aware_optimizer_without_te()
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=s.dtype == torch.bfloat16,
                fp16=s.dtype == torch.float16,
                params_dtype=s.dtype,
                use_distributed_optimizer=o.use_distributed_optimizer,
                optimizer_cpu_offload=o.cpu_offload,
                optimizer_offload_fraction=o.cpu_offload_fraction if o.cpu_offload else 0.0,
                overlap_cpu_optimizer_d2h_h2d=o.overlap_cpu_optimizer_d2h_h2d,
                use_precision_aware_optimizer=o.use_precision_aware_optimizer,
            ),
            self.chunks,
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if o.warmup_steps else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=max(s.total_steps, o.warmup_steps + 1),
            lr_decay_style=o.lr_schedule,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=max(s.total_steps, 1),
            wd_incr_style="constant",
        )
        self.ps = ps
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.optimizer_steps = 0
        self.consecutive_skips = 0  # non-finite updates in a row (saved in checkpoints)
        # where the model lives: micro-batches and metric tensors go here (NCCL reduces CUDA tensors only)
        self.device = next(unwrap(self.chunks[0]).parameters()).device
        # MoE models: each router takes the engine's experts (replay) and measures where its own differ
        self.routing = (
            None
            if spec.moe is None
            else RoutingReplay(
                self.chunks,
                replay=s.actor.routing_replay == "rollout",
                moe_layer_indices=spec.moe.moe_layers,
                tp_rank=self.tp_rank,
                tp_size=s.parallel.tp,
                sequence_parallel=s.parallel.sequence_parallel,
            )
        )
        # MoE models: load-balancing loss and expert load per step, summed over the ranks with other tokens or layers
        self.moe_stats = (
            None
            if spec.moe is None
            else MoEStats(
                self.chunks,
                spec.moe,
                [
                    self.dp_group,
                    self.tp_group if s.parallel.sequence_parallel else None,
                    ps.get_pipeline_model_parallel_group(),
                ],
                self.device,
            )
        )
        self.reference = None  # frozen initial weights on this layout, for kl='reference'
        if objective.kl == "reference":
            self.reference = ReferenceModel(
                spec,
                self.config,
                weights if reference is None else reference,
                fused_output_layer=s.actor.fused_output_layer,
                offload=s.actor.reference_offload,
            )

    # --- one RL step -------------------------------------------------------------------------

    @without_value_checks  # ids checked on the host once per batch (_check_rollouts): no syncs per call
    def train_step(self, rollouts: list[Rollout], step: int | None = None) -> dict:
        """Old log-probs, then `updates_per_batch` passes of one optimizer step per mini-batch.
        `step` (the RL step) only names where a non-finite update happened."""
        s = self.settings
        self._check_rollouts(rollouts, step)
        if s.use_engine_logprobs or self.objective.importance_correction != "none":
            # decided on the whole batch (the same on every rank), never inside one rank's micro-batch
            missing = [
                i
                for i, r in enumerate(rollouts)
                if r.engine_logprobs is None or len(r.engine_logprobs) != len(r.response_ids)
            ]
            if missing:
                why = (
                    "rollout.use_engine_logprobs"
                    if s.use_engine_logprobs
                    else f"algorithm.importance_correction={self.objective.importance_correction}"
                )
                raise ValueError(
                    f"step {step}: {why} needs the engine's log-prob of every response token; "
                    f"{len(missing)} of {len(rollouts)} rollouts lack them (e.g. rollout {missing[0]}, "
                    f"group {rollouts[missing[0]].group})"
                )
        if self.routing is not None:
            m = self.spec.moe
            check_routed_experts(
                rollouts,
                len(m.moe_layers),
                m.top_k,
                m.num_experts,
                step=step,
                required=s.actor.routing_replay == "rollout",
            )
            self.routing.start_measuring()
        timings = {}
        start = time.perf_counter()
        minis = build_mini_batches(
            rollouts,
            s.groups_per_mini_batch,
            s.actor.prompts_per_micro_batch,
            self.dp_size,
            self.dp_rank,
            pad_id=s.pad_id,
            pad_to_multiple=s.parallel.tp if s.parallel.sequence_parallel else 1,
            uniform_shape=s.parallel.pp > 1,
            packed=s.actor.pack_sequences,
            max_tokens=s.actor.max_tokens_per_micro_batch,
            cp_size=self.cp_size,
            cp_rank=self.cp_rank,
            same_shape_across_ranks=s.parallel.ep > 1 and s.moe_dispatcher == "allgather",
        )
        timings["batch_s"] = time.perf_counter() - start
        layout = {
            "micro_batches": sum(len(m.micro_batches) for m in minis),
            "padding_fraction": padding_fraction([mb for m in minis for mb in m.micro_batches]),
        }

        start = time.perf_counter()
        for mini in minis:
            if s.use_engine_logprobs:  # every rollout carries them (checked above)
                for mb in mini.micro_batches:
                    mb.old_logprobs = mb.engine_logprobs
            else:
                self.compute_old_logprobs(mini)
        timings["old_logprobs_s"] = time.perf_counter() - start
        routing = {}  # routing_mismatch_frac, measured where pi_old is made (else at the first update)
        if self.routing is not None and not s.use_engine_logprobs:
            routing = self.routing.take_mismatch(self.device)
        mismatch = None if s.use_engine_logprobs else self._mismatch_partials(minis)
        if self.reference is not None:  # log pi_ref: one more forward of the batch, frozen weights
            start = time.perf_counter()
            with self.reference.resident() as chunks:
                for mini in minis:
                    self.compute_logprobs(mini, "ref_logprobs", chunks)
            timings["ref_logprobs_s"] = time.perf_counter() - start

        start = time.perf_counter()
        records = []
        for update in range(s.updates_per_batch):
            for index, mini in enumerate(minis):
                where = (f"step {step}, " if step is not None else "") + (
                    f"update {update + 1} of {s.updates_per_batch}, mini-batch {index + 1} of {len(minis)}"
                )
                records.append(self._update(mini, where))
            if update == 0 and self.routing is not None and s.use_engine_logprobs:
                routing = self.routing.take_mismatch(self.device)
        timings["update_s"] = time.perf_counter() - start
        metrics = self._reduce_metrics(records, mismatch)
        self._check_first_update(metrics, step)
        metrics.update(rollout_stats(rollouts))
        metrics.update(routing)
        if self.moe_stats is not None:
            metrics.update(self.moe_stats.step_metrics())
        metrics.update(timings)
        metrics.update(layout)
        metrics.update(device_memory())
        tokens = sum(r.num_tokens for r in rollouts)
        metrics["tokens_per_s"] = (
            tokens * (1 + s.updates_per_batch) / max(1e-9, timings["old_logprobs_s"] + timings["update_s"])
        )
        return metrics

    def _check_rollouts(self, rollouts: list[Rollout], step: int | None) -> None:
        """Token ids in the vocabulary and REAL's labels 0/1, checked here on the host, once per
        batch: the kernels and the loss then skip their value checks, each a device sync per
        micro-batch on a GPU."""
        vocab = self.spec.vocab_size
        for index, r in enumerate(rollouts):
            # builtin min/max run in C: millions of ids per step cost milliseconds; the slow scan
            # that names the offending id runs only on failure
            ids = (r.prompt_ids, r.response_ids)
            if min(min(x, default=0) for x in ids) < 0 or max(max(x, default=0) for x in ids) >= vocab:
                bad = next(t for x in ids for t in x if not 0 <= t < vocab)
                raise ValueError(
                    f"step {step}: rollout {index} (group {r.group}) has token id {bad} outside the "
                    f"vocabulary [0, {vocab})"
                )
            if isinstance(self.objective, RealObjective) and r.reward not in (0.0, 1.0):
                raise ValueError(
                    f"step {step}: rollout {index} (group {r.group}) has reward {r.reward}; REAL's "
                    "objectives take 0/1 rewards as labels"
                )

    def compute_old_logprobs(self, mini: MiniBatch) -> None:
        """log pi_old of every response token, by a forward-only pass (kept on the last stage)."""
        self.compute_logprobs(mini, "old_logprobs", self.chunks)

    @torch.no_grad()
    def compute_logprobs(self, mini: MiniBatch, field: str, chunks: list) -> None:
        """Token log-probs of `chunks` (the actor's, or the reference's) into each micro-batch's `field`."""
        outputs = self._schedule(mini, forward_only=True, mode="logprobs", chunks=chunks)
        if self.is_last_stage:
            for mb, out in zip(mini.micro_batches, outputs):
                setattr(mb, field, out["logprobs"])

    def _mismatch_partials(self, minis: list[MiniBatch]) -> Optional[torch.Tensor]:
        """This rank's mismatch partials (see mismatch_partials) over every micro-batch carrying
        the engine's log-probs; None off the last stage or when no rollout carries them."""
        parts = [
            mismatch_partials(
                mb.old_logprobs,
                mb.engine_logprobs.to(mb.old_logprobs.device),
                self.settings.mismatch_threshold,
                None if mb.loss_mask is None else mb.loss_mask.to(mb.old_logprobs.device),
            )
            for mini in minis
            for mb in mini.micro_batches
            if self.is_last_stage and mb.engine_logprobs is not None and mb.old_logprobs is not None
        ]
        return torch.stack(parts) if parts else None

    def _check_first_update(self, metrics: dict, step: int | None) -> None:
        """At the first update pi_theta is pi_old, so every s̄ must be 0: warn if not."""
        value = metrics.get("first_update_score_abs_max")
        tolerance = FIRST_UPDATE_TOLERANCE.get(self.settings.dtype, 1e-4)
        if self.settings.use_engine_logprobs or value is None or not value > tolerance:
            return
        if is_rank0():
            log.warning(
                "step %s: at the first update max |s̄| = %.3g, above %.0e for %s: the training forward and "
                "the recomputation of pi_old disagree (nondeterministic kernels, dropout, or a layout bug)",
                step,
                value,
                tolerance,
                str(self.settings.dtype).replace("torch.", ""),
            )

    def _update(self, mini: MiniBatch, where: str = "") -> dict:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._schedule(mini, forward_only=False, mode="train")
        problem = self._non_finite(outputs)
        if problem:  # skip: no optimizer step, so weights, Adam moments and the lr schedule stay as they were
            self.consecutive_skips += 1
            if is_rank0():
                log.warning(
                    "%s: update skipped, %s; weights and optimizer state unchanged (%d in a row)",
                    where,
                    problem,
                    self.consecutive_skips,
                )
            if self.consecutive_skips >= self.settings.actor.max_consecutive_skips:
                raise NonFiniteUpdates(
                    f"{where}: {self.consecutive_skips} updates in a row skipped (actor.max_consecutive_skips="
                    f"{self.settings.actor.max_consecutive_skips}); the last had {problem}"
                )
            return {
                "records": outputs,
                "grad_norm": float("nan"),
                "lr": float(self.optimizer.param_groups[0]["lr"]),
                "skipped": 1.0,
            }
        self.consecutive_skips = 0
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
            self.optimizer_steps += 1
        # host numbers (the optimizer already reduced the norm): never stacked with device tensors
        return {
            "records": outputs,
            "grad_norm": float(grad_norm or 0.0),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "skipped": 0.0 if ok else 1.0,
        }

    def _non_finite(self, outputs: list[dict]) -> str:
        """What was NaN/inf in this update ("" if nothing): the loss (last stage) or any gradient
        (every rank's own; one norm per parameter, no [params]-sized temporaries). The same
        verdict on every rank: one all-reduce of two flags over the world."""
        loss = torch.stack([r["loss"] for r in outputs]).sum() if outputs else torch.zeros((), device=self.device)
        grads = [
            g
            for chunk in self.chunks
            for p in chunk.parameters()
            if (g := getattr(p, "main_grad", p.grad)) is not None and g.numel()
        ]
        grad_norm = (
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
            if grads
            else torch.zeros((), device=self.device)
        )
        flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm)]).float().to(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss, bad_grad = flags.tolist()
        parts = []
        if bad_loss:
            parts.append(f"a non-finite loss ({loss.item()})" if outputs else "a non-finite loss (on the last stage)")
        if bad_grad:
            parts.append(
                f"a non-finite gradient norm ({grad_norm.item()})"
                if not torch.isfinite(grad_norm)
                else "a non-finite gradient (on another rank)"
            )
        return " and ".join(parts)

    def _schedule(self, mini: MiniBatch, *, forward_only: bool, mode: str, chunks: list | None = None) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        counts = {
            "groups": mini.num_groups,
            "sequences": mini.num_sequences,
            "tokens": mini.num_tokens,
            "informative_sequences": mini.num_informative_sequences,
        }
        num_micro = len(mini.micro_batches)
        seq = max(mb.tokens.shape[1] for mb in mini.micro_batches) * self.cp_size  # megatron divides by CP
        mbs = max(mb.tokens.shape[0] for mb in mini.micro_batches)
        chunks = self.chunks if chunks is None else chunks
        vpp = len(chunks)
        iterators = [iter(mini.micro_batches) for _ in range(vpp)] if vpp > 1 else iter(mini.micro_batches)
        step = partial(self._forward_step, mode=mode, counts=counts, num_micro=num_micro)
        if self.routing is not None:
            self.routing.begin_pass()
        return get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iterators,
            model=chunks if vpp > 1 else chunks[0],
            num_microbatches=num_micro,
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )

    def _forward_step(self, data_iterator, model, *, mode: str, counts: dict, num_micro: int):
        mb = next(data_iterator).to(self.device)  # the one place a micro-batch leaves the host
        if self.routing is not None:  # this chunk's routers: the micro-batch's engine experts
            self.routing.feed(model, mb.routed_experts)
        # last stage: hidden states [b, s, h] (fused) or logits [b, s, V/tp]; packed rows are [1, T]
        output = model(
            mb.tokens,
            mb.position_ids,
            None,
            packed_seq_params=mb.packed_seq_params(),
            **moe_padding_mask(self.spec, self.config, mb),
        )
        return output, partial(self._loss, unwrap(model), mb, mode, counts, num_micro)

    def _token_logprobs(self, model, mb, output: torch.Tensor):
        temperature = self.settings.logprob_temperature
        if self.settings.actor.fused_output_layer:
            return fused_token_logprobs(
                model,
                output,
                mb,
                vocab_size=self.spec.vocab_size,
                tp_group=self.tp_group,
                sequence_parallel=self.settings.parallel.sequence_parallel,
                temperature=temperature,
            )
        return logits_token_logprobs(
            output,
            mb,
            vocab_size=self.spec.vocab_size,
            tp_group=self.tp_group,
            tp_rank=self.tp_rank,
            temperature=temperature,
        )

    def _loss(self, model, mb, mode: str, counts: dict, num_micro: int, output: torch.Tensor):
        logprobs, entropy = self._token_logprobs(model, mb, output)
        if self.cp_size > 1:  # every CP rank's scored tokens, in the micro-batch's order (megatron scales by CP)
            logprobs, entropy = full_token_values(mb, self.cp_group, self.cp_rank, logprobs, entropy)
        if mode == "logprobs":
            return logprobs.sum() * 0.0, {"logprobs": logprobs.detach()}
        n_seq = mb.rewards.numel()
        batch = PolicyBatch(
            logprobs=logprobs,
            old_logprobs=mb.old_logprobs,
            loss_mask=torch.ones_like(logprobs, dtype=torch.bool) if mb.loss_mask is None else mb.loss_mask,
            seq_index=mb.seq_index,
            rewards=mb.rewards,
            group_ids=mb.group_index,
            ref_logprobs=mb.ref_logprobs,
            advantages=mb.advantages,
            num_groups=mb.num_groups,
            engine_logprobs=mb.engine_logprobs,
            active=mb.active,
        )
        terms = self.objective(batch, dp_group=self.dp_group)
        loss = normalise(terms, counts)
        # megatron divides by the micro-batch count and DDP averages over DP: undo both (see top)
        scaled = loss * (num_micro * self.dp_size)
        with torch.no_grad():
            scores = sequence_scores(logprobs, mb.old_logprobs, batch.loss_mask, mb.seq_index, n_seq)
            pos = mb.rewards > 0.5
            # every entry a tensor on the actor's device, computed without a host sync
            inf = torch.full((1,), float("inf"), device=scores.device, dtype=scores.dtype)
            # the KL term is a local sum (unlike REAL's full-batch value): kept apart for the loss record
            kl_loss, kl_sum, kl_tokens = self._kl_record(batch, counts)

            def extreme(mask, reduce, empty):  # min/max over the masked scores; `empty` if none
                return reduce(torch.cat([scores.where(mask, empty), empty]))

            record = {
                # REAL's value is the full mini-batch value on every DP rank; the baselines' are local
                "loss": (
                    (loss.detach() - kl_loss) / self.dp_size + kl_loss
                    if isinstance(self.objective, RealObjective)
                    else loss.detach()
                ),
                "kl_sum": kl_sum,
                "kl_tokens": kl_tokens,
                # over the model's tokens only (multi-turn: not the tokens between its turns)
                "entropy_sum": entropy.sum() if mb.loss_mask is None else entropy.where(mb.loss_mask, 0.0).sum(),
                "tokens": torch.full((), float(logprobs.numel()), device=scores.device)
                if mb.loss_mask is None
                else mb.loss_mask.sum().float(),
                "score_pos_sum": scores.where(pos, 0.0).sum(),
                "score_pos_n": pos.sum().float(),
                "score_neg_sum": scores.where(~pos, 0.0).sum(),
                "score_neg_n": (~pos).sum().float(),
                "score_pos_min": extreme(pos, torch.min, inf),
                "score_pos_max": extreme(pos, torch.max, -inf),
                "score_neg_min": extreme(~pos, torch.min, inf),
                "score_neg_max": extreme(~pos, torch.max, -inf),
                "score_abs_max": scores.abs().amax()
                if n_seq
                else torch.zeros((), device=scores.device, dtype=scores.dtype),
            }
        return scaled, record

    def _kl_record(self, batch: PolicyBatch, counts: dict):
        """(the KL term of this micro-batch's loss, k3 summed over its tokens in the loss, their
        count): zeros without a KL term. k3 per token against the KL target, pi_ref or pi_old."""
        zero = torch.zeros((), device=batch.logprobs.device)
        if self.objective.kl == "none":
            return zero, zero, zero
        inside = batch.in_loss()
        target = inside.old_logprobs if self.objective.kl == "old" else inside.ref_logprobs
        mask = inside.loss_mask.to(batch.logprobs.dtype)
        kl_loss = normalise(self.objective.kl_terms(inside), counts)
        return kl_loss.detach(), (k3_kl(inside.logprobs.detach(), target) * mask).sum(), mask.sum()

    def _metric_tensors(
        self, records: list[dict], first: list[dict], mismatch: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sums, mins, maxs) of micro-batch records by step_metrics' tables, on the actor's device,
        reduced over DP; the first update's records and the mismatch partials ride along."""
        sums, mins, maxs = step_metrics.metric_tensors(records, first, mismatch, self.device)
        if self.dp_size > 1:
            step_metrics.all_reduce(sums, mins, maxs, self.dp_group)
        return sums, mins, maxs

    def _reduce_metrics(self, updates: list[dict], mismatch: Optional[torch.Tensor] = None) -> dict:
        """Sum micro-batch records over mini-batches and DP ranks, on the last stage, then share."""
        flat = [r for u in updates for r in u["records"]]
        out = {}
        if self.is_last_stage and flat:
            values = step_metrics.named(*self._metric_tensors(flat, updates[0]["records"], mismatch))
            out = step_metrics.report(values, updates, kl=self.objective.kl != "none")
        # every rank returns the same dict: broadcast from the last stage's first rank
        holder = [out]
        if dist.is_initialized() and dist.get_world_size() > 1:
            pp = self.ps.get_pipeline_model_parallel_world_size()
            dist.broadcast_object_list(holder, src=stage_first_rank(pp - 1, pp), device=self.device)
        return holder[0]

    # --- weights out ---------------------------------------------------------------------------

    def hf_tensors(self):
        """HF-named full tensors of this rank's pipeline stage (see weights.iter_hf_tensors)."""
        return iter_hf_tensors(self.chunks, self.spec)

    def gather_hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All parameters as full HF tensors on global rank 0 (None elsewhere); small models only."""
        mine = {k: v.clone() for k, v in self.hf_tensors()}
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return mine
        keep = self.dp_rank == 0 and self.tp_rank == 0 and self.cp_rank == 0  # one copy per pipeline stage
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine if keep else {}, parts, dst=0)
        if dist.get_rank() != 0:
            return None
        merged = {}
        for part in parts:
            merged.update(part)
        return merged
