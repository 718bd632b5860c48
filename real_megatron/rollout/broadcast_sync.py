"""Weight sync by broadcast (rollout.weight_sync: distributed): trainer rank 0 sends every bucket
of HF tensors straight into the servers' memory over a process group of its own.

The group is rank 0 of the trainer plus every rank of every server (a server of tp T holds T
ranks, offsets in order). Per bucket, each server is told what is coming
(/update_weights_from_distributed: names, dtypes, shapes, version) while rank 0 broadcasts the
tensors in the same order; the prefix cache is flushed with the last bucket. NCCL between GPUs,
gloo on CPU (which is how it is tested here, against real SGLang CPU servers).

Membership is fixed per group: when a server died or came back since the last push, the group is
torn down and made again with the servers that are up, before the next push; a restarted server
is back in rotation only once it has the current weights. A server that dies during a broadcast
makes that push fail with an error naming it (the trainer's checkpoint and requeue take over).

What is protected and what is not: only a holder of the fleet's key can tell a server to join a
group, where, and to take a bucket (every call here carries it). The group itself is torch's: its
rendezvous is an unauthenticated TCP store on the trainer's address and a fresh port, open from
when the servers are told until every rank has joined (seconds); a process that reaches that port
first could take a server's rank. NCCL wants NCCL_CUMEM_ENABLE equal on every rank: SGLang sets 0,
and so does the trainer when this sync is configured (engine_setup.trainer_fleet_environment).
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import urllib.error
from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..actor.distributed import free_port
from ..convert.export import iter_buckets
from .sglang_fleet import FleetError, Server, SGLangFleet

log = logging.getLogger(__name__)
GROUP_NAME = "real_megatron_weights"


def new_group(backend: str, address: str, port: int, world_size: int, rank: int, group_name: str, timeout_s: float):
    """A process group apart from torch's default one (the trainer's), as SGLang makes its side."""
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{address}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size, rank, [], backend, PrefixStore(group_name, store), group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Calls:
    """The same HTTP call to several servers at once, each in a thread; errors collected."""

    def __init__(self, fleet: SGLangFleet, calls: list[tuple[Server, str, dict]], timeout_s: float):
        self.fleet, self.errors = fleet, []
        self.threads = [
            threading.Thread(target=self._call, args=(s, path, body, timeout_s), daemon=True) for s, path, body in calls
        ]
        for thread in self.threads:
            thread.start()

    def _call(self, server: Server, path: str, body: dict, timeout_s: float) -> None:
        try:
            reply = self.fleet.call(server, path, body, timeout=timeout_s)
            if reply.get("success") is False:
                self.errors.append(f"{server.url}{path}: {reply.get('message')}")
        except urllib.error.HTTPError as exc:  # SGLang answers a refusal with 400 and a message
            self.errors.append(f"{server.url}{path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}")
        except Exception as exc:  # noqa: BLE001 - reported with the server's name below
            self.errors.append(f"{server.url}{path}: {type(exc).__name__}: {exc}")

    def failed_early(self) -> bool:
        """A server refused before the broadcast: sending would wait for a receiver that is not there."""
        return bool(self.errors)

    def join(self, what: str, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))
        if any(t.is_alive() for t in self.threads):
            self.errors.append(f"no answer within {deadline_s:.0f}s")
        if self.errors:
            raise FleetError(f"{what} failed: " + "; ".join(self.errors))


class BroadcastWeightSync:
    def __init__(
        self,
        fleet: SGLangFleet,
        *,
        address: str = "127.0.0.1",
        backend: str | None = None,
        bucket_bytes: int = 512 * 2**20,
        timeout_s: float = 600.0,
    ):
        self.fleet, self.address, self.bucket_bytes, self.timeout_s = fleet, address, bucket_bytes, timeout_s
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        )
        self.group = None
        self.members: list[Server] = []
        self.membership: list[tuple[int, int]] = []  # (server, restarts) of the group's members
        self.pushes = 0

    # --- the group -------------------------------------------------------------------------------

    def _wanted(self) -> list[Server]:
        return [s for s in self.fleet.servers if s.alive or s.awaiting_weights]

    @staticmethod
    def _key(servers: list[Server]) -> list[tuple[int, int]]:
        return [(s.index, s.restarts) for s in servers]  # a restarted server is a new process

    def _server_tp(self, server: Server) -> int:
        try:
            return int(self.fleet.call(server, "/get_server_info", timeout=30).get("tp_size", server.tp))
        except (OSError, ValueError):
            return server.tp

    def connect(self) -> None:
        self.close()
        members = self._wanted()
        if not members:
            raise FleetError("no SGLang server is up to receive weights")
        sizes = [self._server_tp(s) for s in members]
        world = 1 + sum(sizes)
        port = free_port(self.address)
        offsets = [1 + sum(sizes[:i]) for i in range(len(members))]
        calls = _Calls(
            self.fleet,
            [
                (
                    s,
                    "/init_weights_update_group",
                    {
                        "master_address": self.address,
                        "master_port": port,
                        "rank_offset": offset,
                        "world_size": world,
                        "group_name": GROUP_NAME,
                        "backend": self.backend,
                    },
                )
                for s, offset in zip(members, offsets)
            ],
            self.timeout_s,
        )
        self.group = new_group(self.backend, self.address, port, world, 0, GROUP_NAME, self.timeout_s)
        calls.join(f"joining the weight group ({self.backend}, {self.address}:{port}, {world} ranks)", self.timeout_s)
        self.members, self.membership = members, self._key(members)
        log.info("weight broadcast group: %d server(s), %d ranks, %s", len(members), world, self.backend)

    def close(self) -> None:
        if self.group is None:
            return
        live = [s for s in self.members if s.alive]
        try:
            _Calls(
                self.fleet, [(s, "/destroy_weights_update_group", {"group_name": GROUP_NAME}) for s in live], 60
            ).join("leaving the weight group", 60)
        except FleetError as exc:
            log.warning("%s", exc)
        dist.destroy_process_group(self.group)
        self.group, self.members, self.membership = None, [], []

    # --- pushing weights -----------------------------------------------------------------------

    def _session(self, path: str) -> bool:
        """SGLang >= 0.5.2x brackets updates in begin/end_weight_update; older servers lack them."""
        try:
            _Calls(self.fleet, [(s, path, {}) for s in self.members], self.timeout_s).join(path, self.timeout_s)
            return True
        except FleetError as exc:
            if "HTTP 404" in str(exc):
                return False
            raise

    def push(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int, dtype: torch.dtype) -> int:
        """Every tensor to every server; returns the bytes sent. Generation pauses meanwhile."""
        with self.fleet.changing_weights():
            if self.group is None or self._key(self._wanted()) != self.membership:
                self.connect()
            session = self._session("/begin_weight_update")
            sent = 0
            buckets = iter_buckets(((n, t.to(dtype)) for n, t in tensors), self.bucket_bytes)
            bucket = next(buckets, None)
            while bucket is not None:
                following = next(buckets, None)  # look ahead: the last bucket flushes the cache
                body = {
                    "names": [n for n, _ in bucket],
                    "dtypes": [_dtype_name(t.dtype) for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket],
                    "group_name": GROUP_NAME,
                    "flush_cache": following is None,
                    "weight_version": str(version),
                }
                calls = _Calls(
                    self.fleet, [(s, "/update_weights_from_distributed", body) for s in self.members], self.timeout_s
                )
                time.sleep(0.01)  # a refusal comes back at once: do not start a broadcast nobody receives
                if calls.failed_early():
                    calls.join(f"weights version {version}", self.timeout_s)
                for _, tensor in bucket:
                    payload = tensor.to(self.device).contiguous()
                    dist.broadcast(payload, src=0, group=self.group)
                    sent += payload.numel() * payload.element_size()
                calls.join(f"weights version {version}", self.timeout_s)
                bucket = following
            if session:
                self._session("/end_weight_update")
            self.fleet.weights_received(self.members, version)
            self.pushes += 1
            return sent
