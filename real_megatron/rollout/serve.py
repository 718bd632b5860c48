"""`real-megatron serve`: one SGLang server as a job step of its own, registered for the trainer.

slurm/train.sbatch runs this once per server (srun, one task each) beside the trainer's step. It
waits for the initial model to exist (a built-in task's warm-start is made by the trainer), starts
SGLang on a free port, waits for /health, registers the URL in the run's registry directory
(rollout.server_registry) and then stays with the server: SIGTERM or SIGINT stops the server's
whole process group and removes the registration; if the server dies, so does this step, with the
server's exit code (the trainer drops a dead attached server and goes on with the others).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

from .registry import register_server, unregister_server
from .sglang_env import default_server_python
from .sglang_fleet import FleetError, SGLangFleet

log = logging.getLogger(__name__)


def free_port(host: str, start: int, tries: int = 200) -> int:
    """The first port from `start` that `host` can bind (SGLang also opens a few ports above it)."""
    for port in range(start, start + tries * 8, 8):
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
    raise FleetError(f"no free port on {host} in {start}..{start + tries * 8}")


def wait_for_model(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path / "config.json").exists():
        if time.monotonic() > deadline:
            raise FleetError(f"the initial model {path} did not appear within {timeout_s:.0f}s "
                             "(a built-in task's warm-start is written by the trainer: see its log)")
        time.sleep(2.0)


def serve(cfg, registry: Path, index: int, host: str, log_dir: Path) -> int:
    from ..tasks.inputs import initial_model_dir

    r = cfg.rollout
    model = initial_model_dir(cfg)
    wait_for_model(model, r.health_timeout_s)
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    bind = host or r.server_host
    slot = int(os.environ.get("SLURM_LOCALID", index))  # servers starting together probe different ports
    port = free_port(bind, r.server_base_port + slot * 8 * max(1, r.server_tp))
    fleet = SGLangFleet(model_path=str(model), num_servers=1, first_index=index, server_tp=r.server_tp, host=bind,
                        base_port=port, server_python=r.server_python or default_server_python(),
                        server_args=r.server_args, log_dir=log_dir, health_timeout_s=r.health_timeout_s)
    server = fleet.servers[0]
    # a server bound to every interface is reached through this node's name
    url = server.url if bind not in ("0.0.0.0", "::") else f"http://{socket.getfqdn()}:{port}"
    name = f"server-{index}"
    try:
        register_server(registry, name, url, host=socket.gethostname(), pid=os.getpid(), model_path=str(model))
        print(f"SGLang server {index} ready at {url} (log {server.log_path})", flush=True)
        while stop["signal"] is None and server.process.poll() is None:
            time.sleep(1.0)
    finally:
        unregister_server(registry, name)
        code = server.process.poll()
        fleet.stop()
    if stop["signal"] is not None:
        print(f"SGLang server {index} stopped on {signal.Signals(stop['signal']).name}", flush=True)
        return 0
    print(f"SGLang server {index} exited with code {code}; log tail:\n{server.log_tail()}", flush=True)
    return code or 1
