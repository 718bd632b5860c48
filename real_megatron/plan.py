"""What a run will meet before any GPU is used: the one check behind `train --dry-run` and
`launch-plan` (the first thing slurm/train.sbatch runs), so a launcher never starts a layout its
own dry run refuses.

`check_run(cfg)` returns the report the dry run prints and the problems that stop a run, the
dominant cause first: where the processes go (GPUs per node), how megatron-core cuts the model
(heads, KV heads, MLP, layers by pp x vpp, experts by ep: memory.split_problems, refused
with the config itself, config.py), memory
per trainer GPU and per server GPU, then what the run reads (checkpoint.resume, the reward
function, the data files' columns and first rows). Torch is not imported.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .parallel_layout import describe_nodes

DATA_ROWS_CHECKED = 5  # first rows of each data file read by the dry run


@dataclass
class RunCheck:
    report: list[str] = field(default_factory=list)  # '# ...' lines for the dry run
    problems: list[str] = field(default_factory=list)  # what stops the run, dominant first
    warnings: list[str] = field(default_factory=list)  # what the user should know, not fatal


def architecture(cfg):
    """(Architecture or None, where it came from, warnings): model.path's config.json when it is on
    this machine (the overrides a real checkpoint ignores are named), else model.hf_config_overrides."""
    from .hub import hub_config_json, is_hub_id
    from .memory import Architecture, architecture_of

    m, warnings = cfg.model, []
    config_json = Path(m.path) / "config.json" if m.path else None
    source = str(config_json)
    hub_id = bool(m.path) and not cfg.task.name and is_hub_id(m.path)
    if hub_id:  # config.json alone (no weights): from the cache, or fetched
        config_json, source = hub_config_json(m.path, fetch=True)
        if config_json is None:
            warnings.append(
                f"model.path {m.path} is read as a Hugging Face Hub id; its architecture is unknown here: {source}"
            )
    if config_json is not None and config_json.exists():
        hf = json.loads(config_json.read_text())
        ignored = {k: v for k, v in m.hf_config_overrides.items() if hf.get(k) != v}
        if ignored:
            shown = ", ".join(f"{k}={v!r} (checkpoint: {hf.get(k, 'absent')!r})" for k, v in ignored.items())
            warnings.append(
                f"model.hf_config_overrides are ignored: the checkpoint {config_json} is authoritative for the "
                f"architecture: {shown}; `model.hf_config_overrides=null` clears inherited ones"
            )
        return Architecture.from_hf(hf), source, warnings
    arch = architecture_of(cfg)
    if arch is None:
        return None, "unknown", warnings
    where = "model.hf_config_overrides"
    if m.path and not cfg.task.name and not hub_id:
        where += (
            f" (model.path {m.path} is not on this machine; if it is another model than these numbers describe, "
            "give its numbers, or `model.hf_config_overrides=null`)"
        )
    return arch, where, warnings


def _memory(cfg, arch, check: RunCheck) -> None:
    from .memory import estimate_memory, optimizer_format, server_memory

    capacity = cfg.parallel.gpu_memory_gb
    estimate = estimate_memory(cfg, arch, capacity)
    chosen, why = optimizer_format(cfg, arch)
    check.report += [
        f"# memory per trainer GPU (estimate, {capacity:.0f} GB GPUs)",
        estimate.describe(),
        f"# checkpoints: optimizer state {chosen} ({why})",
    ]
    if cfg.rollout.colocate:  # the phases take turns on each GPU: each must fit, not their sum
        from .memory import colocated_plan

        rows, problems = colocated_plan(cfg, arch, estimate)
        check.report.append("# colocated, per phase (rollout.colocate)")
        check.report += [f"  {what:<32}  {gb:7.1f} GB  {how}" for what, gb, how in rows]
        check.problems += [f"the layout does not fit: {problem}" for problem in problems]
        return
    if not estimate.fits:
        check.problems.append(
            f"the layout does not fit: a trainer GPU needs about {estimate.total_gb:.0f} GB of {capacity:.0f} GB; {estimate.dominant()}"
        )
    if cfg.rollout.backend == "sglang":
        text, fits = server_memory(cfg, arch, capacity)
        check.report.append(text)
        if not fits:
            check.problems.append("the layout does not fit: an SGLang server GPU has no KV-cache room for one rollout")


def input_problems(cfg) -> list[str]:
    """What the run reads that cannot work: a checkpoint.resume path that is not there, a reward
    function that does not import. (`train` checks these too before any process group starts.)"""
    problems = []
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).exists():
        problems.append(
            f"checkpoint.resume={resume}: no such checkpoint (auto: the latest in train.output_dir, none: a fresh start)"
        )
    if not cfg.task.name:
        from .rewards import load_reward_fn

        try:
            load_reward_fn(cfg.data.reward_fn)
        except ValueError as exc:
            problems.append(f"data.reward_fn: {exc}")
    return problems


def data_problems(cfg, max_rows: int | None = DATA_ROWS_CHECKED) -> list[str]:
    """Each data file's columns and first max_rows rows (None: every row, as `train` checks them
    before any process group starts), read as the trainer reads them."""
    from .data.dataset import DataError, load_examples
    from .data.settings import DataConfig

    problems = []
    d = cfg.data
    if cfg.task.name:  # a task makes its own files
        return problems
    for key, paths in (("data.train_files", d.train_files), ("eval.files", cfg.eval.files)):
        for path in paths:
            if not Path(path).exists():
                continue  # listed as missing (prepare fetches it)
            try:
                load_examples(
                    path,
                    prompt_key=d.prompt_key,
                    answer_key=d.answer_key,
                    skip_malformed=d.skip_malformed,
                    math_truths=d.reward_fn == DataConfig.reward_fn,  # a function of one's own takes any truth
                    max_rows=max_rows,
                )
            except DataError as exc:
                problems.append(f"{key}: {exc} (data.prompt_key={d.prompt_key!r}, data.answer_key={d.answer_key!r})")
    return problems


def check_run(cfg, *, data: bool = True) -> RunCheck:
    check = RunCheck()
    nodes, problem = describe_nodes(cfg)
    check.report.append(f"# GPUs: {nodes}")
    if problem:
        check.problems.append(f"the layout does not fit: {problem}")
    arch, where, warnings = architecture(cfg)
    check.warnings += warnings
    if arch is None:
        check.report.append(
            "# memory per GPU: unknown (model.path has no config.json here and model.hf_config_overrides "
            "lacks the architecture)"
        )
    else:
        check.report.append(f"# architecture: from {where}")
        _memory(cfg, arch, check)  # (a split megatron-core refuses: refused with the config, config.py)
    if cfg.rollout.backend == "sglang" and cfg.rollout.weight_sync == "distributed":
        from .rollout.nccl_check import check_weight_sync_nccl, query_build, server_build

        # both asked in subprocesses (no torch here); the servers' even where the trainer has no NCCL
        compared, nccl_problem = check_weight_sync_nccl(cfg, query_build(sys.executable), server_build(cfg))
        check.report.append(f"# weight broadcast: {compared}")
        if nccl_problem:
            check.problems.insert(0, nccl_problem)
    check.problems += input_problems(cfg)
    if data:
        check.problems += data_problems(cfg)
    return check
