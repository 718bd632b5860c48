"""The python tool's sandbox: a persistent interpreter per trajectory, in a process of its own
(sandbox_worker.py says what isolates it), or a SandboxFusion server (`rollout.sandbox_url`).

State: a trajectory's cells share one interpreter, so a later cell sees the variables of earlier
ones (a notebook). A cell that runs past its wall clock (`rollout.tool_timeout_s`) kills the
interpreter, and the next cell starts a fresh one (the model is told its state is lost). With a
remote sandbox, which keeps nothing between requests, each request replays the trajectory's earlier
cells that ran without error, their output discarded, before the new cell.

What happens on failure: nothing raises to the caller. A cell that fails, times out or cannot start
returns text for the model, with `timed_out` set for the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("sandbox_worker.py")
START_TIMEOUT_S = 30.0
CPU_TOTAL_FACTOR = 16  # a trajectory's interpreter may spend this many cells' CPU seconds in all
MAX_PROCESSES = 32  # RLIMIT_NPROC inside a user namespace of its own (threads count)
DISK_MB = 64  # the private /tmp (tmpfs) and the largest file the code may write
_fallback_logged = False


@dataclass
class CellResult:
    output: str  # what the model reads: printed output, the value of a final expression, errors
    error: bool = False  # the cell raised, or could not run
    timed_out: bool = False  # wall clock or CPU limit


def cut(text: str, limit: int) -> str:
    """`text` within `limit` characters: its first and last halves, with a mark where it was cut."""
    if len(text) <= limit:
        return text
    half = max(1, limit // 2)
    return f"{text[:half]}\n... ({len(text) - 2 * half} characters cut) ...\n{text[-half:]}"


def interpreter_dirs() -> list[str]:
    """The directories the interpreter needs visible inside the sandbox (its prefixes and libraries)."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    dirs.add(str(Path(os.path.realpath(sys.executable)).parent.parent))
    dirs.update(p for p in sys.path if p and os.path.isdir(p) and "site-packages" in p)
    return sorted(d for d in dirs if d)


class LocalSandbox:
    """One trajectory's interpreter, started at its first cell; `close()` ends it."""

    def __init__(
        self,
        timeout_s: float = 10.0,
        cpu_s: float = 10.0,
        memory_mb: int = 1024,
        isolation: str = "auto",
        max_output: int = 4000,
        hide: Optional[list[str]] = None,
    ):
        self.timeout_s, self.cpu_s, self.memory_mb = timeout_s, cpu_s, memory_mb
        self.isolation, self.max_output = isolation, max_output
        self.hide = list(hide) if hide is not None else [os.getcwd()]
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.workdir: Optional[str] = None
        self.isolation_used: Optional[str] = None
        self._lock = asyncio.Lock()
        self._state_lost = False  # the last interpreter was killed: the next cell is told

    def _settings(self) -> dict:
        return {
            "isolation": self.isolation,
            "memory_mb": self.memory_mb,
            "cpu_total_s": max(1, int(self.cpu_s * CPU_TOTAL_FACTOR)),
            "disk_mb": DISK_MB,
            "max_processes": MAX_PROCESSES,
            "max_output": self.max_output,
            "keep": interpreter_dirs(),
            "hide": self.hide,
        }

    async def _start(self) -> Optional[str]:
        """Starts the interpreter; an error text if it cannot."""
        global _fallback_logged
        self.workdir = tempfile.mkdtemp(prefix="real-megatron-sandbox-")
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.workdir,
            "TMPDIR": self.workdir,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            str(WORKER),
            json.dumps(self._settings()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=self.workdir,
            env=env,
            start_new_session=True,
            limit=2**20 + 8 * self.max_output,
        )
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)
            ready = json.loads(line) if line else {"error": "the interpreter exited at start"}
        except (TimeoutError, ValueError) as exc:
            ready = {"error": f"the interpreter did not start within {START_TIMEOUT_S:.0f} s ({exc!r})"}
        if not ready.get("ready"):
            await self._kill()
            return str(ready.get("error"))
        self.isolation_used = ready["isolation"]
        if self.isolation == "auto" and self.isolation_used != "namespaces" and not _fallback_logged:
            _fallback_logged = True
            log.warning(
                "python tool: namespaces unavailable (%s); the sandbox runs with process limits only "
                "(no network isolation beyond the audit hook): docs/agents.md#the-python-sandbox",
                ready.get("why"),
            )
        return None

    async def run(self, code: str) -> CellResult:
        async with self._lock:  # one interpreter: cells of a turn run in the order they were called
            restarted = ""
            if self.proc is None or self.proc.returncode is not None:
                if self.proc is not None or self._state_lost:
                    restarted = "(the interpreter was restarted: variables from earlier cells are gone)\n"
                    await self._kill()
                self._state_lost = False
                error = await self._start()
                if error is not None:
                    return CellResult(f"the python sandbox could not start: {error}", error=True)
            try:
                self.proc.stdin.write((json.dumps({"code": code, "cpu_s": self.cpu_s}) + "\n").encode())
                await self.proc.stdin.drain()
                line = await asyncio.wait_for(self.proc.stdout.readline(), self.timeout_s)
                if not line:
                    raise ConnectionError("the interpreter exited")
                reply = json.loads(line)
            except TimeoutError:
                await self._kill()
                self._state_lost = True
                return CellResult(
                    f"{restarted}Timed out after {self.timeout_s:g} s: the cell was stopped and the interpreter "
                    "restarted (variables from earlier cells are gone)",
                    error=True,
                    timed_out=True,
                )
            except (ConnectionError, OSError, ValueError) as exc:
                code_ = self.proc.returncode if self.proc else None
                await self._kill()
                self._state_lost = True
                why = "killed by its CPU limit" if code_ in (-signal.SIGXCPU, -signal.SIGKILL) else f"{exc}"
                return CellResult(
                    f"{restarted}The interpreter died ({why}); the next cell starts a fresh one",
                    error=True,
                    timed_out=code_ in (-signal.SIGXCPU, -signal.SIGKILL),
                )
            output = reply["output"]
            timed_out = "CPU time limit reached" in output and reply["error"]
            return CellResult(restarted + output, error=reply["error"], timed_out=timed_out)

    async def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: the interpreter and what it started
            except ProcessLookupError:
                pass
            await proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    async def close(self) -> None:
        await self._kill()

    def __del__(self):  # a trajectory that was never closed: end its interpreter anyway
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


_REPLAY = """import ast as _ast, contextlib as _cl, io as _io
def _cell(_src):
    _tree = _ast.parse(_src, "<cell>", "exec")
    _last = _tree.body.pop() if _tree.body and isinstance(_tree.body[-1], _ast.Expr) else None
    exec(compile(_tree, "<cell>", "exec"), globals())
    if _last is not None:
        _value = eval(compile(_ast.Expression(_last.value), "<cell>", "eval"), globals())
        if _value is not None:
            print(repr(_value))
with _cl.redirect_stdout(_io.StringIO()), _cl.redirect_stderr(_io.StringIO()):
    for _src in {earlier!r}:
        _cell(_src)
_cell({code!r})
"""


class RemoteSandbox:
    """SandboxFusion's `POST /run_code` (github.com/bytedance/SandboxFusion): stateless, so each
    request replays the trajectory's earlier cells that ran without error, their output discarded."""

    def __init__(self, url: str, timeout_s: float = 10.0, memory_mb: int = 1024, max_output: int = 4000):
        self.url = url.rstrip("/") + "/run_code"
        self.timeout_s, self.memory_mb, self.max_output = timeout_s, memory_mb, max_output
        self.cells: list[str] = []
        self.isolation_used = "remote"

    def _post(self, body: dict) -> dict:
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s + 10) as response:
            return json.loads(response.read())

    async def run(self, code: str) -> CellResult:
        program = _REPLAY.format(earlier=self.cells, code=code)
        body = {"code": program, "language": "python", "run_timeout": self.timeout_s, "memory_limit_MB": self.memory_mb}
        try:
            reply = await asyncio.to_thread(self._post, body)
        except Exception as exc:  # noqa: BLE001 - the sandbox service's trouble is the model's error message
            return CellResult(f"the python sandbox at {self.url} did not answer: {exc}", error=True)
        run = reply.get("run_result") or {}
        status = run.get("status") or reply.get("status")
        output = (run.get("stdout") or "") + (run.get("stderr") or "")
        if status == "TimeLimitExceeded":
            return CellResult(f"Timed out after {self.timeout_s:g} s: the cell was stopped", True, True)
        error = status != "Finished" or run.get("return_code") not in (0, None)
        if not error:
            self.cells.append(code)
        if not run and reply.get("message"):
            output += str(reply["message"])
        output = cut(output, self.max_output)
        return CellResult(output, error=error)

    async def close(self) -> None:
        self.cells = []
