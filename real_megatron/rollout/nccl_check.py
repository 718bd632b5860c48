"""One NCCL on both sides of the weight broadcast (rollout.weight_sync: distributed).

SGLang runs in its own environment with its own torch (tools/install_sglang.sh), the trainer keeps
the cluster's; NCCL refuses a communicator whose ranks run different NCCL versions ("Mismatched
NCCL version"), and the weight group is created lazily, so a mismatch would stop a run at its first
broadcast. The versions are compared at start and in --dry-run, from what each side's torch
reports: `torch.cuda.nccl.version()`, asked of the SGLang environment's python in a subprocess.

A trainer whose torch has no NCCL (a CPU build) broadcasts over gloo: nothing to compare. The
SGLang environment's CUDA build reports its NCCL on any machine, GPU or not.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Optional

from ..config import Config

QUERY = (
    "import json, torch\n"
    "v = torch.cuda.nccl.version() if torch.version.cuda else None\n"
    "print(json.dumps({'torch': torch.__version__, 'nccl': list(v) if v else None}))"
)


@dataclass(frozen=True)
class TorchBuild:
    python: str  # the interpreter it was asked of
    torch: str
    nccl: Optional[tuple[int, ...]]  # None: a build without NCCL (CPU)

    def describe(self) -> str:
        nccl = ".".join(map(str, self.nccl)) if self.nccl else "no NCCL (CPU build)"
        return f"torch {self.torch}, NCCL {nccl} ({self.python})"


def query_build(python: str, timeout_s: float = 120.0) -> TorchBuild:
    """What `python`'s torch reports (a subprocess: the trainer never imports the other torch)."""
    try:
        out = subprocess.run([python, "-c", QUERY], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"could not ask {python} for its torch and NCCL versions: {err}") from err
    if out.returncode != 0:
        raise RuntimeError(f"{python} could not report its torch and NCCL versions:\n{out.stderr[-1500:]}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    return TorchBuild(python, found["torch"], tuple(found["nccl"]) if found["nccl"] else None)


def this_build() -> TorchBuild:
    """The trainer's own torch (imported), NCCL only where CUDA runs: else the group is gloo."""
    import sys

    import torch

    nccl = tuple(torch.cuda.nccl.version()) if torch.version.cuda and torch.cuda.is_available() else None
    return TorchBuild(sys.executable, torch.__version__, nccl)


def nccl_mismatch(trainer: TorchBuild, server: TorchBuild) -> str | None:
    """The refusal, with its fix, when the two sides of an NCCL weight group would disagree; None when fine."""
    if trainer.nccl is None or trainer.nccl == server.nccl:
        return None
    return (
        "rollout.weight_sync=distributed broadcasts the weights over NCCL between the trainer "
        f"({trainer.describe()}) and the SGLang servers ({server.describe()}); NCCL refuses a "
        "communicator whose ranks run different versions ('Mismatched NCCL version'), at the first "
        "broadcast. Fix: rollout.weight_sync=disk, or one NCCL in both (e.g. install the trainer's "
        "NCCL into SGLang's environment: pip install nvidia-nccl-cu12==<the trainer's version>, or "
        "point rollout.server_python at an SGLang environment built on the trainer's torch)"
    )


def server_build(cfg: Config) -> TorchBuild:
    from .sglang_env import default_server_python

    return query_build(cfg.rollout.server_python or default_server_python())


def check_weight_sync_nccl(
    cfg: Config, trainer: TorchBuild, server: TorchBuild | None = None
) -> tuple[str, str | None]:
    """(what was compared, the refusal or None) for a run whose weights go by broadcast; the
    servers' build is asked of their python unless given (not at all for a gloo group at start)."""
    if trainer.nccl is None and server is None:
        return f"trainer {trainer.describe()}: the weight group uses gloo, no NCCL to match", None
    server = server or server_build(cfg)
    compared = f"trainer {trainer.describe()}; servers {server.describe()}"
    if trainer.nccl is None:
        return compared + ": the weight group uses gloo, no NCCL to match", None
    return compared, nccl_mismatch(trainer, server)
