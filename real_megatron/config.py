"""One typed configuration tree: YAML in, `a.b=c` overrides, strict validation, YAML out.

Every section is a dataclass; `load_config` turns a YAML file plus command-line overrides into a
`Config`, rejecting unknown keys (with the closest valid key), wrong types (with the expected type
and the value) and impossible combinations (with the reason). `save_config` writes the resolved
tree beside a run so it can be reproduced with `real-megatron train run/config.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .actor.settings import ActorConfig, CheckpointConfig, ModelConfig, OptimConfig
from .data.settings import DataConfig
from .errors import UserError
from .evaluation import EvalConfig
from .objectives.settings import CLIP_RANGES, REAL_OBJECTIVES, AlgorithmConfig
from .rollout.settings import RolloutConfig

log = logging.getLogger(__name__)


class ConfigError(UserError):
    """A configuration that cannot be used; the message names the key and the source."""

    kind = "config error"
    keep_traceback = False  # found before anything runs: the line says it all


@dataclass
class ParallelConfig:
    nodes: int = 1
    gpus_per_node: int = 1  # trainer processes per node (CPU processes on a machine without GPU)
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: Optional[int] = None  # virtual pipeline stages per pipeline rank (interleaved schedule)
    cp: int = 1  # context parallel: each packed sequence split over cp ranks (docs/context_parallel.md)
    # mixture-of-experts models: experts spread over ep ranks (carved out of data parallelism, with
    # etp when it is below tp), each expert split etp ways (null: etp = tp)
    ep: int = 1
    etp: Optional[int] = None
    sequence_parallel: bool = False
    timeout_s: float = 600.0  # deadline of every collective
    gpu_memory_gb: float = 80.0  # per GPU, for the --dry-run memory estimate
    node_gpus: int = 8  # GPUs of one node: the trainer's and, with rollout.fleet_nodes=0, the servers' must fit

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        """Data-parallel size, derived: world / (tp * pp * cp)."""
        return self.world_size // (self.tp * self.pp * self.cp)


@dataclass
class TaskConfig:
    """A built-in synthetic task: its data, tokenizer and warm-start model are made offline."""

    # None: use data.* files and model.path; tool_products: a×b with the python tool (tool_products.py)
    name: Optional[Literal["arithmetic", "tool_products"]] = None
    train_prompts: int = 20000
    eval_prompts: int = 500
    max_operand: int = 55  # operands drawn from 1..max_operand (tool_products: b from 10..max_operand)
    tokenizer_vocab: int = 48
    # the supervised warm-start trains until sampled pass@1 on dev_prompts (disjoint from training
    # and held-out prompts) lies in warmstart_target, checked every warmstart_check_every steps
    # (a quarter of that near the band), at most warmstart_max_steps; target null: exactly
    # warmstart_max_steps steps
    dev_prompts: int = 200
    warmstart_target: Optional[list[float]] = field(default_factory=lambda: [0.55, 0.65])
    warmstart_check_every: int = 200
    warmstart_max_steps: int = 10000
    warmstart_batch: int = 64
    warmstart_lr: float = 3e-3
    cache_dir: Optional[str] = None  # default: ~/.cache/real-megatron/tasks


@dataclass
class TrainConfig:
    steps: int = 1000  # RL steps (rollout batches)
    prompts_per_step: int = 128  # global rollout batch, in prompts
    prompts_per_mini_batch: int = 32  # one optimizer step
    seed: int = 1
    output_dir: str = "runs/default"


@dataclass
class LoggingConfig:
    """metrics.jsonl is always written (a resume trims it to the checkpoint); these add to it."""

    tensorboard: bool = True
    plot: bool = True
    progress_bar: bool = True
    rollouts: bool = False  # rollouts.jsonl: every rollout trained on, with its prompt, version and label
    # the step metrics to Weights & Biases / MLflow too (their packages installed by hand; see metrics.py)
    wandb: bool = False
    mlflow: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Building the tree from plain data, strictly.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (dataclasses built)."""

    def bad() -> ConfigError:
        return ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key, source)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:  # `key: null` (or key=null on the command line) clears an inherited mapping
            return {}
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported annotation {tp!r} for key '{key}'")


def _unknown_key(cls: type, key: str, path: str, source: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{path + '.' if path else ''}{close[0]}'?" if close else ""
    return ConfigError(
        f"{source}: unknown key '{full}'{hint} (valid keys{' of ' + path if path else ''}: {', '.join(valid)})"
    )


def _build(cls: type, data: dict, path: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            raise _unknown_key(cls, str(key), path, source)
        full = f"{path}.{key}" if path else key
        kwargs[key] = _convert(value, hints[key], full, source)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Keys that moved to the section of their owner. The old name still works in files and overrides,
# and logs the new name once per process; a saved config.yaml carries the new names.

MOVED_KEYS = {
    "train.prompts_per_micro_batch": "actor.prompts_per_micro_batch",
    "train.max_tokens_per_micro_batch": "actor.max_tokens_per_micro_batch",
    "train.pack_sequences": "actor.pack_sequences",
    "train.fused_output_layer": "actor.fused_output_layer",
    "train.max_consecutive_skips": "actor.max_consecutive_skips",
    "train.reference_offload": "actor.reference_offload",
    "train.routing_replay": "actor.routing_replay",
}
_told: set[str] = set()  # old names already logged in this process


def _tell_moved(old: str) -> str:
    new = MOVED_KEYS[old]
    if old not in _told:
        _told.add(old)
        log.warning("config key %s is now %s; the old name still works", old, new)
    return new


def rename_moved_keys(data: dict, source: str) -> dict:
    """`data` (sections of plain values) with every moved key under its new name; both names at
    once is an error, since one would silently win."""
    for old in MOVED_KEYS:
        section, name = old.split(".")
        if not isinstance(data.get(section), dict) or name not in data[section]:
            continue
        new_section, new_name = _tell_moved(old).split(".")
        target = data.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # reported as a wrong type when the tree is built
        if new_name in target:
            raise ConfigError(
                f"{source}: '{old}' and '{MOVED_KEYS[old]}' are the same key (its old and new name); keep one"
            )
        target[new_name] = data[section].pop(name)
    return data


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(Config, rename_moved_keys(data, source), "", source)
    validate(cfg, source)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads 1e-6 as a float (YAML 1.1 insists on 1.0e-6), as users write it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# ---------------------------------------------------------------------------------------------
# Overrides: `a.b=c`, the value parsed as YAML (so 1e-6, true, [1,2] and null work).


def apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{override}': expected the form section.key=value")
    if key in MOVED_KEYS:  # after the files' keys were renamed: the override must reach the same key
        key = _tell_moved(key)
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{override}': value is not valid YAML ({exc})") from None
    parts = key.split(".")
    node = data
    cls: Any = Config
    for depth, part in enumerate(parts[:-1]):
        path = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_key(cls, part, path, f"override '{override}'")
        cls = typing.get_type_hints(cls)[part]
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{'.'.join(parts[: depth + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(
            f"{path}: the file is empty (a config names at least its base or one section, e.g. `base: quickstart.yaml`)"
        )
    return data


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_with_base(path: Path, chain: tuple = ()) -> dict:
    """A file may start from another: `base: other.yaml` (relative to it); its keys win."""
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'base' files form a cycle: {' -> '.join(map(str, chain + (path,)))}")
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    rename_moved_keys(data, str(path))  # each file by itself, so a base and its child may name a key differently
    if base is None:
        return data
    base_path = path.parent / str(base)
    if not base_path.exists():
        raise ConfigError(f"{path}: base file {base_path} does not exist")
    return _merge(_read_with_base(base_path, chain + (path.resolve(),)), data)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or defaults when `path` is None), apply `a.b=c` overrides, validate."""
    data = _read_with_base(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    for override in overrides:
        apply_override(data, override)
    if overrides:
        source = f"{source} with overrides {' '.join(overrides)}"
    return config_from_dict(data, source)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Combinations that cannot work, each with the reason.


def _fields(cls: type, *skip: str) -> tuple[str, ...]:
    section = {f.type: f.name for f in dataclasses.fields(Config)}[cls.__name__]
    return tuple(f"{section}.{f.name}" for f in dataclasses.fields(cls) if f.name not in skip)


# Keys that act only in some runs: (keys, whether they act in this run, why not otherwise). A value
# other than the default where the key would do nothing is refused at load, with the reason, rather
# than silently ignored (tests/unit/test_config_keys.py walks every key of the tree against this table).
# multi-turn rollouts (real_megatron/agents/): with either engine; the tool environment's keys
# (rollout.tool_*, rollout.sandbox_*) act only when rollout.tools makes that environment
_TOOL_KEYS = tuple(f.name for f in dataclasses.fields(RolloutConfig) if f.name.startswith(("tool_", "sandbox_")))
_MULTI_TURN_KEYS = ("environment", "environment_args", "tools", "max_turns", "max_tokens_per_turn", *_TOOL_KEYS)
_ENGINE_KEYS = (
    "backend",
    "n_samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "stop_token_ids",
    "use_engine_logprobs",
    "weight_sync",
    "weight_sync_address",
    "weight_sync_bucket_mb",
    "max_staleness",
    *_MULTI_TURN_KEYS,
)  # the rest: the fleet's
CONDITIONAL_KEYS = (
    (
        _fields(TaskConfig, "name"),
        lambda c: c.task.name is not None,
        "does nothing without task.name (the run reads data.*, eval.files and model.path)",
    ),
    (
        (
            "data.train_files",
            "data.prompt_key",
            "data.answer_key",
            "data.skip_malformed",
            "data.reward_fn",
            "model.path",
            "model.tokenizer",
            "eval.files",
        ),
        lambda c: c.task.name is None,
        "does nothing with task.name set (the task makes its own data, held-out set, model, tokenizer and reward)",
    ),
    (
        ("data.verifier_timeout_s",),
        lambda c: c.task.name is None,
        "times the math verifier and data.reward_fn (a task's reward is exact match, in process)",
    ),
    (
        ("data.require_think_close",),
        lambda c: c.task.name is None and c.data.reward_fn == DataConfig.reward_fn,
        "is the math verifier's (data.reward_fn's default; a custom function reads responses its own way)",
    ),
    (
        ("data.reward_threshold",),
        lambda c: c.task.name is None and c.data.reward_fn != DataConfig.reward_fn,
        "thresholds a custom data.reward_fn's scores (the math verifier's are 0/1 already)",
    ),
    (
        _fields(RolloutConfig, *_ENGINE_KEYS),
        lambda c: c.rollout.backend == "sglang",
        "configures the SGLang fleet, and rollout.backend is 'local'",
    ),
    (
        ("rollout.environment_args", "rollout.max_turns", "rollout.max_tokens_per_turn"),
        lambda c: c.rollout.multi_turn,
        "shapes multi-turn rollouts (rollout.environment or rollout.tools)",
    ),
    (
        ("rollout.tools",),
        lambda c: not c.rollout.environment,
        "makes the tool environment, and rollout.environment names another (an environment offers its own tools)",
    ),
    (
        tuple(f"rollout.{k}" for k in _TOOL_KEYS),
        lambda c: bool(c.rollout.tools) and not c.rollout.environment,
        "configures the tool environment (rollout.tools without rollout.environment; an environment of your "
        "own takes its settings in rollout.environment_args)",
    ),
    (
        ("rollout.weight_sync_address",),
        lambda c: c.rollout.backend == "sglang" and c.rollout.weight_sync == "distributed",
        "configures the broadcast weight sync (rollout.weight_sync: distributed with rollout.backend: sglang)",
    ),
    (
        ("rollout.weight_sync_bucket_mb",),
        lambda c: c.rollout.backend == "sglang" and (c.rollout.weight_sync == "distributed" or c.rollout.colocate),
        "sizes the buckets of the broadcast (rollout.weight_sync: distributed) or of the colocated tensor updates",
    ),
    (
        ("algorithm.tau", "algorithm.skip_uniform_groups"),
        lambda c: c.algorithm.name in REAL_OBJECTIVES,
        f"is REAL's ({', '.join(REAL_OBJECTIVES)}); the baselines weigh group-normalised advantages",
    ),
    (
        ("algorithm.clip_low", "algorithm.clip_high"),
        lambda c: c.algorithm.name in CLIP_RANGES,
        f"is the clip range of {', '.join(CLIP_RANGES)}; REAL's objectives do not clip",
    ),
    (("algorithm.bce_normalise",), lambda c: c.algorithm.name == "real_bce", "applies to algorithm.name=real_bce only"),
    (
        ("algorithm.max_sampling_rounds",),
        lambda c: c.algorithm.dynamic_sampling,
        "bounds dynamic sampling (algorithm.dynamic_sampling: true)",
    ),
    (
        ("algorithm.overlong_penalty",),
        lambda c: c.algorithm.overlong_buffer_tokens > 0,
        "is the overlong penalty's size (algorithm.overlong_buffer_tokens > 0)",
    ),
    (
        ("algorithm.is_cap", "algorithm.importance_unit"),
        lambda c: c.algorithm.importance_correction != "none",
        "shapes the importance correction (algorithm.importance_correction: tis or mis)",
    ),
    (
        ("algorithm.mismatch_threshold",),
        lambda c: not c.rollout.use_engine_logprobs,
        "measures pi_old against the engine's log-probs; with rollout.use_engine_logprobs they are the same",
    ),
    (("optim.min_lr",), lambda c: c.optim.lr_schedule != "constant", "is where a decaying optim.lr_schedule ends"),
    (
        ("optim.cpu_offload_fraction", "optim.overlap_cpu_optimizer_d2h_h2d"),
        lambda c: c.optim.cpu_offload,
        "configures the optimizer's CPU offload (optim.cpu_offload: true)",
    ),
    (
        ("actor.prompts_per_micro_batch",),
        lambda c: c.actor.max_tokens_per_micro_batch is None,
        "is replaced by actor.max_tokens_per_micro_batch (micro-batches by tokens)",
    ),
    (
        ("model.recompute_layers",),
        lambda c: c.model.recompute_activations,
        "sizes activation recompute (model.recompute_activations: true)",
    ),
    (
        ("actor.reference_offload",),
        lambda c: c.algorithm.kl == "reference",
        "offloads the reference model of algorithm.kl='reference'",
    ),
    (
        ("actor.routing_replay",),
        lambda c: _moe_or_unknown(c),
        "replays mixture-of-experts routing, and the model is dense",
    ),
    (
        ("parallel.ep", "parallel.etp", "model.moe_dispatcher", "model.moe_aux_loss_coef"),
        lambda c: _moe_or_unknown(c),
        "shapes a mixture-of-experts model's experts, and the model is dense",
    ),
)


def _expert_layout_errors(cfg: Config) -> list[str]:
    """parallel.ep/etp against the world size, TP, PP and the model's experts (when it is known)."""
    from .memory import architecture_of

    p, errors = cfg.parallel, []
    etp = p.tp if p.etp is None else p.etp
    if p.ep < 1 or etp < 1:
        return [f"parallel.ep={p.ep} and parallel.etp={p.etp} must be >= 1"]
    if p.world_size % (p.ep * etp * p.pp):
        errors.append(
            f"world size {p.world_size} is not divisible by parallel.ep x etp x pp = {p.ep}*{etp}*{p.pp} "
            "(megatron's expert groups: each pipeline stage's ranks split into ep x etp x expert-data)"
        )
    arch = architecture_of(cfg)
    if arch is not None and arch.experts > 0:  # experts by ep: _placement_errors
        if p.tp > 1 and not p.sequence_parallel:
            errors.append(
                f"parallel.tp={p.tp} with a mixture-of-experts model needs parallel.sequence_parallel: true "
                "(megatron's MoE layer refuses to train under TP without it)"
            )
        if p.cp > 1:  # a rollout's routed experts would have to follow its tokens through the CP split
            errors.append(
                f"parallel.cp={p.cp} with a mixture-of-experts model is not supported yet (routing replay's "
                "experts are not split over the context-parallel ranks); use parallel.cp=1"
            )
    return errors


def _placement_errors(cfg: Config) -> list[str]:
    """Whether the trainer's processes fit a node and megatron-core can cut the model over them
    (memory.split_problems, the check convert runs too); every later error follows from these."""
    from .memory import architecture_of, split_problems

    p, errors = cfg.parallel, []
    if p.gpus_per_node > p.node_gpus:
        errors.append(
            f"parallel.gpus_per_node={p.gpus_per_node} exceeds parallel.node_gpus={p.node_gpus} (the GPUs of one node)"
        )
    arch = architecture_of(cfg)
    if arch is not None and p.ep >= 1 and (p.etp is None or p.etp >= 1):
        expert = (p.ep, p.etp) if arch.experts else (1, None)  # a dense model's ep: CONDITIONAL_KEYS says why
        split = split_problems(arch, p.tp, p.pp, p.vpp, *expert)
        if split:
            errors.append("megatron-core cannot split the model this way: " + "; ".join(split))
    return errors


def _moe_or_unknown(cfg: Config) -> bool:
    """Whether the run's model has experts (True when its architecture is not known here)."""
    from .memory import architecture_of

    arch = architecture_of(cfg)
    return arch is None or arch.experts > 0


def key_default(key: str) -> Any:
    section, name = key.split(".")
    spec = {f.name: f for f in dataclasses.fields(Config)}[section].default_factory()
    return getattr(spec, name)


def key_value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _cp_hint(per_rank: int, longest: int, budget: int, p: ParallelConfig) -> str:
    """', or parallel.cp=C' for the smallest context parallelism that fits the budget ('' if none)."""
    for cp in (2, 4, 8, 16, 32, 64):
        unit = 2 * cp * (p.tp if p.sequence_parallel else 1)
        if cp > p.cp and per_rank * (-(-longest // unit) * unit // cp) <= budget:
            return f", or split each sequence over parallel.cp={cp} context-parallel ranks"
    return ""


def validate(cfg: Config, source: str = "<config>") -> None:
    errors = []
    p, t, r, a, ac = cfg.parallel, cfg.train, cfg.rollout, cfg.algorithm, cfg.actor

    def positive(section: str, obj: Any, *names: str) -> None:
        for name in names:
            if getattr(obj, name) <= 0:
                errors.append(f"{section}.{name} must be > 0, got {getattr(obj, name)}")

    positive("parallel", p, "nodes", "gpus_per_node", "tp", "pp", "cp", "timeout_s", "node_gpus")
    positive("train", t, "steps", "prompts_per_step", "prompts_per_mini_batch")
    positive("actor", ac, "prompts_per_micro_batch")
    positive("algorithm", a, "tau", "updates_per_batch", "max_sampling_rounds", "mismatch_threshold")
    positive("rollout", r, "n_samples", "max_new_tokens", "num_servers", "server_tp")
    positive("optim", cfg.optim, "lr")
    if cfg.task.name:
        positive("task", cfg.task, "warmstart_max_steps", "warmstart_check_every", "warmstart_batch")
        band = cfg.task.warmstart_target
        if band is not None and not (len(band) == 2 and 0 <= band[0] <= band[1] <= 1):
            errors.append(f"task.warmstart_target must be [low, high] with 0 <= low <= high <= 1 (or null), got {band}")
        if band is not None and cfg.task.dev_prompts <= 0:
            errors.append("task.dev_prompts must be > 0 when task.warmstart_target is set")
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    errors = _placement_errors(cfg)  # the dominant cause when the layout is wrong: said alone, first
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))

    for section in (cfg.model, cfg.optim, cfg.eval, cfg.data, a, r):  # each section's own checks, beside its owner
        errors += section.check()

    model_parallel = p.tp * p.pp * p.cp
    if p.world_size % model_parallel:
        errors.append(
            f"world size {p.world_size} (parallel.nodes={p.nodes} x parallel.gpus_per_node={p.gpus_per_node}) "
            f"is not divisible by tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {model_parallel}"
        )
    if p.vpp is not None and (p.vpp < 1 or (p.vpp > 1 and p.pp < 2)):
        errors.append(f"parallel.vpp={p.vpp} needs parallel.pp >= 2 and vpp >= 1")
    if p.cp > 1 and not ac.pack_sequences:
        errors.append(
            f"parallel.cp={p.cp} needs actor.pack_sequences: true (each packed sequence is split over the "
            "context-parallel ranks)"
        )
    errors += _expert_layout_errors(cfg)
    if p.sequence_parallel and p.tp < 2:
        errors.append("parallel.sequence_parallel needs parallel.tp >= 2")
    if t.prompts_per_step % t.prompts_per_mini_batch:
        errors.append(
            f"train.prompts_per_step={t.prompts_per_step} is not divisible into mini-batches of "
            f"train.prompts_per_mini_batch={t.prompts_per_mini_batch} whole prompt groups"
        )
    if ac.max_tokens_per_micro_batch is None and t.prompts_per_mini_batch % ac.prompts_per_micro_batch:
        errors.append(
            f"train.prompts_per_mini_batch={t.prompts_per_mini_batch} is not divisible into micro-batches of "
            f"actor.prompts_per_micro_batch={ac.prompts_per_micro_batch} whole prompt groups (REAL's group "
            "log-sum-exp needs every group inside one micro-batch)"
        )
    if ac.max_tokens_per_micro_batch is not None and p.dp > 0:
        longest = cfg.data.max_prompt_tokens + r.max_new_tokens
        # a group never splits, and its rollouts spread over the DP ranks: the budget must hold
        # ceil(n_samples / dp) of the longest possible rollouts, or some step could not be cut
        per_rank = -(-r.n_samples // p.dp)
        # under CP the budget counts a rank's share: each sequence padded to 2*cp (x tp under SP) chunks
        unit = 2 * p.cp * (p.tp if p.sequence_parallel else 1) if p.cp > 1 else 1
        longest_per_rank = -(-longest // unit) * unit // p.cp
        need = per_rank * longest_per_rank
        if r.n_samples < p.dp:
            errors.append(
                f"actor.max_tokens_per_micro_batch with rollout.n_samples={r.n_samples} < {p.dp} data-parallel ranks: "
                "a micro-batch of one prompt group would leave ranks without data; use "
                "actor.prompts_per_micro_batch (no token budget) or fewer data-parallel ranks"
            )
        elif ac.max_tokens_per_micro_batch < need:
            errors.append(
                f"actor.max_tokens_per_micro_batch={ac.max_tokens_per_micro_batch} cannot hold one prompt group at its "
                f"longest: {per_rank} rollout(s) per rank (rollout.n_samples={r.n_samples} over "
                f"{p.dp} data-parallel ranks) x {longest_per_rank} tokens (data.max_prompt_tokens + rollout.max_new_tokens"
                f"{f', per rank under parallel.cp={p.cp}' if p.cp > 1 else ''}) = {need}; raise it to at least {need}"
                + _cp_hint(per_rank, longest, ac.max_tokens_per_micro_batch, p)
            )
    if not errors and p.dp > 0 and ac.max_tokens_per_micro_batch is None:
        rollouts_per_micro = ac.prompts_per_micro_batch * r.n_samples
        if rollouts_per_micro < p.dp:
            errors.append(
                f"a micro-batch holds {ac.prompts_per_micro_batch} prompts x {r.n_samples} rollouts = "
                f"{rollouts_per_micro} rollouts, fewer than the {p.dp} data-parallel ranks: some rank would "
                "have no data; raise actor.prompts_per_micro_batch"
            )
    if a.name in REAL_OBJECTIVES and r.n_samples < 2 and a.skip_uniform_groups:
        errors.append(
            f"rollout.n_samples={r.n_samples} with algorithm.skip_uniform_groups: every group of one rollout "
            "is uniform, so every group would be skipped"
        )
    if a.name in ("grpo", "dapo", "gspo") and r.n_samples < 2:
        errors.append(f"algorithm.name={a.name} normalises rewards within a group and needs rollout.n_samples >= 2")
    if a.overlong_buffer_tokens < 0 or a.overlong_buffer_tokens > r.max_new_tokens:
        errors.append(
            f"algorithm.overlong_buffer_tokens={a.overlong_buffer_tokens} must lie in [0, "
            f"rollout.max_new_tokens={r.max_new_tokens}]"
        )
    if a.overlong_buffer_tokens and a.name in REAL_OBJECTIVES:
        errors.append(
            f"algorithm.overlong_buffer_tokens with algorithm.name={a.name}: REAL's rewards are class labels, a "
            "fractional penalty is not a label; use algorithm.truncated=negative or exclude"
        )
    if a.dynamic_sampling and r.n_samples < 2:
        errors.append(
            f"algorithm.dynamic_sampling with rollout.n_samples={r.n_samples}: a group of one rollout is "
            "always uniform, so every round would be set aside"
        )
    if a.importance_correction != "none" and r.use_engine_logprobs:
        errors.append(
            f"algorithm.importance_correction={a.importance_correction} with rollout.use_engine_logprobs: pi_old is "
            "then the engine's own, and every ratio pi_old / pi_engine is 1"
        )
    if cfg.optim.warmup_steps > t.steps:
        errors.append(f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds train.steps={t.steps}")
    for keys, acts, why in CONDITIONAL_KEYS:
        if not acts(cfg):
            errors += [
                f"{key}={key_value(cfg, key)!r} {why}" for key in keys if key_value(cfg, key) != key_default(key)
            ]
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))
