"""Where SGLang's own Python lives (it needs its own torch; see tools/install_sglang.sh)."""

from __future__ import annotations

import os
from pathlib import Path

SGLANG_VERSION = "0.5.23"


def default_server_python() -> str:
    """$REAL_MEGATRON_SGLANG_PYTHON, else the environment tools/install_sglang.sh made, else python3."""
    explicit = os.environ.get("REAL_MEGATRON_SGLANG_PYTHON")
    if explicit:
        return explicit
    cache = Path(
        os.environ.get(
            "REAL_MEGATRON_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "real-megatron"
        )
    )
    candidate = cache / f"venv-sglang-{SGLANG_VERSION}" / "bin" / "python"
    return str(candidate) if candidate.exists() else "python3"
