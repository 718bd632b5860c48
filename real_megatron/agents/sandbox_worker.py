"""The python tool's interpreter: one process per trajectory, run as a plain script by sandbox.py
(`python -I sandbox_worker.py SETTINGS_JSON`), importing nothing of the caller's.

Start-up, before any model code runs:
1. namespaces (isolation "namespaces", or "auto" where the kernel allows them): a network
   namespace with no interface up (no network, loopback included), a PID namespace (the
   interpreter is its process 1: it sees no other process, and every process it starts dies with
   it), a mount namespace with a fresh /proc, an empty size-limited tmpfs as /tmp and working
   directory, and empty tmpfs over the home directories, /run, /var/tmp, /dev/shm, /mnt and the
   caller's extra paths (the interpreter's own directories stay visible, read-only). Then a user
   namespace on top drops every capability the process had outside: the mounts are locked
   (cannot be undone) and the hard limits below cannot be raised, even by root.
2. limits: address space (RLIMIT_AS), CPU seconds per cell (RLIMIT_CPU's soft limit, a
   trajectory's total as its hard limit), file size, open files, no core files, and processes
   (RLIMIT_NPROC; the kernel does not enforce it for uid 0).
3. an audit hook (PEP 578) refuses, from Python: process creation (fork, exec, spawn, system,
   subprocess, _posixsubprocess), sockets (connect, bind, sendto), signals to other processes and ctypes' loading
   of libraries. Audit hooks are not a security boundary on their own (code that reaches C can
   step around them); they stop the ordinary ways and back up the kernel's limits.

Protocol: JSON lines on stdin ({"code": ..., "cpu_s": ...}) and on the original stdout ({"output":
..., "error": bool, "truncated": bool}); the first line out is {"ready": true, "isolation": ...}
or {"error": ...}. File descriptors 0-2 then point to /dev/null; what the code prints goes to a
buffer cut at `max_output` characters. The interpreter keeps its globals from cell to cell; it
ends when its stdin closes.
"""

import ast
import ctypes
import json
import os
import resource
import signal
import sys
import traceback

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_RDONLY = 0x2, 0x4, 0x8, 0x1
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1
HIDDEN = ["/root", "/home", "/run", "/var/tmp", "/dev/shm", "/mnt", "/media", "/srv"]
BLOCKED_EVENTS = {
    "os.fork": "starting processes",
    "os.forkpty": "starting processes",
    "os.exec": "starting processes",
    "os.posix_spawn": "starting processes",
    "os.spawn": "starting processes",
    "os.system": "starting processes",
    "subprocess.Popen": "starting processes",
    "pty.spawn": "starting processes",
    "socket.connect": "the network",
    "socket.bind": "the network",
    "socket.sendto": "the network",
    "socket.sendmsg": "the network",
    "os.kill": "signalling processes",
    "os.killpg": "signalling processes",
    "signal.pthread_kill": "signalling processes",
    "ctypes.dlopen": "loading libraries through ctypes",
    "ctypes.dlsym": "loading libraries through ctypes",
    "ctypes.call_function": "calling C functions through ctypes",
}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_user_namespace(extra_flags: int = 0) -> None:
    """A new user namespace where this process is uid/gid 0, mapped to its own ids outside."""
    uid, gid = os.geteuid(), os.getegid()
    _check(libc.unshare(CLONE_NEWUSER | extra_flags), "unshare(user namespace)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")


def _hide(path: str, keep: list) -> None:
    """An empty read-only tmpfs over `path`, with the entries of `keep` that lie inside it put back
    where they were: directories bound read-only, symbolic links made again."""
    if not os.path.isdir(path) or os.path.islink(path):
        return
    inside = [k for k in keep if k == path or k.startswith(path.rstrip("/") + "/")]
    if path in inside:
        return
    links = [(k, os.readlink(k)) for k in inside if os.path.islink(k)]
    fds = [(k, os.open(k, os.O_PATH)) for k in inside if os.path.isdir(k) and not os.path.islink(k)]
    _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for k, target in links:
        os.makedirs(os.path.dirname(k), exist_ok=True)
        if not os.path.lexists(k):
            os.symlink(target, k)
    for k, fd in fds:
        if not os.path.lexists(k):
            os.makedirs(k, exist_ok=True)
        if os.path.isdir(k) and not os.path.islink(k):
            _mount(f"/proc/self/fd/{fd}", k, None, MS_BIND | MS_REC)
            _mount(None, k, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_REC)
        os.close(fd)
    _mount(None, path, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def enter_namespaces(settings: dict) -> None:
    """Step 1 of the module docstring. Returns in the namespaces' process 1; its parent only
    waits for it and exits with its status."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
    if os.geteuid() == 0:
        _check(libc.unshare(flags), "unshare(mount, network, PID namespaces)")
    else:
        _enter_user_namespace(flags)
    pid = os.fork()
    if pid:  # outside the PID namespace: wait for process 1 and leave with it
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
            except InterruptedError:
                continue
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:  # some containers forbid a fresh proc: hide the old one instead
        _mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1k,mode=555")
    # each directory the interpreter needs, as it is named (maybe through links) and as it is
    keep = set()
    for p in settings["keep"]:
        parts = p.rstrip("/").split("/")
        keep.update("/".join(parts[:i]) for i in range(2, len(parts) + 1) if os.path.islink("/".join(parts[:i])))
        keep.update((p, os.path.realpath(p)))
    keep = sorted(keep)
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={settings['disk_mb']}m,mode=1777")
    os.chdir("/tmp")
    os.environ.update(HOME="/tmp", TMPDIR="/tmp")
    for path in HIDDEN + settings["hide"]:
        _hide(os.path.realpath(path), keep)
    # a user namespace on top: no capability outside it, mounts locked, hard limits final
    _enter_user_namespace(CLONE_NEWNS)


def set_limits(settings: dict) -> None:
    cpu_total = int(settings["cpu_total_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_total, cpu_total))
    memory = settings["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    disk = settings["disk_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (disk, disk))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if settings["isolation"] == "namespaces" and os.getuid() != 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (settings["max_processes"],) * 2)


def _no_processes(*args, **kwargs):
    raise PermissionError("the sandbox does not allow starting processes (_posixsubprocess.fork_exec)")


def audit(event: str, args) -> None:
    if event == "import" and args[0] == "_posixsubprocess":  # loaded again, with its fork_exec back
        raise PermissionError("the sandbox does not allow starting processes (_posixsubprocess)")
    what = BLOCKED_EVENTS.get(event)
    if what is not None:
        raise PermissionError(f"the sandbox does not allow {what} ({event})")


class Output:
    """A text stream that keeps the first and the last `limit // 2` characters and counts the rest
    (the end of an output holds the error, or the result)."""

    def __init__(self, limit: int):
        self.half = max(1, limit // 2)
        self.head, self.tail, self.size = "", "", 0

    def write(self, text) -> int:
        text = str(text)
        self.size += len(text)
        if len(self.head) < self.half:
            room = self.half - len(self.head)
            self.head, text = self.head + text[:room], text[room:]
        self.tail = (self.tail + text)[-self.half :]
        return self.size

    def text(self) -> tuple[str, int]:
        """(what is kept, with a mark where characters were cut; how many were cut)."""
        dropped = self.size - len(self.head) - len(self.tail)
        if dropped <= 0:
            return self.head + self.tail, 0
        return f"{self.head}\n... ({dropped} characters cut) ...\n{self.tail}", dropped

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class CPULimit(BaseException):
    """Raised in the cell when its CPU seconds are spent (SIGXCPU); not catchable by `except Exception`."""


def on_sigxcpu(signum, frame):
    raise CPULimit()


def run_cell(code: str, scope: dict, out: Output) -> bool:
    """Runs `code` in `scope` like a notebook cell (a final expression's value is printed); True if
    it raised."""
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        if last is not None:
            tree.body.pop()
        exec(compile(tree, "<cell>", "exec"), scope)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), scope)
            if value is not None:
                out.write(repr(value) + "\n")
        return False
    except CPULimit:
        out.write("CPU time limit reached: the cell was stopped\n")
        return True
    except BaseException:  # noqa: BLE001 - the model reads its own errors, SystemExit included
        etype, value, tb = sys.exc_info()
        frames = [f for f in traceback.extract_tb(tb) if f.filename == "<cell>"]
        out.write("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames)))
        out.write("".join(traceback.format_exception_only(etype, value)))
        return True


def main() -> None:
    settings = json.loads(sys.argv[1])
    proto_in = os.fdopen(os.dup(0), "r")
    proto_out = os.fdopen(os.dup(1), "w")
    isolation = settings["isolation"]
    try:
        if isolation in ("namespaces", "auto"):
            try:
                enter_namespaces(settings)
                isolation = "namespaces"
            except OSError as exc:
                if isolation == "namespaces":
                    raise
                isolation, settings["fallback_reason"] = "process", str(exc)
        settings["isolation"] = isolation
        set_limits(settings)
    except OSError as exc:
        proto_out.write(json.dumps({"error": f"sandbox setup failed: {exc}"}) + "\n")
        proto_out.flush()
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    signal.signal(signal.SIGXCPU, on_sigxcpu)
    import _posixsubprocess  # subprocess's fork and exec, which raise no audit event of their own

    _posixsubprocess.fork_exec = _no_processes
    global libc
    libc = None  # nothing of the set-up's C functions is left for the cells
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    sys.addaudithook(audit)
    proto_out.write(json.dumps({"ready": True, "isolation": isolation, "why": settings.get("fallback_reason")}) + "\n")
    proto_out.flush()
    for line in proto_in:
        job = json.loads(line)
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime + job["cpu_s"]) + 1
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard))
        out = Output(settings["max_output"])
        sys.stdout = sys.stderr = out
        try:
            error = run_cell(job["code"], scope, out)
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        text, dropped = out.text()
        proto_out.write(json.dumps({"output": text, "error": error, "dropped": dropped}) + "\n")
        proto_out.flush()


if __name__ == "__main__":
    main()
