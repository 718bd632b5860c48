"""The `real-megatron` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys

import yaml

from . import __version__
from .config import ConfigError, config_to_dict, load_config
from .data.dataset import DataError
from .errors import UserError
from .parallel_layout import describe_layout, launched_servers


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    args.error_dir = f"{cfg.train.output_dir}/logs"  # a run-time mistake's traceback goes there
    if args.dry_run:
        print(f"# resolved config of {args.config}")
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        print("# parallel layout")
        print(describe_layout(cfg.parallel))
        from .plan import check_run

        check = check_run(cfg)
        print(check.report[0])  # the GPUs
        if cfg.rollout.backend == "sglang":
            from .rollout.engine_setup import describe_fleet

            print(f"# fleet: {describe_fleet(cfg)}")
        print("\n".join(check.report[1:]))
        from .prepare import missing_inputs

        missing = missing_inputs(cfg)
        print(
            f"# inputs: {'missing here: ' + '; '.join(missing) + ' (real-megatron prepare fetches them)' if missing else 'present'}"
        )
        for warning in check.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if check.problems:
            print(f"config error: {args.config}: {_problems_text(check.problems)}", file=sys.stderr)
            return 2
        print("config OK")
        return 0
    from .hub import resolve_model

    local = resolve_model(cfg.model.path) if cfg.model.path and not cfg.task.name else cfg.model.path
    if local != cfg.model.path:  # a Hub id: its snapshot in Hugging Face's cache, checked as a checkpoint here is
        print(f"model.path {cfg.model.path}: the Hugging Face Hub snapshot in {local}", file=sys.stderr)
        cfg = load_config(args.config, overrides + [f"model.path={local}"])
    import logging
    import os

    import torch

    from .plan import data_problems, input_problems
    from .prepare import missing_inputs

    missing = missing_inputs(cfg)
    if missing:  # before any process group, server or evaluation starts
        raise ConfigError(
            f"{args.config}: missing {'; '.join(missing)}; `real-megatron prepare {args.config}` "
            "downloads and converts them"
        )
    problems = input_problems(cfg)
    if problems:
        raise ConfigError(f"{args.config}: {'; '.join(problems)}")
    problems = data_problems(cfg, max_rows=None)  # every row (the dry run reads the first few)
    if problems:
        raise DataError(f"{args.config}: {_problems_text(problems)}")
    from .actor.distributed import launch_env

    started, wanted = launch_env(), cfg.parallel.world_size
    if started.world_size != wanted:  # one line, before any process group waits for ranks that never come
        raise ConfigError(
            f"{args.config}: the config runs parallel.nodes x parallel.gpus_per_node = {wanted} trainer process(es), "
            f"but {started.world_size} started ({started.source}); on one machine run `real-megatron launch "
            f"{args.config}` (servers and ranks), or `torchrun --nproc_per_node={cfg.parallel.gpus_per_node} -m "
            f"real_megatron.cli train {args.config}`; on Slurm `sbatch slurm/train.sbatch {args.config}`"
        )
    from .actor.distributed import trainer_environment
    from .ranks import is_rank0
    from .rollout.engine_setup import apply_trainer_fleet_environment
    from .rollout.fleet_auth import private_run
    from .train import train

    for key, value in trainer_environment(cfg, torch.cuda.is_available()).items():
        os.environ.setdefault(key, value)  # before CUDA starts; a user's own value wins
    apply_trainer_fleet_environment(cfg)  # before NCCL starts: the servers' side of the weight group
    if cfg.rollout.backend == "sglang" and cfg.rollout.weight_sync == "distributed":
        from .rollout.nccl_check import check_weight_sync_nccl, this_build

        _, nccl_problem = check_weight_sync_nccl(cfg, this_build())  # before any server starts
        if nccl_problem:
            raise ConfigError(f"{args.config}: {nccl_problem}")
    private_run(cfg, check_key=is_rank0())  # rank 0 alone talks to the fleet
    from .progress import quiet_library_bars

    quiet_library_bars()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("real_megatron").setLevel(logging.INFO)  # megatron-core's INFO lists every parameter
    summary = train(cfg)
    if "preempted_at" in summary:
        from .preemption import REQUEUE_EXIT_CODE

        if is_rank0():
            print(
                f"stopped at step {summary['preempted_at']} on a cluster signal; checkpoint written, "
                f"exit {REQUEUE_EXIT_CODE} asks for a requeue"
            )
        return REQUEUE_EXIT_CODE
    if is_rank0():
        print(closing_table(summary, cfg.train.output_dir))
    return 0


def _eval_settings(args: argparse.Namespace) -> None:
    """Fill every eval setting a flag left unset from one config tree: --run DIR's config.yaml (the
    model: DIR/final_hf), --config FILE (the model: model.path, or a task's warm-start), or the
    defaults. Sampling (eval.k, temperature, max_new_tokens), data (eval.files or the task's held-out
    set, prompt and answer keys, max prompt tokens), reward function and verifier timeout are the ones
    training's evaluation uses."""
    import re
    from pathlib import Path

    from .config import Config

    if args.run and args.config:
        raise ConfigError("eval: give --run DIR or --config FILE, not both")
    if args.data:  # `--data a.parquet eval.k=4`: the nargs list swallows overrides that follow it
        overrides = [d for d in args.data if re.match(r"^[a-z_]+\.[A-Za-z0-9_.]+=", d)]
        args.data = [d for d in args.data if d not in overrides] or None
        args.overrides = list(args.overrides) + overrides
    source = Path(args.run) / "config.yaml" if args.run else args.config
    cfg = load_config(source, list(args.overrides)) if source else Config()
    d, e = cfg.data, cfg.eval
    model, data, reward_fn = cfg.model.path, e.files, d.reward_fn
    if cfg.task.name:  # the task's own warm-start, held-out set and reward
        from .tasks.inputs import initial_model_dir, task_root

        model, data = str(initial_model_dir(cfg)), [str(task_root(cfg) / "heldout.jsonl")]
        reward_fn = "real_megatron.tasks.arithmetic:reward"
    if args.run and (Path(args.run) / "final_hf" / "config.json").exists():
        model = str(Path(args.run) / "final_hf")
    tree = dict(
        model=model,
        data=data,
        k=e.k,
        temperature=e.temperature,
        max_new_tokens=e.max_new_tokens,
        # a benchmark is evaluated whole unless a run's config drops long prompts (as its training did)
        max_prompt_tokens=d.max_prompt_tokens if source else 0,
        seed=cfg.train.seed,
        tokenizer=None if cfg.task.name else cfg.model.tokenizer,
        prompt_key=d.prompt_key,
        answer_key=d.answer_key,
        reward_fn=reward_fn,
        verifier_timeout_s=d.verifier_timeout_s,
        stop_token_ids=cfg.rollout.stop_token_ids,
    )
    for key, value in tree.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("model", "data"):
        if not getattr(args, key):
            raise ConfigError(
                f"eval: no --{key}"
                + (f", and {source} names none" if source else " (or --config FILE / --run DIR that names it)")
            )
    args.settings_from = str(source) if source else "defaults"
    args.reward_threshold, args.require_think_close = d.reward_threshold, d.require_think_close and not cfg.task.name
    args.skip_malformed = d.skip_malformed  # as training reads the rows


def _eval(args: argparse.Namespace) -> int:
    """Pass@1 of an HF checkpoint on benchmark files (embedded engine or an SGLang fleet)."""
    import json
    import shlex
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    from .data import PromptDataset
    from .data.settings import DataConfig
    from .evaluation import evaluate_sets, table_rows
    from .hub import resolve_model
    from .rewards import load_reward_fn
    from .rollout.types import SamplingParams

    _eval_settings(args)
    local, name = resolve_model(args.model, "--model"), Path(args.model).name
    if local != args.model:  # a Hugging Face Hub id: its snapshot in Hugging Face's cache
        print(f"--model {args.model}: the Hugging Face Hub snapshot in {local}", file=sys.stderr)
        args.model = local
    if args.out:
        args.error_dir = str(Path(args.out).parent)  # a run-time mistake's traceback goes beside the report
    model = Path(args.model)
    if not (model / "config.json").exists():
        raise ConfigError(f"eval: --model {model} is not an HF checkpoint directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model)
    sets = {}
    for path in args.data:
        try:
            dataset = PromptDataset(
                [path],
                tokenizer,
                shuffle=False,
                max_prompt_tokens=args.max_prompt_tokens or 10**9,
                prompt_key=args.prompt_key,
                answer_key=args.answer_key,
                skip_malformed=args.skip_malformed,
                math_truths=args.reward_fn == DataConfig.reward_fn,
            )
        except FileNotFoundError as exc:
            raise DataError(f"data file not found: {exc.filename or path}") from exc
        sets[Path(path).stem] = dataset.examples[: args.limit] if args.limit else dataset.examples
    stop = tuple(args.stop_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, stop_token_ids=stop
    )
    if args.backend == "local":
        from .rollout.local import LocalEngine

        engine = LocalEngine.from_pretrained(
            model, pad_token_id=tokenizer.pad_token_id or 0, seed=args.seed, dtype=getattr(torch, args.dtype)
        )
    else:
        from .rollout.fleet_auth import read_key_file
        from .rollout.sglang_env import default_server_python
        from .rollout.sglang_fleet import SGLangFleet, visible_gpus

        # launched servers get a key made for them; attached ones the --api-key-file's
        key = read_key_file(args.api_key_file) if args.api_key_file else None
        engine = SGLangFleet(
            model_path=str(model),
            urls=args.server_url or None,
            num_servers=args.num_servers,
            server_tp=args.server_tp,
            server_python=default_server_python(),
            server_args=shlex.split(args.server_args),
            log_dir=Path(args.out or ".").parent / "logs",
            gpus=None if args.server_url else (visible_gpus() or None),
            api_key=key,
            key_source=args.api_key_file,
        )
    try:
        report = evaluate_sets(
            engine,
            tokenizer,
            sets,
            # pass@1 counts labels: a reward function's scores must be 0/1 or thresholded
            load_reward_fn(
                args.reward_fn,
                threshold=args.reward_threshold,
                labels=True,
                require_think_close=args.require_think_close,
            ),
            args.k,
            params,
            timeout_s=args.verifier_timeout_s,
            progress=True,
        )
    finally:
        engine.close()
    report.update(
        model=str(model),
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        max_prompt_tokens=args.max_prompt_tokens,
        reward_fn=args.reward_fn,
        verifier_timeout_s=args.verifier_timeout_s,
        settings_from=args.settings_from,
    )
    print(table_rows({name: report}))
    for name, b in report["benchmarks"].items():
        print(
            f"{name}: pass@1 {b['pass1']:.4f} ± {b['stderr']:.4f} over {b['problems']} problems x {args.k} "
            f"= {b['samples']} samples, {b['truncated_ratio']:.1%} truncated"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    """Download and convert what a config reads (model, training set, benchmarks); see prepare.py."""
    from .prepare import prepare

    cfg = load_config(args.config, list(args.overrides))
    problems = prepare(cfg, download=not args.offline)
    if problems:
        print(
            "prepare: still missing (paths are relative to this directory, as the trainer reads them):", file=sys.stderr
        )
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    print(f"prepare: everything {args.config} reads is in place")
    return 0


def _launch_plan(args: argparse.Namespace) -> int:
    """What a launcher needs from a config, as shell assignments (slurm/train.sbatch evals them)."""
    import shlex

    from .plan import check_run
    from .rollout.engine_setup import trainer_fleet_environment

    cfg = load_config(args.config, list(args.overrides))
    check = check_run(cfg)  # the dry run's own check: a launcher never starts what it refuses
    for warning in check.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if check.problems:
        print(
            f"config error: {args.config}: {_problems_text(check.problems)} "
            f"(`real-megatron train {args.config} --dry-run` shows the plan)",
            file=sys.stderr,
        )
        return 2
    p, r = cfg.parallel, cfg.rollout
    plan = {
        "TRAINER_NODES": p.nodes,
        "TRAINER_TASKS_PER_NODE": p.gpus_per_node,
        "ROLLOUT_BACKEND": r.backend,
        "FLEET_SERVERS": launched_servers(cfg),
        "SERVER_TP": r.server_tp,
        "CONFIG_FLEET_NODES": r.fleet_nodes,
        "COLOCATE": int(r.colocate),
        "OUTPUT_DIR": cfg.train.output_dir,
        "TRAINER_ENV": " ".join(f"{k}={v}" for k, v in trainer_fleet_environment(cfg).items()),
    }
    for key, value in plan.items():
        print(f"{key}={shlex.quote(str(value))}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    if args.dry_run:  # the same plan as `train --dry-run`: launch runs that config's ranks and servers
        args.output_dir = None
        return _train(args)
    from .launch import launch

    return launch(args.config, list(args.overrides))


def _serve(args: argparse.Namespace) -> int:
    import logging
    import os
    from pathlib import Path

    from .hub import resolve_model
    from .rollout.fleet_auth import private_run
    from .rollout.serve import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, list(args.overrides))
    if not cfg.task.name and cfg.model.path:  # a Hub id: its snapshot in Hugging Face's cache
        cfg.model.path = resolve_model(cfg.model.path)
    private_run(cfg)
    index = args.index if args.index is not None else int(os.environ.get("SLURM_PROCID", 0))
    run_dir = Path(cfg.train.output_dir)
    registry = Path(cfg.rollout.server_registry or run_dir / "servers")
    return serve(cfg, registry, index, args.host, Path(args.log_dir or run_dir / "logs"))


def _problems_text(problems: list[str]) -> str:
    """One line, the dominant problem first (check_run orders them)."""
    if len(problems) == 1:
        return problems[0]
    return problems[0] + "; also: " + "; ".join(problems[1:])


def closing_table(summary: dict, run_dir: str) -> str:
    rows = [
        ("algorithm", summary["algorithm"]),
        ("steps", str(summary["steps"])),
        ("pass@1 before RL", f"{summary['baseline_pass1']:.3f} ± {summary['baseline_stderr']:.3f}"),
        ("pass@1 after RL", f"{summary['final_pass1']:.3f} ± {summary['stderr']:.3f}"),
        ("gain", f"{summary['gain']:+.3f}"),
        ("eval samples", f"{summary['eval_samples']} ({summary['eval_problems']} problems)"),
        ("wall time", f"{summary['seconds'] / 60:.1f} min"),
        ("run directory", run_dir),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _convert(args: argparse.Namespace) -> int:
    """Run in a process group of lcm(tp, ep * etp) * pp ranks; started alone, relaunch under torchrun."""
    import math
    import os
    import subprocess

    from .actor.distributed import init_distributed, launch_env, shutdown

    etp = args.tp if args.etp is None else args.etp
    ranks = math.lcm(args.tp, args.ep * etp) * args.pp
    if launch_env().world_size == 1 and ranks > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "real_megatron.cli",
        ] + sys.argv[1:]
        return subprocess.run(cmd, env=dict(os.environ)).returncode
    from .actor.model import UnsupportedModelError
    from .convert.convert import hf_to_megatron, megatron_to_hf

    init_distributed(
        tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, expected_world_size=ranks, timeout_s=args.timeout
    )
    try:
        if args.direction == "hf-to-megatron":
            out = hf_to_megatron(args.hf, args.out)
        else:
            out = megatron_to_hf(args.ckpt, args.out, args.hf_config, max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (UnsupportedModelError, KeyError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"convert error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if launch_env().rank == 0:
        print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="real-megatron",
        description="REAL (Rewards as Labels) RL post-training on megatron-core.",
    )
    parser.add_argument("--version", action="version", version=f"real-megatron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="run RL training from a YAML config")
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="a.b=c", help="override config keys, e.g. optim.lr=1e-6")
    train.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and layout, exit")
    train.add_argument("--output-dir", help="run directory (same as train.output_dir=...)")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="pass@1 of an HF checkpoint on benchmark files (the paper's Table 1 rows)")
    # unset flags come from --run's or --config's tree (or the config defaults): see _eval_settings
    ev.add_argument("--run", metavar="DIR", help="a training run directory: its config.yaml and final_hf/")
    ev.add_argument("--config", metavar="FILE", help="a training config (a.b=c overrides follow it)")
    ev.add_argument("--model", help="HF checkpoint directory (default: the run's final_hf, or model.path)")
    ev.add_argument("--data", nargs="+", metavar="FILE", help="verl parquet or jsonl files (default: eval.files)")
    ev.add_argument("--k", type=int, help="samples per problem (default: eval.k)")
    ev.add_argument("--temperature", type=float, help="default: eval.temperature")
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--max-new-tokens", type=int, help="default: eval.max_new_tokens")
    ev.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="drop longer prompts (0: keep every problem; default: data.max_prompt_tokens with --run/--config, else 0)",
    )
    ev.add_argument("--limit", type=int, help="first N problems of each file (quick checks)")
    ev.add_argument("--out", help="write the report as JSON here")
    ev.add_argument("--seed", type=int, help="default: train.seed")
    ev.add_argument("--tokenizer", help="default: model.tokenizer, else the model directory")
    ev.add_argument("--prompt-key", help="default: data.prompt_key")
    ev.add_argument("--answer-key", help="default: data.answer_key")
    ev.add_argument("--reward-fn", help="module:function (default: data.reward_fn)")
    ev.add_argument("--verifier-timeout-s", type=float, help="default: data.verifier_timeout_s")
    ev.add_argument(
        "--stop-token-ids", type=int, nargs="*", help="default: rollout.stop_token_ids, else the tokenizer's eos"
    )
    ev.add_argument(
        "--backend",
        choices=["local", "sglang"],
        default="local",
        help="local: transformers in this process; sglang: launch or attach SGLang servers",
    )
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="local engine")
    ev.add_argument("--server-url", nargs="*", default=[], help="attach to these SGLang servers")
    ev.add_argument("--api-key-file", help="the key the --server-url servers require (one line, mode 0600)")
    ev.add_argument("--num-servers", type=int, default=1, help="servers to launch (without --server-url)")
    ev.add_argument("--server-tp", type=int, default=1)
    ev.add_argument("--server-args", default="", help="extra sglang.launch_server arguments, one string")
    ev.set_defaults(func=_eval, overrides=[])

    prep = sub.add_parser("prepare", help="download and convert the model and data files a config reads")
    prep.add_argument("config", help="YAML config file (see configs/)")
    prep.add_argument("overrides", nargs="*", metavar="a.b=c")
    prep.add_argument("--offline", action="store_true", help="no downloads: convert files already in the raw dirs")
    prep.set_defaults(func=_prepare)

    run = sub.add_parser("launch", help="run a config on this machine: SGLang servers and trainer ranks, GPUs split")
    run.add_argument("config", help="YAML config file (see configs/)")
    run.add_argument("overrides", nargs="*", metavar="a.b=c")
    run.add_argument(
        "--dry-run", action="store_true", help="check and print the plan (as train --dry-run), start nothing"
    )
    run.set_defaults(func=_launch)

    serve = sub.add_parser("serve", help="run one SGLang server for a config's trainer and register its URL")
    serve.add_argument("config", help="the training YAML config (its rollout.* and model settings)")
    serve.add_argument("overrides", nargs="*", metavar="a.b=c")
    serve.add_argument("--index", type=int, help="server number (default: $SLURM_PROCID)")
    serve.add_argument("--host", help="address to bind (default: rollout.server_host)")
    serve.add_argument("--log-dir", help="where the server's log goes (default: <output_dir>/logs)")
    serve.set_defaults(func=_serve)

    plan = sub.add_parser("launch-plan", help="print a config's process counts as shell variables")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*", metavar="a.b=c")
    plan.set_defaults(func=_launch_plan)

    convert = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron")
    directions = convert.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_mcore = directions.add_parser("hf-to-megatron", help="HF safetensors -> megatron dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF checkpoint directory")
    to_hf = directions.add_parser("megatron-to-hf", help="megatron dist checkpoint -> HF safetensors")
    to_hf.add_argument("--ckpt", required=True, help="converted or training checkpoint directory")
    to_hf.add_argument("--hf-config", help="directory with config.json (default: the checkpoint's hf/)")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    for p in (to_mcore, to_hf):
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to run with")
        p.add_argument("--pp", type=int, default=1, help="pipeline stages to run with")
        p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (mixture-of-experts models)")
        p.add_argument("--etp", type=int, default=None, help="expert tensor-parallel ranks (default: --tp)")
        p.add_argument("--timeout", type=float, default=600.0, help="deadline of every collective, seconds")
        p.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`train cfg.yaml --dry-run a.b=c`); argparse
    # leaves those after an option unparsed, so collect every leftover of the form a.b=c.
    args, extra = parser.parse_known_args(argv)
    unknown = [arg for arg in extra if arg.startswith("-") or "=" not in arg]
    if unknown or (
        extra and args.command not in ("train", "eval", "prepare", "launch", "serve", "launch-plan")
    ):  # these take a.b=c
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except UserError as exc:  # a config key, a data row, a reward function, a model id: one line
        return _user_error(exc, getattr(args, "error_dir", None))
    except Exception as exc:
        from .rank0_phases import Rank0Failed

        if isinstance(exc, Rank0Failed) and exc.user_error:  # rank 0 says it, in one line
            _keep_traceback(getattr(args, "error_dir", None))
            return 2
        raise


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def _keep_traceback(directory: str | None) -> str | None:
    """The current exception's traceback in DIRECTORY/traceback.rank<N>.txt (a temporary file
    without one); its path, or None where nothing could be written."""
    import tempfile
    import traceback
    from pathlib import Path

    text = traceback.format_exc()
    try:
        if directory:
            path = Path(directory) / f"traceback.rank{_rank()}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return str(path)
        with tempfile.NamedTemporaryFile("w", prefix="real-megatron-", suffix=".txt", delete=False) as f:
            f.write(text)
            return f.name
    except OSError:
        return None


def _user_error(exc: UserError, directory: str | None) -> int:
    """One line on stderr (a rank > 0 says which it is), exit 2. A mistake found while running keeps
    its traceback in a file the line names; one found before anything runs needs none."""
    where = _keep_traceback(directory) if exc.keep_traceback else None
    rank = _rank()
    print(
        ("" if rank == 0 else f"rank {rank}: ") + f"{exc.kind}: {exc}" + (f" (traceback: {where})" if where else ""),
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
