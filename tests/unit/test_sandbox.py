"""The python tool's sandbox refuses what docs/agents.md says it refuses: the network, files outside
its directory (the private /tmp, home directories and the run's directory are empty mounts), the
caller's environment, processes (fork bombs), memory, CPU and wall clock past their limits, huge
output; state persists between cells; a SandboxFusion-style server behind the same tool."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from real_megatron.agents.sandbox import LocalSandbox, RemoteSandbox


def run_cells(cells, **kwargs):
    """Each cell's result, in one interpreter; the sandbox's isolation."""

    async def go():
        box = LocalSandbox(**{"timeout_s": 5.0, "cpu_s": 2.0, "memory_mb": 512, **kwargs})
        try:
            return [await box.run(code) for code in cells], box.isolation_used
        finally:
            await box.close()

    return asyncio.run(go())


def namespaces_available() -> bool:
    return run_cells(["1"], isolation="auto")[1] == "namespaces"


NAMESPACES = namespaces_available()
MODES = ["process"] + (["namespaces"] if NAMESPACES else [])


@pytest.mark.parametrize("isolation", MODES)
def test_escapes_are_refused(isolation, tmp_path, monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    monkeypatch.setenv("REAL_MEGATRON_TEST_SECRET", "s3cret")
    cells = [
        f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)",  # network
        "import os; bomb = 0\nwhile True:\n    os.fork(); bomb += 1",  # a fork bomb
        "import subprocess; subprocess.run(['true'])",
        "import ctypes; ctypes.CDLL('libc.so.6').fork()",  # around the hook, through C
        "import _posixsubprocess; _posixsubprocess.fork_exec()",  # subprocess's fork, which has no audit event
        "b = bytearray(2 * 1024**3)",  # memory
        "print('x' * 10**6)",  # huge output
        "import os; sorted(os.listdir('.')), os.environ.get('REAL_MEGATRON_TEST_SECRET'), os.environ['HOME']",
        "import os; os.kill(os.getppid(), 9)",
        "bomb",  # the interpreter lived through all of it
    ]
    (net, fork, spawn, dl, raw, memory, huge, env, kill, alive), used = run_cells(
        cells, isolation=isolation, max_output=300
    )
    listener.close()
    assert used == isolation
    assert net.error and "PermissionError: the sandbox does not allow the network" in net.output
    assert fork.error and "does not allow starting processes (os.fork)" in fork.output
    assert spawn.error and "starting processes (subprocess.Popen)" in spawn.output
    assert dl.error and "loading libraries through ctypes" in dl.output
    assert raw.error and "starting processes (_posixsubprocess.fork_exec)" in raw.output
    assert memory.error and "MemoryError" in memory.output
    assert huge.output == "x" * 150 + f"\n... ({10**6 + 1 - 300} characters cut) ...\n" + "x" * 149 + "\n"
    files, secret, home = eval(env.output)  # the cell's last expression, printed as repr
    assert files == [] and secret is None and home in ("/tmp", os.path.realpath(home))
    assert kill.error and "signalling processes" in kill.output
    assert alive.output == "0\n"


@pytest.mark.skipif(not NAMESPACES, reason="the kernel refuses namespaces here: the process mode is tested alone")
def test_namespaces_hide_the_host(tmp_path):
    """Below the audit hook: the kernel itself leaves no network, no other process, no caller files."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    cells = [
        "print(open('/proc/net/dev').read())",  # the network namespace's interfaces
        "import os; sorted(p for p in os.listdir('/proc') if p.isdigit()), os.getpid()",
        f"open({str(secret)!r}).read()",
        "import os; os.listdir('/home'), os.listdir(os.path.expanduser('~'))",
        f"import os; os.path.exists({os.getcwd()!r} + '/real_megatron')",  # the caller's directory
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)",
        "open('note.txt', 'w').write('kept'); open('note.txt').read()",
    ]
    (net, procs, read, homes, caller, limits, write), used = run_cells(cells, isolation="namespaces")
    assert used == "namespaces"
    interfaces = [line.split(":")[0].strip() for line in net.output.splitlines()[2:] if line.strip()]
    assert interfaces == ["lo"], net.output
    assert procs.output == "(['1'], 1)\n"
    assert read.error and "FileNotFoundError" in read.output
    assert homes.output == "([], [])\n"
    assert caller.output == "False\n"
    assert limits.error and "not allowed to raise maximum limit" in limits.output
    assert write.output == "'kept'\n"


def test_limits_wall_clock_and_state():
    start = time.monotonic()
    results, _ = run_cells(
        ["x = 41", "while True: pass", "x + 1", "import time; time.sleep(60)", "x"], timeout_s=1.5, cpu_s=0.5
    )
    cpu, kept, wall, lost = results[1:]
    assert cpu.timed_out and "CPU time limit reached" in cpu.output
    assert kept.output == "42\n"  # the CPU limit stops the cell, not the interpreter
    assert wall.timed_out and wall.output.startswith("Timed out after 1.5 s")
    assert "interpreter was restarted" in lost.output and "NameError" in lost.output
    assert time.monotonic() - start < 6


class SandboxFusion(BaseHTTPRequestHandler):
    """A stand-in for SandboxFusion's /run_code: runs the code with this Python, with its timeout."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/run_code" and body["language"] == "python"
        try:
            done = subprocess.run(
                [sys.executable, "-c", body["code"]], capture_output=True, text=True, timeout=body["run_timeout"]
            )
            run = {"status": "Finished", "return_code": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        except subprocess.TimeoutExpired:
            run = {"status": "TimeLimitExceeded", "return_code": None, "stdout": "", "stderr": ""}
        data = json.dumps({"status": "Success", "run_result": run}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_remote_sandbox_replays_earlier_cells():
    server = ThreadingHTTPServer(("127.0.0.1", 0), SandboxFusion)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def go():
        box = RemoteSandbox(f"http://127.0.0.1:{server.server_port}", timeout_s=1.0)
        cells = ["print('once'); x = 20", "x + 1", "x / 0", "print(x * 2)", "import time; time.sleep(5)"]
        return [await box.run(c) for c in cells]

    try:
        first, second, failed, third, slow = asyncio.run(go())
    finally:
        server.shutdown()
    assert first.output == "once\n" and second.output == "21\n"  # earlier cells replayed silently
    assert failed.error and "ZeroDivisionError" in failed.output
    assert third.output == "40\n"  # the failed cell is not replayed
    assert slow.timed_out and slow.output.startswith("Timed out")
    down = asyncio.run(RemoteSandbox("http://127.0.0.1:9", timeout_s=0.5).run("1"))
    assert down.error and "did not answer" in down.output
