"""REAL training, Algorithm 1: generate -> verify -> update the actor -> sync weights -> evaluate.

    for step:
        prompts  <- next P prompts of the (resumable, shuffled) dataset
        rollouts <- G samples per prompt from the engine (embedded, or the SGLang fleet)
        labels   <- verifier(rollout, ground truth) in {0, 1}
        actor.train_step(rollouts): old log-probs, then REAL over group-aligned micro-batches
        engine   <- actor's new weights (streaming export)
        log metrics; evaluate and checkpoint every so often

Everything a run leaves is in its output directory: config.yaml, metrics.jsonl, TensorBoard events,
checkpoints/, final_hf/, summary.json and curves.png.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .config import Config, save_config
from .kill_points import kill_point
from .rank0_phases import on_rank0
from .rollout.collect import collect_rollouts, keep_data_position, sampling_seed

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    model_dir: Path  # HF checkpoint the actor starts from
    tokenizer: object
    train_set: object  # PromptDataset
    eval_sets: dict  # name -> PromptDataset
    reward_fn: Callable
    stop_ids: tuple


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0




def prepare_inputs(cfg: Config) -> Inputs:
    from transformers import AutoTokenizer

    from .data import PromptDataset
    from .rewards import load_reward_fn

    if cfg.task.name == "arithmetic":
        return _arithmetic_inputs(cfg)
    if not cfg.model.path:
        raise ValueError("model.path is required (an HF checkpoint directory) unless task.name is set")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    common = dict(max_prompt_tokens=cfg.data.max_prompt_tokens, prompt_key=cfg.data.prompt_key,
                  answer_key=cfg.data.answer_key, skip_malformed=cfg.data.skip_malformed)
    train_set = PromptDataset(cfg.data.train_files, tokenizer, seed=cfg.train.seed, shuffle=cfg.data.shuffle, **common)
    evals = {Path(f).stem: PromptDataset([f], tokenizer, shuffle=False, **common) for f in cfg.eval.files}
    stop = tuple(cfg.rollout.stop_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    return Inputs(Path(cfg.model.path), tokenizer, train_set, evals, load_reward_fn(cfg.data.reward_fn), stop)


def _arithmetic_inputs(cfg: Config) -> Inputs:
    from .data import PromptDataset
    from .tasks import arithmetic as task

    t = cfg.task
    model_config = dict(cfg.model.hf_config_overrides)
    root = task_root(cfg)
    train, held, dev = task.split(t.train_prompts, t.eval_prompts, seed=cfg.train.seed, max_operand=t.max_operand,
                                  n_dev=t.dev_prompts if t.warmstart_target is not None else 0)
    model_dir = root / "warmstart"
    def make_task_files():
        tokenizer = task.build_tokenizer(root / "tokenizer", [p + s for p, s, _ in train[:4000]], t.tokenizer_vocab)
        task.write_jsonl(root / "train.jsonl", train)
        task.write_jsonl(root / "heldout.jsonl", held)
        model_config.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        plan = task.WarmStartPlan(max_steps=t.warmstart_max_steps, batch=t.warmstart_batch, lr=t.warmstart_lr,
                                  target=tuple(t.warmstart_target) if t.warmstart_target is not None else None,
                                  check_every=t.warmstart_check_every, max_new_tokens=cfg.eval.max_new_tokens)
        record = task.warm_start(model_dir, model_config, tokenizer, train, dev, plan, seed=cfg.train.seed,
                                 progress=cfg.logging.progress_bar)
        if record.get("dev_pass1") is not None:
            log.info("warm-start: %d steps, dev pass@1 %.3f (target %s)", record["steps"], record["dev_pass1"],
                     record["target"])

    on_rank0("the task's warm-start", make_task_files, timeout_s=cfg.parallel.timeout_s, share=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set = PromptDataset([root / "train.jsonl"], tokenizer, seed=cfg.train.seed, max_prompt_tokens=10_000)
    held_set = PromptDataset([root / "heldout.jsonl"], tokenizer, shuffle=False, max_prompt_tokens=10_000)
    return Inputs(model_dir, tokenizer, train_set, {"heldout": held_set}, task.reward, (tokenizer.eos_token_id,))


def task_root(cfg: Config) -> Path:
    """Where a built-in task keeps its data, tokenizer and warm-start model (keyed by its settings)."""
    from .tasks import arithmetic as task

    t = cfg.task
    cache = Path(t.cache_dir or Path.home() / ".cache" / "real-megatron" / "tasks")
    key = task.settings_key(t.train_prompts, t.eval_prompts, t.dev_prompts, t.max_operand, t.tokenizer_vocab,
                            t.warmstart_target, t.warmstart_check_every, t.warmstart_max_steps, t.warmstart_batch,
                            t.warmstart_lr, cfg.eval.max_new_tokens, dict(cfg.model.hf_config_overrides), cfg.train.seed)
    return cache / f"arithmetic-{key}"


def initial_model_dir(cfg: Config) -> Path:
    """The HF checkpoint RL starts from: model.path, or the task's warm-start (made by the trainer)."""
    if cfg.task.name == "arithmetic":
        return task_root(cfg) / "warmstart"
    if not cfg.model.path:
        raise ValueError("model.path is required (an HF checkpoint directory) unless task.name is set")
    return Path(cfg.model.path)


def make_engine(cfg: Config, inputs: Inputs, run_dir: Path):
    from .rollout.local import LocalEngine

    if cfg.rollout.backend == "local":
        import transformers

        config = transformers.AutoConfig.from_pretrained(inputs.model_dir)
        return LocalEngine(config, pad_token_id=inputs.tokenizer.pad_token_id or 0, seed=cfg.train.seed)
    from .rollout.sglang_env import default_server_python
    from .rollout.sglang_fleet import SGLangFleet

    r = cfg.rollout
    urls = r.server_urls or None
    if r.server_registry:  # servers of another job step (slurm/train.sbatch) announce themselves here
        from .rollout.registry import wait_for_servers

        urls = wait_for_servers(r.server_registry, r.num_servers, r.health_timeout_s)
    return SGLangFleet(
        model_path=str(inputs.model_dir), urls=urls, num_servers=r.num_servers, server_tp=r.server_tp,
        host=r.server_host, base_port=r.server_base_port, server_python=r.server_python or default_server_python(),
        server_args=r.server_args, log_dir=run_dir / "logs", health_timeout_s=r.health_timeout_s,
        request_timeout_s=r.request_timeout_s, max_requests_per_server=r.max_requests_per_server,
        gpus=None if urls else launched_server_gpus(cfg),
    )


def launched_server_gpus(cfg: Config, environ: dict | None = None) -> list[str] | None:
    """GPUs for the servers this trainer launches: rollout.server_gpus, else this node's GPUs after
    the trainer ranks' (local rank i uses GPU i). None on a machine without GPUs."""
    from .rollout.sglang_fleet import visible_gpus

    visible = visible_gpus(environ)
    if not visible:
        return None
    if cfg.rollout.server_gpus:
        unknown = [g for g in cfg.rollout.server_gpus if g >= len(visible)]
        if unknown:
            raise ValueError(f"rollout.server_gpus names GPU(s) {unknown}; this process sees {len(visible)}")
        return [visible[g] for g in cfg.rollout.server_gpus]
    return visible[cfg.parallel.gpus_per_node:]


def make_broadcaster(cfg: Config, engine):
    """rollout.weight_sync: distributed -> the broadcast group to the fleet (on rank 0)."""
    import os

    from .rollout.broadcast_sync import BroadcastWeightSync

    r = cfg.rollout
    if r.backend != "sglang" or r.weight_sync != "distributed" or not _rank0():
        return None
    address = r.weight_sync_address or os.environ.get("MASTER_ADDR", "127.0.0.1")
    return BroadcastWeightSync(engine, address=address, bucket_bytes=r.weight_sync_bucket_mb * 2**20,
                               timeout_s=cfg.parallel.timeout_s)


def sync_weights(actor, engine, run_dir: Path, version: int, model_dir: Path, cfg: Config, broadcaster=None) -> float:
    from .convert.convert import iter_whole_model
    from .rollout.weight_sync import sync_to_fleet_from_disk

    start = time.perf_counter()
    if cfg.rollout.backend == "local":  # the config decides: ranks > 0 hold no engine
        state = actor.gather_hf_state_dict()  # the full model on rank 0 (small models only)
        if _rank0():
            engine.update_weights(state.items(), version)
    elif cfg.rollout.weight_sync == "distributed":
        tensors = iter_whole_model(actor.chunks, actor.spec)  # a collective: every rank drains it
        if broadcaster is not None:
            broadcaster.push(tensors, version, actor.settings.dtype)
        else:
            for _ in tensors:
                pass
    else:
        sync_to_fleet_from_disk(actor, engine, run_dir / "weights", version, model_dir, cfg.parallel.timeout_s)
    return time.perf_counter() - start


def evaluate(engine, inputs: Inputs, cfg: Config, step: int) -> dict:
    """Held-out pass@1 (k samples per problem), per eval set and pooled, with its standard error."""
    from .evaluation import evaluate_sets
    from .rollout.types import SamplingParams

    params = SamplingParams(temperature=cfg.eval.temperature, top_p=1.0, max_new_tokens=cfg.eval.max_new_tokens,
                            stop_token_ids=inputs.stop_ids, seed=sampling_seed(cfg.train.seed, "evaluation", step))
    sets = {name: dataset.examples for name, dataset in inputs.eval_sets.items()}
    start = time.perf_counter()
    result = evaluate_sets(engine, inputs.tokenizer, sets, inputs.reward_fn, cfg.eval.k, params)
    return dict(result, eval_s=time.perf_counter() - start)


def train(cfg: Config) -> dict:
    from .actor.actor import Actor, ActorSettings
    from .actor.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
    from .actor.distributed import init_distributed, shutdown
    from .actor.model import ArchSpec
    from .convert.hf_io import HFCheckpointReader
    from .metrics import MetricsLogger, plot_curves
    from .objectives import objective_from_config
    from .preemption import PreemptionGuard

    p, t, r = cfg.parallel, cfg.train, cfg.rollout
    init_distributed(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, timeout_s=p.timeout_s,
                     expected_world_size=p.world_size, seed=t.seed)
    run_dir = Path(t.output_dir)
    ckpt_root = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    if _rank0():
        save_config(cfg, run_dir / "config.yaml")
    started = time.time()

    inputs = prepare_inputs(cfg)
    spec = ArchSpec.from_pretrained(inputs.model_dir)
    dtype = getattr(torch, cfg.model.dtype)
    micro_groups = t.prompts_per_micro_batch
    settings = ActorSettings(
        tp=p.tp, pp=p.pp, vpp=p.vpp, sequence_parallel=p.sequence_parallel, dtype=dtype, optim=cfg.optim,
        total_steps=t.steps * (t.prompts_per_step // t.prompts_per_mini_batch) * cfg.algorithm.updates_per_batch,
        groups_per_mini_batch=t.prompts_per_mini_batch,
        groups_per_micro_batch=micro_groups, max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
        pack_sequences=t.pack_sequences, fused_output_layer=t.fused_output_layer,
        updates_per_batch=cfg.algorithm.updates_per_batch,
        use_engine_logprobs=r.use_engine_logprobs, recompute_activations=cfg.model.recompute_activations,
        pad_id=inputs.tokenizer.pad_token_id or 0, max_consecutive_skips=t.max_consecutive_skips,
        logprob_temperature=r.temperature if r.temperature > 0 else 1.0, mismatch_threshold=cfg.algorithm.mismatch_threshold,
    )
    actor = Actor(spec, settings, objective_from_config(cfg.algorithm), HFCheckpointReader(inputs.model_dir, spec).get)
    timeout_s = p.timeout_s
    engine = on_rank0("starting the rollout engine", lambda: make_engine(cfg, inputs, run_dir), timeout_s=timeout_s,
                      share=False)

    start_step, history = 0, {}
    resume = None if cfg.checkpoint.resume == "none" else (
        latest_checkpoint(ckpt_root) if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume))
    if resume is not None:
        state = load_checkpoint(actor, resume)
        start_step = state["step"]
        inputs.train_set.load_state_dict(state["data"])
        history = state.get("history", {})
        if _rank0():
            log.info("resumed from %s at step %d", resume, start_step)
    # a fresh start (no checkpoint yet, even after a crash) replaces what an earlier attempt logged
    logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard,
                           resume_step=start_step if resume is not None else -1) if _rank0() else None
    guard = PreemptionGuard()
    broadcaster = make_broadcaster(cfg, engine)
    sync_weights(actor, engine, run_dir, start_step, inputs.model_dir, cfg, broadcaster)

    if "baseline" not in history:
        history["baseline"] = on_rank0("baseline evaluation", lambda: evaluate(engine, inputs, cfg, 0), timeout_s=timeout_s)
        if logger:
            logger.log(start_step, {"val_pass1": history["baseline"]["pass1"], "eval_s": history["baseline"]["eval_s"]})
    bar = _progress(cfg, start_step)
    for step in range(start_step, t.steps):
        step_start = time.perf_counter()
        # prompts -> G samples each -> labels; with dynamic sampling, rounds until the groups are informative
        rollouts, rollout_metrics = on_rank0(
            f"rollouts of step {step + 1}", lambda: collect_rollouts(engine, inputs, cfg, step + 1), timeout_s=timeout_s)
        if not _rank0():
            keep_data_position(inputs.train_set, rollout_metrics, t.prompts_per_step)
        kill_point("after_rollouts", step + 1)
        metrics = actor.train_step(rollouts, step=step + 1)
        kill_point("after_update", step + 1)
        metrics.update(rollout_metrics)
        metrics["sync_s"] = sync_weights(actor, engine, run_dir, step + 1, inputs.model_dir, cfg, broadcaster)
        metrics["step_s"] = time.perf_counter() - step_start  # one rollout batch, evaluation excluded
        if cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0 and step + 1 < t.steps:
            result = on_rank0(f"evaluation after step {step + 1}", lambda: evaluate(engine, inputs, cfg, step + 1),
                              timeout_s=timeout_s)
            metrics["val_pass1"] = result["pass1"]
        if logger:
            logger.log(step + 1, metrics)
        kill_point("after_log", step + 1)
        if bar is not None:
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.3f}")  # this step's
            bar.update(1)
        stopping = guard.should_stop()  # a cluster signal on any rank: all stop after this step
        if stopping or (cfg.checkpoint.every_steps and (step + 1) % cfg.checkpoint.every_steps == 0):
            save_checkpoint(actor, ckpt_root / f"step_{step + 1:06d}",
                            {"step": step + 1, "data": inputs.train_set.state_dict(), "history": history},
                            cfg.checkpoint.optimizer_format)
            prune_checkpoints(ckpt_root, cfg.checkpoint.keep_last)
        if stopping and step + 1 < t.steps:
            if _rank0():
                log.warning("stopped at step %d with a checkpoint in %s, for a requeue", step + 1, ckpt_root)
            _close(bar, logger, engine, broadcaster)
            shutdown()
            return {"preempted_at": step + 1}
    if bar is not None:
        bar.close()

    final = on_rank0("final evaluation", lambda: evaluate(engine, inputs, cfg, t.steps), timeout_s=timeout_s)
    if cfg.checkpoint.save_hf_final:
        from .convert.convert import write_hf_checkpoint

        write_hf_checkpoint(actor.chunks, spec, run_dir / "final_hf", inputs.model_dir, dtype)
    summary = {
        "baseline_pass1": history["baseline"]["pass1"], "final_pass1": final["pass1"],
        "gain": final["pass1"] - history["baseline"]["pass1"], "eval_samples": final["samples"],
        "eval_problems": final["problems"], "stderr": final["stderr"], "baseline_stderr": history["baseline"]["stderr"],
        "steps": t.steps, "algorithm": cfg.algorithm.name, "seconds": time.time() - started,
        # per eval file, as Table 1 reports it
        "baseline_benchmarks": {n: b["pass1"] for n, b in history["baseline"].get("benchmarks", {}).items()},
        "final_benchmarks": {n: b["pass1"] for n, b in final["benchmarks"].items()},
        "warmstart": _warmstart_record(cfg, inputs),
    }
    if _rank0():
        logger.log(t.steps, {"val_pass1": final["pass1"]})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _close(None, logger, engine, broadcaster)
    if _rank0() and cfg.logging.plot:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title=f"{cfg.algorithm.name} on {run_dir.name}")
    shutdown()
    guard.restore()
    return summary


def _warmstart_record(cfg: Config, inputs: Inputs) -> dict | None:
    """What a built-in task's warm-start did (steps, dev pass@1), for the summary."""
    record = inputs.model_dir / "warmstart.json"
    return json.loads(record.read_text()) if cfg.task.name and record.exists() else None


def _close(bar, logger, engine, broadcaster=None) -> None:
    if broadcaster is not None:
        broadcaster.close()
    if bar is not None:
        bar.close()
    if logger is not None:
        logger.close()
    if hasattr(engine, "stop"):
        engine.stop()  # only servers this process launched; attached ones keep running


def _progress(cfg: Config, start: int):
    if not (cfg.logging.progress_bar and _rank0()):
        return None
    from .progress import progress

    return progress(total=cfg.train.steps, initial=start, desc=f"{cfg.algorithm.name} RL", unit="step")
