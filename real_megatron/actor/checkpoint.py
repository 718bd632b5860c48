"""Actor checkpoints: megatron dist_checkpointing for model + optimizer, plus trainer state.

Layout of one checkpoint directory (written as `<name>.tmp`, renamed when complete, so a crash
never leaves a half checkpoint under the real name):
    <dist_checkpointing files>      model and optimizer, sharded (reshardable over TP/PP/DP)
    trainer_state.json              step, data position, rollout state, lr scheduler (rank 0)
    rng/rank00000.pt ...            every rank's RNG states
    parameter_order/stage0.json ... each pipeline stage's parameter order (checked when the
                                    optimizer state is dp_reshardable)
A checkpoint saved under one layout loads under another (dist_checkpointing reshards).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
from pathlib import Path

import torch

from ..kill_points import kill_point
from ..ranks import barrier, global_rank, world_size
from .model_state import load_model_state, model_sharded_state_dict
from .weights import unwrap

STATE_FILE = "trainer_state.json"
# Model weights always reshard freely (dist_checkpointing). The distributed optimizer's state
# (checkpoint.optimizer_format):
#   fully_reshardable (default): per parameter under the model's checkpoint keys; loads under any
#     TP/PP/DP and either layer spec, whatever order the spec registers its parameters in. Costs
#     host memory: at save each DP group's state is gathered on its first rank ("mem_efficient",
#     over gloo), at load every rank reads its model-parallel shard's whole state (12 bytes per
#     parameter of the shard) before keeping its own part.
#   dp_reshardable: each rank writes and reads its own flat shard (cheap), laid out in the order
#     the model registers its parameters: loads only into a model with the same parameter order
#     (checked, see parameter_order).
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
_OLD_CHECKPOINTS_FORMAT = "dp_reshardable"  # written before the format was recorded


def _optimizer_metadata(optimizer_format: str) -> dict:
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer format must be one of {OPTIMIZER_FORMATS}, got {optimizer_format!r}")
    return {
        "distrib_optim_sharding_type": optimizer_format,
        "distrib_optim_fully_reshardable_mem_efficient": optimizer_format == "fully_reshardable",
    }


def parameter_order(actor) -> list[str]:
    """Every parameter of this rank's chunks, in registration order, by checkpoint key and offset:
    the order a DP-reshardable optimizer state is laid out in. The same on every TP and DP rank of
    a pipeline stage; stages differ, so each stage's is saved (ORDER_DIR/stage<k>.json)."""
    order = []
    for chunk in actor.chunks:
        model = unwrap(chunk)
        sharded = model.sharded_state_dict()
        for name, _ in model.named_parameters():
            entry = sharded.get(name)
            offset = getattr(entry, "global_offset", None) or getattr(getattr(entry, "data", None), "shape", "")
            order.append(f"{entry.key}@{tuple(offset)}" if entry is not None else name)
    return order


_STEP_DIR = re.compile(r"^step_(\d+)$")
ORDER_DIR = "parameter_order"


def _order_file(directory: Path) -> Path:
    from megatron.core import parallel_state as ps

    return directory / ORDER_DIR / f"stage{ps.get_pipeline_model_parallel_rank()}.json"


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh DistributedOptimizer its Adam state tensors before loading into them.

    torch's Adam creates its state at the first step, and DistributedOptimizer.state_dict() needs
    it (with Apex/TE's FusedAdam it exists from the start). A step with zero gradients creates it;
    every value it touches (params, moments, step) is overwritten by the checkpoint right after.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(opt).__name__ != "DistributedOptimizer" or inner is None or inner.state:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if param.numel():
                    param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad()


def _restore_adam_steps(optimizer) -> None:
    """Put the saved Adam step back into every parameter's state (torch-Adam path).

    DistributedOptimizer keeps torch Adam's per-parameter 'step' as one number in the param
    groups; on load (megatron-core 0.16) the per-parameter tensors keep the dummy step of
    `_materialise_optimizer_state` instead, or all share one tensor, which torch's Adam would then
    advance once per parameter. Each parameter gets its own tensor holding the saved step.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state is not None and torch.is_tensor(state.get("step")):  # torch Adam only (not TE/Apex)
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


def _let_adam_step_be_absent(optimizer) -> None:
    """megatron-core's fully_reshardable loader copies every state entry of a parameter, and
    without Apex/TE that includes torch Adam's 'step', which the checkpoint keeps in the param
    groups instead: let the step keep its value (`_restore_adam_steps` sets it afterwards)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or getattr(setter, "keeps_step", False):
            continue

        def keep_step(model_param, tensors, opt=opt, setter=setter):
            if "step" not in tensors:
                group, order = opt.model_param_group_index_map[model_param]
                step = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]].get("step")
                if step is not None:
                    tensors = dict(tensors, step=step)
            return setter(model_param, tensors)

        keep_step.keeps_step = True
        opt._set_main_param_and_optimizer_states = keep_step


def _sharded_state_dict(actor, is_loading: bool = False, optimizer_format: str = OPTIMIZER_FORMATS[0]) -> dict:
    state = model_sharded_state_dict(actor.chunks)
    kwargs = {"is_loading": is_loading}
    if actor.settings.optim.use_distributed_optimizer:
        kwargs["metadata"] = _optimizer_metadata(optimizer_format)
    state["optimizer"] = actor.optimizer.sharded_state_dict(state, **kwargs)
    return state


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


def _write_results_in_process() -> None:
    """megatron-core hands a save's write results back through a queue served by a spawned
    multiprocessing Manager, made at the first save and kept: a trainer killed with SIGKILL leaves
    that server behind, orphaned, holding the trainer's stdout and its memory. Saves here are
    synchronous (results put and taken in this process), so an in-process queue serves and no
    server is spawned. (Versions without that module-level queue are left as they are.)"""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(
    actor, directory: str | os.PathLike, trainer_state: dict, optimizer_format: str = OPTIMIZER_FORMATS[0]
) -> Path:
    """Write model, optimizer, scheduler, RNG and `trainer_state` atomically to `directory`.

    Killed at any moment, this leaves either no `directory` or a complete one: everything goes to
    `<name>.tmp`, the state file (what makes a checkpoint count) last, then one rename. A directory
    of the same name (a run resumed and saving the same step again) is first renamed aside."""
    from megatron.core import dist_checkpointing

    final = Path(directory)
    step = trainer_state.get("step", -1)
    tmp = final.with_name(final.name + ".tmp")
    if global_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # empty: dist_checkpointing treats leftovers as a corrupt checkpoint
    barrier()
    _write_results_in_process()
    dist_checkpointing.save(_sharded_state_dict(actor, optimizer_format=optimizer_format), str(tmp))
    kill_point("checkpoint_shards", step)
    if global_rank() == 0:
        (tmp / "rng").mkdir()
        (tmp / ORDER_DIR).mkdir()
    barrier()
    torch.save(_rng_state(), tmp / "rng" / f"rank{global_rank():05d}.pt")
    if actor.dp_rank == 0 and actor.tp_rank == 0 and getattr(actor, "cp_rank", 0) == 0:  # one writer per pipeline stage
        _order_file(tmp).write_text(json.dumps(parameter_order(actor)))
    if global_rank() == 0:
        state = dict(
            trainer_state,
            scheduler=actor.scheduler.state_dict(),
            optimizer_steps=actor.optimizer_steps,
            consecutive_skips=getattr(actor, "consecutive_skips", 0),
            optimizer_format=optimizer_format,
            world_size=world_size(),
        )
        (tmp / f"{STATE_FILE}.partial").write_text(json.dumps(state, indent=1))
        os.replace(tmp / f"{STATE_FILE}.partial", tmp / STATE_FILE)  # never a half-written state file
    kill_point("checkpoint_state", step)
    barrier()
    if global_rank() == 0:
        aside = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        kill_point("checkpoint_swap", step)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(actor, directory: str | os.PathLike) -> dict:
    """Restore everything `save_checkpoint` wrote; return the trainer state."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    state_file = directory / STATE_FILE
    if not state_file.exists():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {STATE_FILE})")
    trainer_state = json.loads(state_file.read_text())
    optimizer_format = trainer_state.pop("optimizer_format", _OLD_CHECKPOINTS_FORMAT)
    order_file = _order_file(directory)
    if (
        optimizer_format == "dp_reshardable"
        and order_file.exists()
        and json.loads(order_file.read_text()) != parameter_order(actor)
    ):
        raise RuntimeError(
            f"{directory}: its optimizer state is in the dp_reshardable format, flat buffers in the parameter order "
            "of the model that wrote it, and this model orders its parameters differently (another layer spec: "
            "Transformer Engine vs local?). Resume with the spec that wrote it, or write checkpoints with "
            "checkpoint.optimizer_format=fully_reshardable (any spec, any layout)"
        )
    _materialise_optimizer_state(actor.optimizer)
    loaded = dist_checkpointing.load(
        _sharded_state_dict(actor, is_loading=True, optimizer_format=optimizer_format), str(directory)
    )
    load_model_state(actor.chunks, loaded)
    _let_adam_step_be_absent(actor.optimizer)
    with torch.no_grad():  # fp32 main params are views of the (leaf) model params
        actor.optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(actor.optimizer)
    actor.scheduler.load_state_dict(trainer_state.pop("scheduler"))
    actor.optimizer_steps = trainer_state.pop("optimizer_steps")
    actor.consecutive_skips = trainer_state.pop("consecutive_skips", 0)
    rng_file = directory / "rng" / f"rank{global_rank():05d}.pt"
    if rng_file.exists() and trainer_state.get("world_size") == world_size():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under root, oldest first (step_000123 directories with a state file)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (rank 0 deletes). Each goes by a rename first, so a
    kill mid-deletion never leaves a half-deleted directory that still looks complete; leftovers
    of interrupted saves and deletions (*.tmp, *.old, *.deleting) go too."""
    if global_rank() != 0:
        return
    root = Path(root)
    doomed = (
        [p for p in root.iterdir() if p.suffix in (".tmp", ".old", ".deleting") and _STEP_DIR.match(p.stem)]
        if root.is_dir()
        else []
    )
    if keep_last > 0:
        for old in checkpoint_dirs(root)[:-keep_last]:
            aside = old.with_name(old.name + ".deleting")
            os.replace(old, aside)
            doomed.append(aside)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
