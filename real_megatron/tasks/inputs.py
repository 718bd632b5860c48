"""What a run trains and evaluates on: the model it starts from, its tokenizer, the training
prompts, the held-out sets, the reward function and the stop tokens, from data files and an HF
checkpoint (`data.*`, `model.path`) or from a built-in task (`task.name`), whose data, tokenizer
and warm-start model are made offline on rank 0 and cached by their settings."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data.settings import DataConfig
from ..objectives.settings import REAL_OBJECTIVES
from ..rank0_phases import on_rank0

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    model_dir: Path  # HF checkpoint the actor starts from
    tokenizer: object
    train_set: object  # PromptDataset
    eval_sets: dict  # name -> PromptDataset
    reward_fn: Callable
    stop_ids: tuple


def prepare_inputs(cfg: Config) -> Inputs:
    from transformers import AutoTokenizer

    from ..data import PromptDataset
    from ..rewards import load_reward_fn

    if cfg.task.name:
        return _task_inputs(cfg)
    if not cfg.model.path:
        raise ValueError("model.path is required (an HF checkpoint directory) unless task.name is set")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    common = dict(
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        prompt_key=cfg.data.prompt_key,
        answer_key=cfg.data.answer_key,
        skip_malformed=cfg.data.skip_malformed,
        math_truths=cfg.data.reward_fn == DataConfig.reward_fn,  # a function of one's own takes any truth
    )
    reward = load_reward_fn(
        cfg.data.reward_fn,
        threshold=cfg.data.reward_threshold,
        labels=cfg.algorithm.name in REAL_OBJECTIVES,
        require_think_close=cfg.data.require_think_close,
    )
    train_set = PromptDataset(cfg.data.train_files, tokenizer, seed=cfg.train.seed, shuffle=cfg.data.shuffle, **common)
    evals = {Path(f).stem: PromptDataset([f], tokenizer, shuffle=False, **common) for f in cfg.eval.files}
    stop = tuple(cfg.rollout.stop_token_ids) or (
        (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    )
    return Inputs(Path(cfg.model.path), tokenizer, train_set, evals, reward, stop)


def _task_module(cfg: Config):
    from . import arithmetic, tool_products

    return {"arithmetic": arithmetic, "tool_products": tool_products}[cfg.task.name]


def _task_inputs(cfg: Config) -> Inputs:
    from ..data import PromptDataset
    from . import arithmetic

    task = _task_module(cfg)
    tools = cfg.task.name == "tool_products"
    t = cfg.task
    model_config = dict(cfg.model.hf_config_overrides)
    root = task_root(cfg)
    train, held, dev = task.split(
        t.train_prompts,
        t.eval_prompts,
        seed=cfg.train.seed,
        max_operand=t.max_operand,
        n_dev=t.dev_prompts if t.warmstart_target is not None else 0,
    )
    model_dir = root / "warmstart"

    def make_task_files():
        corpus = task.corpus(train) if tools else [p + s for p, s, _ in train[:4000]]
        tokenizer = task.build_tokenizer(root / "tokenizer", corpus, t.tokenizer_vocab)
        arithmetic.write_jsonl(root / "train.jsonl", train)
        arithmetic.write_jsonl(root / "heldout.jsonl", held)
        model_config.update(
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
        plan = arithmetic.WarmStartPlan(
            max_steps=t.warmstart_max_steps,
            batch=t.warmstart_batch,
            lr=t.warmstart_lr,
            target=tuple(t.warmstart_target) if t.warmstart_target is not None else None,
            check_every=t.warmstart_check_every,
            max_new_tokens=cfg.eval.max_new_tokens,
        )
        hooks = {}
        if tools:  # tool-using traces, and a dev check through the run's tool environment
            from ..rollout.collect import make_trajectory_runner

            stop = tuple(cfg.rollout.stop_token_ids) or (tokenizer.eos_token_id,)
            runner = make_trajectory_runner(Inputs(model_dir, tokenizer, None, {}, arithmetic.reward, stop), cfg)
            if runner is None:
                raise ValueError(
                    "task.name=tool_products needs rollout.tools: [python] (its traces call the python tool)"
                )
            evaluate = task.dev_evaluator(tokenizer, dev, runner, plan.dev_k, cfg.eval.max_new_tokens)
            hooks = dict(encode=task.TraceEncoder(tokenizer), evaluate=evaluate)
        record = arithmetic.warm_start(
            model_dir,
            model_config,
            tokenizer,
            train,
            dev,
            plan,
            seed=cfg.train.seed,
            progress=cfg.logging.progress_bar,
            **hooks,
        )
        if record.get("dev_pass1") is not None:
            log.info(
                "warm-start: %d steps, dev pass@1 %.3f (target %s)",
                record["steps"],
                record["dev_pass1"],
                record["target"],
            )

    on_rank0("the task's warm-start", make_task_files, timeout_s=cfg.parallel.timeout_s, share=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set = PromptDataset(
        [root / "train.jsonl"],
        tokenizer,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
    )
    held_set = PromptDataset(
        [root / "heldout.jsonl"], tokenizer, shuffle=False, max_prompt_tokens=cfg.data.max_prompt_tokens
    )
    stop = tuple(cfg.rollout.stop_token_ids) or (tokenizer.eos_token_id,)
    return Inputs(model_dir, tokenizer, train_set, {"heldout": held_set}, arithmetic.reward, stop)


def task_root(cfg: Config) -> Path:
    """Where a built-in task keeps its data, tokenizer and warm-start model (keyed by its settings)."""
    from . import arithmetic as task

    t = cfg.task
    cache = Path(t.cache_dir or Path.home() / ".cache" / "real-megatron" / "tasks")
    extra = []
    if t.name == "tool_products":  # its traces, and the tool settings its dev check runs with
        from . import tool_products

        extra = [tool_products.RECIPE, tool_products.DIRECT_PERCENT, cfg.rollout.max_turns, cfg.rollout.max_new_tokens]
    key = task.settings_key(
        t.train_prompts,
        t.eval_prompts,
        t.dev_prompts,
        t.max_operand,
        t.tokenizer_vocab,
        t.warmstart_target,
        t.warmstart_check_every,
        t.warmstart_max_steps,
        t.warmstart_batch,
        t.warmstart_lr,
        cfg.eval.max_new_tokens,
        dict(cfg.model.hf_config_overrides),
        cfg.train.seed,
        *extra,
    )
    return cache / f"{t.name}-{key}"


def initial_model_dir(cfg: Config) -> Path:
    """The HF checkpoint RL starts from: model.path, or the task's warm-start (made by the trainer)."""
    if cfg.task.name:
        return task_root(cfg) / "warmstart"
    if not cfg.model.path:
        raise ValueError("model.path is required (an HF checkpoint directory) unless task.name is set")
    return Path(cfg.model.path)


def warmstart_record(cfg: Config, inputs: Inputs) -> dict | None:
    """What a built-in task's warm-start did (steps, dev pass@1), for the summary."""
    record = inputs.model_dir / "warmstart.json"
    return json.loads(record.read_text()) if cfg.task.name and record.exists() else None
