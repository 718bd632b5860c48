"""The SGLang fleet (`rollout.backend: sglang`): launch or attach servers, generate, fail over.

Each sample is one /generate request (token ids in, ids + log-probs + finish reason out), many in
flight, each sent to the live server with the least outstanding work. A server that dies or times
out mid-batch is taken out; its unfinished requests go to the others (nothing lost, nothing twice:
every request has one slot in the result); a launched server is restarted in the background, an
attached one dropped with a warning; with no server left the batch fails with a clear error.
Weights change between requests: while they do, no request is sent; requests already running (the
asynchronous pipeline's, rollout.max_staleness >= 1) are paused on their servers (SGLang's
/pause_generation, mode retract), the new weights are loaded, and they continue on them, so
generation stops only for the sync itself. Every sample records the version its server held when it
was sent (a sample that straddled an update is as old as its first token), and the prefix cache is
flushed with each update.

Every server the fleet launches requires a bearer key (the run's, or one made for these servers:
rollout/fleet_auth.py) and every request carries it; /health stays open, so a server is first
healthy, then asked one authenticated question, which a wrong key fails with a 401 naming its file.
Weights from disk are loaded by every server at once, each with its own deadline.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .fleet_auth import auth_headers, new_key, server_auth_file
from .routing import SGLANG_SERVER_FLAG, RoutingShape, from_sglang
from .types import Sample, SamplingParams

log = logging.getLogger(__name__)


class FleetError(RuntimeError):
    pass


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


MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # what an SGLang server releases and resumes


def http_json(url: str, payload: Optional[dict] = None, timeout: float = 30.0, key: Optional[str] = None) -> dict:
    """GET (no payload) or POST JSON; `key` goes as `Authorization: Bearer`."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url,
        data=data,
        headers={"Content-Type": "application/json", **auth_headers(key)},
        method="GET" if payload is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    try:
        return json.loads(body) if body.strip() else {}
    except json.JSONDecodeError:  # some endpoints (/flush_cache) answer in plain text
        return {"text": body.decode(errors="replace")}


TRAINER_ONLY_ENV = ("CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF")


def visible_gpus(environ: Optional[dict] = None) -> list[str]:
    """The GPUs this process may use, as ids valid in CUDA_VISIBLE_DEVICES (empty without GPUs)."""
    env = os.environ if environ is None else environ
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def split_gpus(gpus: list[str], num_servers: int, server_tp: int) -> list[list[str]]:
    """server_tp GPUs of `gpus` for each server, in order; an error when there are too few."""
    need = num_servers * server_tp
    if len(gpus) < need:
        raise FleetError(
            f"{num_servers} SGLang server(s) of server_tp={server_tp} need {need} GPUs; only "
            f"{len(gpus)} are free for them ({','.join(gpus) or 'none'}): set rollout.server_gpus, "
            "launch fewer servers, or run the fleet as its own Slurm step"
        )
    return [gpus[i * server_tp : (i + 1) * server_tp] for i in range(num_servers)]


@dataclass
class Server:
    index: int
    url: str
    process: Optional[subprocess.Popen] = None  # None: attached, not ours to stop or restart
    log_path: Optional[Path] = None
    alive: bool = True
    outstanding: int = 0  # tokens of requests in flight
    weight_version: int = 0
    restarts: int = 0
    command: list[str] = field(default_factory=list)
    tp: int = 1  # ranks this server has in a weight broadcast group
    awaiting_weights: bool = False  # restarted, healthy, not in rotation until the next broadcast
    gpus: Optional[list[str]] = None  # its CUDA_VISIBLE_DEVICES when launched (None: inherited)
    auth_file: Optional[Path] = None  # the key for SGLang to read at start; removed once it is up
    released: set = field(default_factory=set)  # memory tags it released (colocated), until resumed

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class SGLangFleet:
    def __init__(
        self,
        *,
        model_path: Optional[str] = None,
        urls: Optional[list[str]] = None,
        num_servers: int = 1,
        server_tp: int = 1,
        host: str = "127.0.0.1",
        base_port: int = 30000,
        server_python: str = "python3",
        server_args: Optional[list[str]] = None,
        env: Optional[dict] = None,
        log_dir: str | Path = "logs",
        health_timeout_s: float = 600.0,
        request_timeout_s: float = 1800.0,
        max_requests_per_server: int = 128,
        max_restarts: int = 2,
        first_index: int = 0,
        gpus: Optional[list[str]] = None,
        api_key: Optional[str] = None,
        key_source: Optional[str] = None,
        routing: Optional[RoutingShape] = None,
    ):
        """first_index: number of the first launched server (its log is sglang_<index>.log).
        max_requests_per_server: requests in flight per server (SGLang batches them on its GPUs);
        the fleet's bound is this times the number of live servers.
        gpus: GPU ids (as this process sees them) for the launched servers, server_tp each, in
        order; None leaves CUDA_VISIBLE_DEVICES as it is (a CPU run, or Slurm bound the task).
        api_key: the servers' bearer key (key_source: its file, for errors). Launched servers always
        require one: without it the fleet makes one for them. Attached servers without it are
        called without a key.
        routing: a mixture-of-experts model's routing shape: every request asks for the experts each
        token was routed to (launched servers get SGLang's --enable-return-routed-experts)."""
        if not urls and not model_path:
            raise ValueError("SGLangFleet needs server urls to attach to, or a model_path to launch servers with")
        if not urls and api_key is None:
            api_key, key_source = new_key(), "a key made for these servers"
        if not urls and "--config" in (server_args or []):
            raise FleetError(
                "rollout.server_args: --config is taken by the fleet (it passes the servers' key in one); "
                "give SGLang's options directly"
            )
        self.api_key, self.key_source = api_key, key_source or "no key"
        self.health_timeout_s, self.request_timeout_s = health_timeout_s, request_timeout_s
        self.max_restarts = max_restarts
        self.log_dir = Path(log_dir)
        self._lock = threading.Lock()  # guards server load bookkeeping
        self._weights = threading.Lock()  # held while weights change: no request is sent meanwhile
        self.in_flight = 0  # requests sent and not yet answered, over every generate() call
        self.servers: list[Server] = []
        self.weight_version, self.weights_path = 0, None  # what every server in rotation holds
        self.weights_set = False  # True once this fleet has pushed weights (disk or broadcast)
        # how a trainer's weights reach the servers (weight_sync.py: DiskWeights or BroadcastWeights),
        # chosen by whoever builds the fleet for training (engine_setup.py); None: weights by hand
        self.weights = None
        self.last_throughput = 0.0  # generated tokens per second of the last batch
        self.last_calls: dict[int, tuple[float, float]] = {}  # the last call on every server: its seconds
        self.routing = routing
        if routing is not None and SGLANG_SERVER_FLAG not in (server_args or []):
            server_args = [*(server_args or []), SGLANG_SERVER_FLAG]
        if urls:
            self.servers = [Server(i, u.rstrip("/"), tp=server_tp) for i, u in enumerate(urls)]
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            devices = split_gpus(gpus, num_servers, server_tp) if gpus is not None else [None] * num_servers
            next_port = base_port
            for i, own in zip(range(first_index, first_index + num_servers), devices):
                # the first free port past the previous server's: another run's server (or one
                # left behind) on this machine may hold the base port
                port = free_port(host, next_port)
                next_port = port + 8 * max(1, server_tp)
                command = [
                    server_python,
                    "-m",
                    "sglang.launch_server",
                    "--model-path",
                    str(model_path),
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--tp-size",
                    str(server_tp),
                    *(server_args or []),
                ]
                self.servers.append(
                    Server(
                        i,
                        f"http://{host}:{port}",
                        log_path=self.log_dir / f"sglang_{i}.log",
                        command=command,
                        tp=server_tp,
                        gpus=own,
                    )
                )
            # the trainer's CUDA settings are not the servers' (one connection per device would
            # serialise SGLang's overlapped streams); `env` may set them explicitly
            inherited = {k: v for k, v in os.environ.items() if k not in TRAINER_ONLY_ENV}
            self._env = dict(inherited, **(env or {}))
            for server in self.servers:
                self._launch(server)
        self.max_requests_per_server = max_requests_per_server
        self.max_in_flight = max_requests_per_server * len(self.servers)  # threads: one per request
        self.wait_healthy(self.servers)

    # --- lifecycle -----------------------------------------------------------------------------

    def _launch(self, server: Server) -> None:
        # SGLang logs its arguments, the key among them: the log is the user's alone, whatever the umask
        log_file = os.fdopen(os.open(server.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a")
        os.fchmod(log_file.fileno(), 0o600)
        env = self._env if server.gpus is None else dict(self._env, CUDA_VISIBLE_DEVICES=",".join(server.gpus))
        self._drop_auth_file(server)
        server.released = set()  # a fresh process holds all its memory
        server.auth_file = server_auth_file(self.api_key)
        server.process = subprocess.Popen(
            server.command + ["--config", str(server.auth_file)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )  # its own process group: we stop all of it
        log_file.close()  # the child has its own descriptor
        server.alive = True

    @staticmethod
    def _drop_auth_file(server: Server) -> None:
        if server.auth_file is not None:
            server.auth_file.unlink(missing_ok=True)
            server.auth_file = None

    def call(self, server: Server, path: str, body: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
        """One authenticated request to `server` (GET without a body)."""
        return http_json(
            server.url + path, body, timeout=self.request_timeout_s if timeout is None else timeout, key=self.api_key
        )

    def _key_accepted(self, server: Server) -> bool:
        """/health is open to all: one call that needs the key tells a wrong key at start (an
        error naming the key's file); False while the server cannot answer yet."""
        try:
            self.call(server, "/model_info", timeout=30)
            return True
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403) and self.api_key is None:
                raise FleetError(
                    f"SGLang server {server.index} ({server.url}) requires a key (HTTP {exc.code}): "
                    "give its file (rollout.api_key_file, or eval --api-key-file)"
                ) from None
            if exc.code in (401, 403):
                raise FleetError(
                    f"SGLang server {server.index} ({server.url}) refused the fleet's key "
                    f"({self.key_source}) with HTTP {exc.code}: it was started with another key"
                ) from None
            return False
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, servers: list[Server]) -> None:
        deadline = time.monotonic() + self.health_timeout_s
        pending = list(servers)
        while pending:
            for server in list(pending):
                if server.process is not None and server.process.poll() is not None:
                    raise FleetError(
                        f"SGLang server {server.index} ({server.url}) exited with code "
                        f"{server.process.returncode} while starting; log tail:\n{server.log_tail()}"
                    )
                try:
                    http_json(server.url + "/health", timeout=5, key=self.api_key)
                except (urllib.error.URLError, OSError, ValueError):
                    continue
                if not self._key_accepted(server):
                    continue
                self._drop_auth_file(server)  # SGLang read it at start
                pending.remove(server)
            if pending and time.monotonic() > deadline:
                s = pending[0]
                raise FleetError(
                    f"SGLang server {s.index} ({s.url}) not healthy after {self.health_timeout_s:.0f}s; "
                    f"log tail:\n{s.log_tail()}"
                )
            if pending:
                time.sleep(1.0)

    def stop(self) -> None:
        """Stop the servers this fleet launched (and only those)."""
        for server in self.servers:
            self._drop_auth_file(server)
            if server.process is not None and server.process.poll() is None:
                try:
                    os.killpg(server.process.pid, signal.SIGTERM)
                    server.process.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(server.process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            server.alive = False

    def load_weights(self, actor, version: int) -> None:
        """The actor's weights to every server by the path chosen at build (a collective over the
        trainer's ranks; rank 0 holds this fleet)."""
        if self.weights is None:
            raise FleetError("this fleet was built without a weight path (disk or broadcast)")
        self.weights.send(actor, self, version)

    def close(self) -> None:
        """Leave the weight group, then stop the servers this fleet launched (attached ones keep running)."""
        if self.weights is not None:
            self.weights.close()
        self.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # --- generation ----------------------------------------------------------------------------

    def _pick(self, cost: int, prefer: Optional[int] = None) -> Server:
        with self._lock:
            live = [s for s in self.servers if s.alive]
            if not live:
                raise FleetError("no SGLang server is left alive (" + ", ".join(s.url for s in self.servers) + ")")
            preferred = [s for s in live if s.index == prefer]
            server = preferred[0] if preferred else min(live, key=lambda s: (s.outstanding, s.index))
            server.outstanding += cost
            return server

    def _in_flight_bound(self) -> int:
        """max_requests_per_server for each live server: a dead server's share is not piled on the rest."""
        with self._lock:
            live = sum(s.alive for s in self.servers)
        return self.max_requests_per_server * max(1, live)

    def _release(self, server: Server, cost: int) -> None:
        with self._lock:
            server.outstanding -= cost

    def _fail(self, server: Server, reason: str) -> None:
        with self._lock:
            if not server.alive:
                return
            server.alive = False
        if server.process is None:
            log.warning("dropping attached SGLang server %s: %s", server.url, reason)
            return
        log.warning("SGLang server %d (%s) failed (%s); restarting it", server.index, server.url, reason)
        if server.restarts < self.max_restarts:
            server.restarts += 1
            threading.Thread(target=self._restart, args=(server,), daemon=True).start()

    def _restart(self, server: Server) -> None:
        try:
            if server.process is not None and server.process.poll() is None:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait(timeout=30)
            self._launch(server)
            server.alive = False  # not in rotation until healthy and on the current weights
            self.wait_healthy([server])
            if self.weights_set and self.weights_path is None:
                # the current weights came by broadcast: this server rejoins at the next push
                server.awaiting_weights = True
                return
            if self.weights_path is not None:
                self._load(server, self.weights_path, self.weight_version)
            with self._lock:
                server.alive = True
        except Exception as exc:  # noqa: BLE001 - a failed restart leaves the server out
            log.warning("restart of SGLang server %d failed: %s", server.index, exc)

    def _request(self, server: Server, prompt: list[int], params: SamplingParams) -> dict:
        payload = {
            "input_ids": prompt,
            "sampling_params": {
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_new_tokens": params.max_new_tokens,
                "stop_token_ids": list(params.stop_token_ids),
                "skip_special_tokens": False,
                "no_stop_trim": True,
            },
            "return_logprob": True,
        }
        if self.routing is not None:
            payload["return_routed_experts"] = True
        return self.call(server, "/generate", payload)

    # multi-turn rollouts call generate from one thread per trajectory (agents/rollouts.py)
    concurrent_calls = True

    def generate(
        self, prompts: list[list[int]], n: int, params: SamplingParams, prefer_server: Optional[int] = None
    ) -> list[list[Sample]]:
        """n samples per prompt; returns when every sample is done (or raises FleetError). Safe to
        call from several threads at once (the pipeline's generator and an evaluation).
        prefer_server: the index of the server to send to while it lives (a multi-turn trajectory's
        later turns go where its prefix is cached; `Sample.extra["server"]` says where one went)."""
        results: list[list[Optional[Sample]]] = [[None] * n for _ in prompts]
        queue = [(p, k) for p in range(len(prompts)) for k in range(n)]
        start, tokens = time.monotonic(), 0
        with ThreadPoolExecutor(max_workers=self.max_in_flight) as pool:
            running = {}
            while queue or running:
                while queue and len(running) < self._in_flight_bound():
                    p, k = queue.pop(0)
                    cost = len(prompts[p]) + params.max_new_tokens
                    with self._weights:  # not while weights change; the version this request starts on
                        server, version = self._pick(cost, prefer_server), self.weight_version
                        self._count(+1)
                    running[pool.submit(self._request, server, prompts[p], params)] = (p, k, server, cost, version)
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    p, k, server, cost, version = running.pop(future)
                    self._release(server, cost)
                    self._count(-1)
                    try:
                        reply = future.result()
                        results[p][k] = self._sample(reply, p, k, server, version, len(prompts[p]))
                        tokens += len(results[p][k].output_ids)
                    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
                        self._fail(server, f"{type(exc).__name__}: {exc}")
                        queue.append((p, k))  # re-sent to another server
        elapsed = time.monotonic() - start
        self.last_throughput = tokens / max(elapsed, 1e-9)
        return results  # type: ignore[return-value]

    def _count(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta

    def _sample(self, reply: dict, p: int, k: int, server: Server, version: int, prompt_tokens: int = 0) -> Sample:
        meta = reply.get("meta_info", {})
        ids = reply.get("output_ids")
        logprob_items = meta.get("output_token_logprobs") or []
        if ids is None:
            ids = [int(item[1]) for item in logprob_items]
        logprobs = [float(item[0]) for item in logprob_items] if logprob_items else None
        finish = meta.get("finish_reason") or {}
        kind = finish.get("type", "stop") if isinstance(finish, dict) else str(finish)
        served = str(meta.get("weight_version", "default"))
        # once this fleet has set the weights, a sample ends on the version it started on or a later one
        if self.weights_set and not (served.isdigit() and int(served) >= version):
            raise ValueError(
                f"SGLang server {server.url} sampled with weight version {served!r}; the request was sent "
                f"on version {version}"
            )
        sample = Sample(
            p,
            k,
            list(ids),
            logprobs,
            "length" if kind == "length" else "stop",
            version,
            {"served_version": served, "server": server.index},
        )
        if self.routing is not None:
            if meta.get("routed_experts") is None:
                raise FleetError(
                    f"SGLang server {server.url} returned no routed experts: start it with "
                    f"{SGLANG_SERVER_FLAG} (servers this fleet launches get it)"
                )
            sample.routed_experts = from_sglang(
                meta["routed_experts"], self.routing, prompt_tokens, len(ids), where=f"SGLang server {server.url}"
            )
        return sample

    # --- weights -------------------------------------------------------------------------------

    def _load(self, server: Server, path: str | Path, version: int) -> None:
        """One server loads an HF checkpoint, tagged `version`; the prefix cache is flushed."""
        reply = self.call(
            server,
            "/update_weights_from_disk",
            {"model_path": str(path), "weight_version": str(version), "flush_cache": True},
        )
        if reply.get("success") is False:
            raise FleetError(f"SGLang server {server.url} refused the weights at {path}: {reply.get('message')}")
        server.weight_version = version

    @contextmanager
    def changing_weights(self):
        """While weights change: no request is sent, and the requests running are paused on their
        servers (retracted: they continue from their tokens so far, on the new weights)."""
        with self._weights:
            with self._lock:
                paused = [s for s in self.servers if s.alive] if self.in_flight else []
            for server in paused:
                self._control(server, "/pause_generation", {"mode": "retract"})
            try:
                yield
            finally:
                for server in paused:
                    if server.alive:
                        self._control(server, "/continue_generation", {})

    def _control(self, server: Server, path: str, body: dict) -> None:
        try:
            self.call(server, path, body)
        except (urllib.error.URLError, OSError) as exc:
            self._fail(server, f"{path} failed: {exc}")

    def weights_received(self, servers: list[Server], version: int) -> None:
        """`servers` now hold weights `version` (by broadcast): all of them go (back) in rotation."""
        with self._lock:
            for server in servers:
                server.weight_version, server.awaiting_weights, server.alive = version, False, True
        self.weight_version, self.weights_path, self.weights_set = version, None, True

    def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        """Every live server loads the HF checkpoint at `path`, all at once, each within
        request_timeout_s; generation pauses meanwhile. A server that fails or does not answer in
        time is taken out (restarted if launched); a refusal is an error naming the server."""
        with self.changing_weights():
            outcome = self._on_each(
                [s for s in self.servers if s.alive],
                lambda server: self._load(server, path, version),
                self.request_timeout_s,
            )
            refused = []
            for server, error in outcome:
                if isinstance(error, FleetError):
                    refused.append(str(error))
                elif error is not None:
                    self._fail(server, f"weight update from {path} failed: {error}")
            if refused:
                raise FleetError("; ".join(refused))
            self.weight_version, self.weights_path, self.weights_set = version, path, True
            if not any(s.alive for s in self.servers):
                raise FleetError(f"no SGLang server took the weights of version {version}")

    # --- colocated: memory handed back and forth, weights from tensors -------------------------

    def release_memory(self) -> None:
        """Every live server releases its GPU memory (SGLang's /release_memory_occupation: KV cache,
        weights, CUDA graphs), all at once, each within request_timeout_s; only while no request is in
        flight (SGLang refuses otherwise). A server that fails or does not answer in time is named and
        taken out (restarted if launched; it gets the current weights at the next update)."""
        with self._weights:
            if self.in_flight:
                raise FleetError(f"{self.in_flight} request(s) in flight: the servers release memory only when idle")
            self._memory_call("/release_memory_occupation", list(MEMORY_TAGS), release=True)

    def resume_memory(self, tags: list[str]) -> None:
        """Every live server takes back the memory of `tags` it released (/resume_memory_occupation)."""
        with self._weights:
            self._memory_call("/resume_memory_occupation", tags, release=False)

    def _memory_call(self, path: str, tags: list[str], release: bool) -> None:
        def call(server: Server) -> None:
            todo = [t for t in tags if (t not in server.released) == release]
            if todo:
                self.call(server, path, {"tags": todo})
                server.released = server.released | set(todo) if release else server.released - set(todo)

        for server, error in self._on_each([s for s in self.servers if s.alive], call, self.request_timeout_s):
            if error is not None:
                self._fail(server, f"{path} {tags} failed: {error}")
        if not any(s.alive for s in self.servers):
            raise FleetError(f"no SGLang server is left after {path} {tags}")

    def update_weights_from_tensors(self, buckets, version: int) -> None:
        """Weights version `version` into every live server (and every restarted one waiting for
        weights), bucket by bucket through SGLang's /update_weights_from_tensor between
        /begin_weight_update and /end_weight_update. `buckets` yields serialized buckets (one
        MultiprocessingSerializer payload each: shared memory on CPU, CUDA IPC handles on GPUs), each
        sent to all servers before the next is made. A server that fails is named and taken out."""
        with self.changing_weights():
            if self.in_flight:
                raise FleetError(f"{self.in_flight} request(s) in flight during a weight update")
            targets = [s for s in self.servers if s.alive or s.awaiting_weights]

            def each(work, what: str) -> None:
                for server, error in self._on_each(
                    [s for s in targets if s.alive or s.awaiting_weights], work, self.request_timeout_s
                ):
                    if error is not None:
                        server.awaiting_weights = False
                        self._fail(server, f"{what} failed: {error}")

            def begin(server: Server) -> None:
                self.call(server, "/begin_weight_update", {})

            each(begin, "/begin_weight_update")
            for payload, last in buckets:

                def send(server: Server, payload=payload, last=last) -> None:
                    reply = self.call(
                        server,
                        "/update_weights_from_tensor",
                        {
                            "serialized_named_tensors": [payload] * server.tp,
                            "weight_version": str(version),
                            "flush_cache": last,
                        },
                    )
                    if reply.get("success") is False:
                        raise FleetError(f"SGLang server {server.url} refused a weight bucket: {reply.get('message')}")

                each(send, "/update_weights_from_tensor")

            def end(server: Server) -> None:
                self.call(server, "/end_weight_update", {})

            each(end, "/end_weight_update")
            done = [s for s in targets if s.alive or s.awaiting_weights]
            if not done:
                raise FleetError(f"no SGLang server took the weights of version {version}")
            self.weights_received(done, version)

    def _on_each(self, servers: list[Server], work, deadline_s: float) -> list[tuple[Server, object]]:
        """work(server) for every server at once, each in a daemon thread (a hung server's thread
        is left behind); (server, None | the exception raised | a timeout message) for each. The seconds
        after the call each began and ended go to last_calls (server index: (start, end))."""
        outcome: dict = {}
        origin = time.monotonic()
        self.last_calls = {}

        def run(server: Server) -> None:
            begin = time.monotonic() - origin
            try:
                work(server)
                outcome[server.index] = None
            except Exception as exc:  # noqa: BLE001 - reported with the server's name by the caller
                outcome[server.index] = exc
            self.last_calls[server.index] = (begin, time.monotonic() - origin)

        threads = [(s, threading.Thread(target=run, args=(s,), daemon=True)) for s in servers]
        for _, thread in threads:
            thread.start()
        end = time.monotonic() + deadline_s
        for _, thread in threads:
            thread.join(max(0.0, end - time.monotonic()))
        late = f"no answer within {deadline_s:.0f}s"
        return [(s, outcome.get(s.index, late)) for s, _ in threads]
