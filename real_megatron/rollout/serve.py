"""`real-megatron serve`: one SGLang server as a job step of its own, registered for the trainer.

slurm/train.sbatch runs this once per server (srun, one task each) beside the trainer's step. It
waits for the initial model to exist (a built-in task's warm-start is made by the trainer), starts
SGLang on a free port, waits for /health, registers the URL in the run's registry directory
(rollout.server_registry) and then stays with the server: SIGTERM or SIGINT stops the server's
whole process group and removes the registration; if the server dies, so does this step, with the
server's exit code (the trainer drops a dead attached server and goes on with the others).

The server requires the run's key (rollout/fleet_auth.py). It listens on one address: 127.0.0.1
on one node; with `--host node` (several nodes) this node's address on the job's network
(rollout.server_interface, else the hostname's address), never on every interface.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

from .engine_setup import server_args
from .fleet_auth import fleet_key
from .registry import register_server, unregister_server
from .routing import sglang_routing
from .sglang_env import default_server_python
from .sglang_fleet import FleetError, SGLangFleet

log = logging.getLogger(__name__)


def wait_for_model(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path / "config.json").exists():
        if time.monotonic() > deadline:
            raise FleetError(
                f"the initial model {path} did not appear within {timeout_s:.0f}s "
                "(a built-in task's warm-start is written by the trainer: see its log)"
            )
        time.sleep(2.0)


NODE = "node"  # --host: this node's address on the job's network


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (Linux)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        except OSError as exc:
            raise FleetError(f"rollout.server_interface={name!r}: no IPv4 address on that interface ({exc})") from None
    return socket.inet_ntoa(packed[20:24])


def bind_address(host: str, interface: str | None) -> str:
    """`host` itself, or for `node` the address other nodes reach this one at."""
    if host != NODE:
        return host
    if interface:
        return interface_address(interface)
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError as exc:
        raise FleetError(
            f"this node's hostname {name!r} does not resolve ({exc}): set rollout.server_interface "
            "to the job network's interface (e.g. ib0)"
        ) from None
    if address.startswith("127."):
        raise FleetError(
            f"this node's hostname {name!r} resolves to {address}, which other nodes cannot reach: set "
            "rollout.server_interface to the job network's interface (e.g. ib0)"
        )
    return address


def serve(cfg, registry: Path, index: int, host: str, log_dir: Path) -> int:
    from ..tasks.inputs import initial_model_dir

    r = cfg.rollout
    key, key_file = fleet_key(cfg)  # first: a wrong key file stops the step at once
    bind = bind_address(host or r.server_host, r.server_interface)
    model = initial_model_dir(cfg)
    wait_for_model(model, r.health_timeout_s)
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # servers starting together probe different ports (the fleet takes the first free one from here)
    slot = int(os.environ.get("SLURM_LOCALID", index))
    fleet = SGLangFleet(
        model_path=str(model),
        num_servers=1,
        first_index=index,
        server_tp=r.server_tp,
        host=bind,
        base_port=r.server_base_port + slot * 8 * max(1, r.server_tp),
        server_python=r.server_python or default_server_python(),
        server_args=server_args(cfg),
        log_dir=log_dir,
        health_timeout_s=r.health_timeout_s,
        api_key=key,
        key_source=str(key_file),
        routing=sglang_routing(model),
    )
    server = fleet.servers[0]
    # a server bound to every interface (a user's explicit choice) is reached through this node's name
    port = server.url.rsplit(":", 1)[1]
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
