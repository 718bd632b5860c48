"""The `real-megatron` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys

import yaml

from . import __version__
from .config import ConfigError, config_to_dict, load_config
from .parallel_layout import describe_layout


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        print(f"# resolved config of {args.config}")
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        print("# parallel layout")
        print(describe_layout(cfg.parallel))
        print("config OK")
        return 0
    print(
        "real-megatron train: the training loop (megatron actor + rollouts) is not in this release yet; "
        "use --dry-run to validate a config.",
        file=sys.stderr,
    )
    return 2


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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`train cfg.yaml --dry-run a.b=c`); argparse
    # leaves those after an option unparsed, so collect every leftover of the form a.b=c.
    args, extra = parser.parse_known_args(argv)
    unknown = [arg for arg in extra if arg.startswith("-") or "=" not in arg]
    if unknown or (extra and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
