"""The run's fleet key, and a run directory only the job's user can read.

Every SGLang server the project starts requires a bearer key (SGLang's --api-key: every endpoint
but /health*, /ready* and /metrics answers 401 without it), and every request the fleet sends
carries it. A run's key is a random secret in RUN_DIR/fleet_api_key (mode 0600), made once, when
the run directory is, and kept across requeues; or the file a user names in rollout.api_key_file
(servers started elsewhere with that key). The key reaches SGLang in a 0600 YAML file
(`--config`), never on its command line, which every user of the node can read in /proc.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Optional

from ..config import ConfigError

KEY_FILE = "fleet_api_key"
PRIVATE_UMASK = 0o077  # files the trainer and the servers write: weights, registry, logs, checkpoints


class KeyFileError(ConfigError):
    """The key file is missing, empty, malformed or readable by others (the message names it)."""


def private_files() -> None:
    """What this process (and its children) creates from now on is readable by its user only."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: str | Path) -> Path:
    """`path` made (if need be) and closed to group and others, whatever the umask was."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def new_key() -> str:
    # 256 bits in hex: no quoting in a header or YAML, and never a leading "-", which SGLang's
    # argument parser (its --config file becomes "--api-key VALUE") would read as another flag
    return secrets.token_hex(32)


def run_key_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / KEY_FILE


def ensure_run_key(run_dir: str | Path) -> Path:
    """RUN_DIR/fleet_api_key, made if it is not there. The trainer, `serve` steps and `launch` may
    start together: the key is written aside and linked into place, so one writer wins and no
    reader ever sees an empty file."""
    path = run_key_path(run_dir)
    if path.exists():
        return path
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=run_dir)  # mode 0600
    try:
        os.write(fd, (new_key() + "\n").encode())
        os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs is the key
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return path


def read_key_file(path: str | Path) -> str:
    """The key in `path`; KeyFileError naming the file if it cannot be the run's key."""
    path = Path(path)
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"fleet key file {path}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"fleet key file {path}: not a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"fleet key file {path}: mode {stat.S_IMODE(info.st_mode):04o} lets other users read it; chmod 600 {path}"
        )
    key = text.strip()
    if not key or any(c.isspace() for c in key) or not key.isprintable():
        raise KeyFileError(
            f"fleet key file {path}: expected one line with the key (no spaces), "
            f"found {'nothing' if not key else 'more'}"
        )
    if key.startswith("-"):
        raise KeyFileError(
            f"fleet key file {path}: the key starts with '-', which SGLang's argument parser "
            "reads as a flag; use another key (e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return key


def key_file_of(cfg) -> Path:
    """rollout.api_key_file, else RUN_DIR/fleet_api_key."""
    return Path(cfg.rollout.api_key_file) if cfg.rollout.api_key_file else run_key_path(cfg.train.output_dir)


def fleet_key(cfg, create: bool = True) -> tuple[Optional[str], Optional[Path]]:
    """(key, its file) for a run with the SGLang fleet; (None, None) without one. The run's own
    key is made on first use (`create`); a file the user named must already exist."""
    if cfg.rollout.backend != "sglang":
        return None, None
    path = key_file_of(cfg)
    if create and not cfg.rollout.api_key_file:
        ensure_run_key(cfg.train.output_dir)
    return read_key_file(path), path


def server_auth_file(key: str, directory: Optional[str | Path] = None) -> Path:
    """A 0600 YAML file with the key, for `sglang.launch_server --config` (JSON is YAML)."""
    fd, name = tempfile.mkstemp(prefix="sglang-auth-", suffix=".yaml", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"api-key": key}) + "\n")  # the flag's spelling: SGLang adds "--" + key
    return Path(name)


def auth_headers(key: Optional[str]) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def private_run(cfg, check_key: bool = True) -> None:
    """At a process's start: its files private (a new run directory too), and (with the fleet)
    the run's key made or the user's key file checked, so a wrong one stops the run now."""
    private_files()
    Path(cfg.train.output_dir).mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing one keeps its mode
    if check_key:
        fleet_key(cfg)
