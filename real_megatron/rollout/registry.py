"""Servers started outside the trainer (a Slurm job step) announce themselves in a directory.

Each server writes `<name>.json` ({"url", "host", "pid", "model_path"}: no secret) atomically once
it is healthy; the trainer waits, with a deadline, until the expected number are there and answer
/health. A job that restarts (requeue) clears the directory first, so no stale URL survives. The
directory is the job user's alone (0700): a URL written there is the one the trainer sends its key to.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
from pathlib import Path

from .fleet_auth import private_dir
from .sglang_fleet import FleetError, http_json


def register_server(directory: str | Path, name: str, url: str, **info) -> Path:
    path = private_dir(directory) / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"url": url, **info}))
    os.replace(tmp, path)  # readers never see half a file
    return path


def unregister_server(directory: str | Path, name: str) -> None:
    (Path(directory) / f"{name}.json").unlink(missing_ok=True)


def registered_urls(directory: str | Path) -> list[str]:
    entries = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            entries.append(json.loads(path.read_text())["url"])
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now; the next poll sees it
    return entries


def wait_for_servers(
    directory: str | Path, count: int, timeout_s: float, poll_s: float = 1.0, key: str | None = None
) -> list[str]:
    """URLs of `count` registered servers that answer /health (open to all; `key` is sent anyway);
    FleetError naming what is missing."""
    deadline = time.monotonic() + timeout_s
    while True:
        urls = registered_urls(directory)
        healthy = []
        for url in urls:
            try:
                http_json(url + "/health", timeout=5, key=key)
                healthy.append(url)
            except (urllib.error.URLError, OSError, ValueError):
                pass
        if len(healthy) >= count:
            return healthy[:count] if len(healthy) == count else healthy
        if time.monotonic() > deadline:
            raise FleetError(
                f"waited {timeout_s:.0f}s for {count} SGLang server(s) to register in {directory}: "
                f"{len(urls)} registered ({', '.join(urls) or 'none'}), {len(healthy)} healthy. "
                f"See the fleet's logs beside the trainer's."
            )
        time.sleep(poll_s)
