"""Hugging Face Hub ids as model paths: `model.path: Qwen/Qwen2.5-7B-Instruct`, `eval --model org/name`.

A value that is not a path on this machine and reads as `org/name` is a Hub id: `train`, `serve`,
`eval` and `prepare` resolve it with huggingface_hub.snapshot_download (downloaded once into
Hugging Face's cache, HF_HOME or HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses only the cache), logging
where the checkpoint came from. The dry run downloads no weights: it reads the architecture from
the id's config.json alone (fetched, or from the cache). What cannot be had (offline and not
cached, no such id, a gated model without a login) is a one-line ModelSourceError naming the id
and the fix.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

# org/name as the Hub spells repository ids: letters, digits, '-', '_', '.', no '--' or '..' runs
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"^{_PART}/{_PART}$")
WEIGHTS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]  # what a run reads


class ModelSourceError(UserError):
    """A model path that is neither a checkpoint here nor a Hub id that can be had."""

    kind = "model error"
    keep_traceback = False  # found before anything runs: the line says it all


def is_hub_id(value) -> bool:
    """Not a path on this machine, and of the form org/name."""
    if not isinstance(value, str) or Path(value).expanduser().exists():
        return False
    return bool(HUB_ID.match(value)) and ".." not in value and "--" not in value


def _fix(repo: str) -> str:
    return (
        f"download it where there is internet (`huggingface-cli download {repo}`, or `real-megatron prepare`) "
        "and copy the Hugging Face cache (HF_HOME) here, or give a local checkpoint directory"
    )


def _hub_error(repo: str, exc: Exception, what: str) -> ModelSourceError:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return ModelSourceError(
            f"{what} {repo}: a gated model on the Hugging Face Hub; accept its terms on "
            f"https://huggingface.co/{repo} and log in (`huggingface-cli login`), or give a local checkpoint directory"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelSourceError(
            f"{what} {repo}: no such directory here, and no such model on the Hugging Face Hub (or it is "
            "private: `huggingface-cli login`); give a local checkpoint directory or a Hub id such as Qwen/Qwen3-8B"
        )
    if isinstance(exc, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return ModelSourceError(
            f"{what} {repo}: no such directory here; as a Hugging Face Hub id it is not in the cache "
            f"({constants.HF_HUB_CACHE}) and {why}; {_fix(repo)}"
        )
    return ModelSourceError(
        f"{what} {repo}: the Hugging Face Hub download failed ({type(exc).__name__}: {exc}); {_fix(repo)}"
    )


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hub's host answers within timeout_s (huggingface_hub itself retries a dead network
    for half a minute); True behind a proxy, which is left to huggingface_hub."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True
    except OSError:
        return False


def resolve_model(value: str, what: str = "model.path") -> str:
    """A local checkpoint directory for `value`: itself unless it is a Hub id, whose snapshot is
    downloaded once into Hugging Face's cache (or found there)."""
    if not is_hub_id(value):
        return value
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelSourceError(
            f"{what} {value}: a Hub id needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    try:
        path = snapshot_download(repo_id=value, allow_patterns=WEIGHTS, local_files_only=not hub_reachable())
    except Exception as exc:  # noqa: BLE001 - every failure is said as one line with the fix
        raise _hub_error(value, exc, what) from exc
    if not (Path(path) / "config.json").exists():
        raise ModelSourceError(f"{what} {value}: the Hub snapshot {path} has no config.json: not a transformers model")
    log.info("%s %s: the Hugging Face Hub snapshot in %s", what, value, path)
    return path


def hub_config_json(value: str, *, fetch: bool) -> tuple[Path | None, str]:
    """A Hub id's config.json (nothing else: no weights) and where it came from: from the cache, or
    fetched when `fetch`; (None, why not) where it cannot be had."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None, "huggingface_hub is not installed"
    cached = try_to_load_from_cache(value, "config.json")
    if isinstance(cached, str):
        return Path(cached), f"{value}'s config.json in the Hugging Face cache"
    if not fetch or not hub_reachable():
        return None, f"{value}'s config.json is not in the Hugging Face cache" + (
            "" if not fetch else " and the Hugging Face Hub cannot be reached"
        )
    try:
        return Path(hf_hub_download(value, "config.json")), f"{value}'s config.json from the Hugging Face Hub"
    except Exception as exc:  # noqa: BLE001
        return None, str(_hub_error(value, exc, "model.path"))
