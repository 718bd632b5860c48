"""`real-megatron launch CONFIG`: one machine, the way slurm/train.sbatch runs one node.

The node's GPUs are split without any CUDA_VISIBLE_DEVICES by hand: the first
parallel.gpus_per_node go to the trainer ranks (local rank i takes GPU i), the next
rollout.num_servers x rollout.server_tp to the SGLang servers, server_tp each, in order; a layout
that does not fit the GPUs this process sees is refused before anything starts (colocated,
rollout.colocate: the servers take the trainer's own GPUs instead). Each server is a
`real-megatron serve` process bound to 127.0.0.1 that registers in RUN_DIR/servers; the trainer
ranks (RANK / WORLD_SIZE / LOCAL_RANK, a free rendezvous port) attach to them.

Everything the launch and its children write is the user's alone (umask 077); the servers require
the run's key, RUN_DIR/fleet_api_key, made here if the run has none (rollout/fleet_auth.py).

As in the Slurm job: logs in RUN_DIR/logs (trainer.log and fleet.log with every line labelled by
rank or server, sglang_<i>.log per server; rank 0's lines also on this terminal), SIGUSR1 or
SIGTERM (and Ctrl-C) go to the trainer, which checkpoints after its step and exits 75; when a rank
fails the others are stopped; the servers are stopped at the end; the exit code is the trainer's.
Running the same command again resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError, load_config
from .parallel_layout import launched_servers
from .preemption import REQUEUE_EXIT_CODE
from .rollout.engine_setup import trainer_fleet_environment
from .rollout.fleet_auth import private_run
from .rollout.sglang_fleet import split_gpus, visible_gpus

GRACE_S = 30.0  # after a rank fails, the others get this long to exit on SIGTERM


def split_node(gpus: list[str], trainer: int, servers: int, server_tp: int) -> tuple[list[str], list[list[str]]]:
    """(the trainer's GPUs, each server's GPUs) of this node; ConfigError when they do not fit."""
    need = trainer + servers * server_tp
    if len(gpus) < need:
        raise ConfigError(
            f"this node has {len(gpus)} GPU(s) ({','.join(gpus) or 'none'}); the trainer's parallel.gpus_per_node="
            f"{trainer} and {servers} SGLang server(s) x rollout.server_tp={server_tp} need {need}"
        )
    return gpus[:trainer], split_gpus(gpus[trainer:], servers, server_tp)


class Labelled:
    """A child process whose output lines go, prefixed with `label: `, to a log file (and a terminal)."""

    def __init__(self, cmd: list[str], env: dict, log_path: Path, label: str, echo: bool = False):
        self.label = label
        self.process = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._log = log_path.open("a")
        self._echo = echo
        self._reader = threading.Thread(target=self._copy, daemon=True)
        self._reader.start()

    def _copy(self) -> None:
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode(errors="replace")
            self._log.write(f"{self.label}: {line}")
            self._log.flush()
            if self._echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def finish(self) -> int:
        code = self.process.wait()
        self._reader.join(timeout=10)
        self._log.close()
        return code


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "real_megatron.cli", *args]


def launch(config: str, overrides: list[str], environ: Optional[dict] = None) -> int:
    from .actor.distributed import free_port
    from .hub import resolve_model

    cfg = load_config(config, overrides)
    local = resolve_model(cfg.model.path) if cfg.model.path and not cfg.task.name else cfg.model.path
    if local != cfg.model.path:  # a Hub id: resolved once here, every child reads the snapshot
        print(f"launch: model.path {cfg.model.path}: the Hugging Face Hub snapshot in {local}", flush=True)
        overrides = list(overrides) + [f"model.path={local}"]
        cfg = load_config(config, overrides)
    p, r = cfg.parallel, cfg.rollout
    if p.nodes != 1:
        raise ConfigError(
            f"launch runs one machine; the config asks for parallel.nodes={p.nodes}: use "
            "slurm/train.sbatch for several nodes"
        )
    env = dict(os.environ if environ is None else environ)
    fleet = launched_servers(cfg) > 0 and not r.server_registry  # servers of this launch (none when attached)
    gpus = visible_gpus(env)
    if gpus and r.colocate:  # the servers time-share the trainer's GPUs
        trainer_gpus, server_gpus = split_node(gpus, p.gpus_per_node, 0, 1)[0], None
        server_gpus = split_gpus(trainer_gpus, r.num_servers if fleet else 0, r.server_tp)
    else:
        trainer_gpus, server_gpus = (
            split_node(gpus, p.gpus_per_node, r.num_servers if fleet else 0, r.server_tp) if gpus else (None, None)
        )
    private_run(cfg)  # before anything is written; a wrong key file stops here
    run_dir = Path(cfg.train.output_dir).resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides) + [f"train.output_dir={run_dir}"]
    servers: list[Labelled] = []
    if fleet:
        registry = run_dir / "servers"
        shutil.rmtree(registry, ignore_errors=True)  # no stale URL from an earlier launch of this run
        overrides.append(f"rollout.server_registry={registry}")
        for i in range(r.num_servers):
            own = dict(env, CUDA_VISIBLE_DEVICES=",".join(server_gpus[i])) if server_gpus else env
            servers.append(
                Labelled(
                    _cli("serve", config, *overrides, "--index", str(i), "--host", "127.0.0.1", "--log-dir", str(logs)),
                    own,
                    logs / "fleet.log",
                    str(i),
                )
            )
    port = free_port()
    ranks = []
    for rank in range(p.gpus_per_node):
        own = dict(
            env,
            RANK=str(rank),
            WORLD_SIZE=str(p.gpus_per_node),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **trainer_fleet_environment(cfg),
        )
        if trainer_gpus:
            own["CUDA_VISIBLE_DEVICES"] = ",".join(trainer_gpus)
        ranks.append(Labelled(_cli("train", config, *overrides), own, logs / "trainer.log", str(rank), echo=rank == 0))
    print(
        f"launch: trainer {p.gpus_per_node} rank(s) on GPU(s) {','.join(trainer_gpus) if trainer_gpus else 'none (CPU)'}, "
        f"{len(servers)} SGLang server(s)"
        + (" colocated" if r.colocate else "")
        + (f" on {';'.join(','.join(g) for g in server_gpus)}" if server_gpus else "")
        + f"; logs in {logs}",
        flush=True,
    )

    def forward(signum, frame):
        for rank in ranks:
            rank.signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        code = _wait_for_ranks(ranks)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(servers)
    print(f"launch: trainer exited with code {code}", flush=True)
    return code


def _wait_for_ranks(ranks: list[Labelled]) -> int:
    """The trainer's exit code: the first failure (a signal as 128 + its number), else 0."""
    failed, failed_at = None, None
    while True:
        codes = [rank.process.poll() for rank in ranks]
        bad = [c for c in codes if c not in (None, 0, REQUEUE_EXIT_CODE)]  # 75: every rank checkpointed, stopping
        if bad and failed is None:
            failed, failed_at = bad[0], time.monotonic()
            for rank in ranks:
                rank.signal(signal.SIGTERM)  # as srun --kill-on-bad-exit: the others would wait in a collective
        if all(c is not None for c in codes):
            break
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            for rank in ranks:
                rank.signal(signal.SIGKILL)
        time.sleep(0.2)
    for rank in ranks:
        rank.finish()
    code = failed if failed is not None else (REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 0)
    return 128 - code if code < 0 else code


def _stop(servers: list[Labelled]) -> None:
    for server in servers:
        server.signal(signal.SIGTERM)  # `serve` stops its SGLang process group and unregisters
    deadline = time.monotonic() + 60
    for server in servers:
        try:
            server.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            server.signal(signal.SIGKILL)
        server.finish()
