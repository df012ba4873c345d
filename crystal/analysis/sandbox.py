"""Run untrusted Python (a model's completion plus its unit test) in a fresh, confined subprocess.

    results = run_many([program, ...], Limits(timeout_s=10, memory_mb=1024))   # parallel, order kept
    results[0].status                                                          # passed | failed | timeout | error

Every program gets its own temp directory and its own interpreter (`python -I -B`, started in a new session so
it leads its own process group). Before a line of the program runs, a trusted bootstrap confines the process,
each layer applied where the kernel offers it and named in `Result.layers`:

  rlimits     RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (largest file written), RLIMIT_NOFILE, no core dumps;
              soft = hard, so the program cannot raise them
  landlock    (Linux >= 5.13, unprivileged) files may be created, written, truncated, renamed or removed only
              below the temp dir; no TCP bind/connect (ABI >= 4); no signals or abstract unix sockets to
              processes outside the sandbox (ABI >= 6)
  caps        run as root: every capability dropped (no reboot, clock, raw network, kill-anyone)
  seccomp     (x86_64, aarch64) no fork, vfork, clone of a new process, execve or socket(): the program can
              start threads but no process, and can open no network socket of any kind
  audit hook  Python-level backstop with readable errors: writes outside the temp dir, process creation,
              signals to other processes, sockets and ctypes are refused

The parent enforces the wall-clock timeout by killing the whole process group, and kills the group again
after a normal exit so nothing a program left behind outlives it. What this does NOT protect against is
listed in docs/analysis.md (reads are not confined; a program written to deceive the harness can; it is not
a VM). The program's stdout goes to /dev/null; its verdict comes back on a private pipe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

STATUSES = ("passed", "failed", "timeout", "error")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock per program, then SIGKILL to its process group
    memory_mb: int = 1024  # RLIMIT_AS: address space, so Python's own ~30 MB count too
    file_mb: int = 16  # RLIMIT_FSIZE: the largest file the program may write (SIGXFSZ beyond)
    open_files: int = 64  # RLIMIT_NOFILE
    guard: bool = True  # the Python audit-hook layer (the kernel layers are always applied where available)

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"sandbox timeout_s={self.timeout_s} must be > 0")
        if self.memory_mb < 64:
            raise ValueError(f"sandbox memory_mb={self.memory_mb} is below what a Python interpreter needs (64)")

    @property
    def cpu_s(self) -> int:
        """RLIMIT_CPU: the wall clock catches a sleeper, this catches a spinner the clock missed under load."""
        return int(self.timeout_s) + 1


@dataclass
class Result:
    status: str  # passed | failed | timeout | error
    reason: str = ""  # one line: the assertion or exception, the limit hit, the signal
    seconds: float = 0.0
    layers: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ----------------------------------------------------------------------------------------------
# The bootstrap: trusted code the child runs first. Kept to the standard library; argv[1] is its settings.

BOOTSTRAP = r"""
import ctypes, json, os, resource, sys, traceback
cfg = json.loads(sys.argv[1])
del sys.argv[1:]
tmp = cfg["tmp"]
status_fd = os.dup(1)                       # the parent's pipe: the verdict only
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)                            # the program's prints go nowhere
os.close(null)
os.set_inheritable(status_fd, False)
layers = []

def finish(status, reason=""):
    os.write(status_fd, json.dumps({"status": status, "reason": reason[:500], "layers": layers}).encode())
    os._exit(0)                              # no atexit handlers of the program

with open(os.path.join(tmp, "program.py"), encoding="utf-8") as f:
    source = f.read()

mb = 1 << 20
for name, value in (("RLIMIT_AS", cfg["memory_mb"] * mb), ("RLIMIT_FSIZE", cfg["file_mb"] * mb),
                    ("RLIMIT_NOFILE", cfg["open_files"]), ("RLIMIT_CORE", 0)):
    resource.setrlimit(getattr(resource, name), (value, value))
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
layers.append("rlimits")

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
U = ctypes.c_ulong
libc.prctl(U(38), U(1), U(0), U(0), U(0))  # PR_SET_NO_NEW_PRIVS: required by landlock and seccomp

def landlock():
    abi = libc.syscall(444, None, 0, 1)     # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return
    write = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13))  # write, remove, make_*
    if abi >= 2:
        write |= 1 << 13                     # REFER (rename/link across directories)
    if abi >= 3:
        write |= 1 << 14                     # TRUNCATE
    net = 3 if abi >= 4 else 0               # BIND_TCP | CONNECT_TCP, with no rule: denied
    scoped = 3 if abi >= 6 else 0            # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = (ctypes.c_uint64 * 3)(write, net, scoped)
    size = 8 * (3 if abi >= 6 else 2 if abi >= 4 else 1)
    ruleset = libc.syscall(444, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    for path, access in ((tmp, write), (os.devnull, (1 << 1) | (write & (1 << 14)))):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(access, fd)
        ok = libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0) == 0
        os.close(fd)
        if not ok:
            os.close(ruleset)
            return
    if libc.syscall(446, ruleset, 0) == 0:
        layers.append(f"landlock-abi{abi}")
    os.close(ruleset)

def drop_capabilities():
    if os.geteuid() != 0:
        return
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)      # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()                      # effective, permitted, inheritable x 2 words: none
    if libc.capset(header, data) == 0:
        layers.append("caps-dropped")

def seccomp():
    arch = os.uname().machine
    if arch == "x86_64":
        audit, nrs = 0xC000003E, {"fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "socket": 41,
                                  "clone": 56, "clone3": 435}
    elif arch == "aarch64":
        audit, nrs = 0xC00000B7, {"execve": 221, "execveat": 281, "socket": 198, "clone": 220, "clone3": 435}
    else:
        return
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, EPERM, ENOSYS, KILL = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
    deny = [nrs[n] for n in ("fork", "vfork", "execve", "execveat", "socket") if n in nrs]
    # (code, k, jump-if-true label, jump-if-false label); labels resolve to relative offsets below
    prog = [(LD, 4, None, None), (JEQ, audit, None, "kill"), (LD, 0, None, None), (JGE, 0x40000000, "deny", None)]
    prog += [(JEQ, nr, "deny", None) for nr in deny]
    prog += [(JEQ, nrs["clone3"], "enosys", None),  # glibc falls back to clone(), which is checked below
             (JEQ, nrs["clone"], None, "allow"), (LD, 16, None, None),  # clone flags: args[0], low word
             (JSET, 0x10000, "allow", "deny")]                           # CLONE_THREAD: a thread, allowed
    labels = {"allow": len(prog), "deny": len(prog) + 1, "enosys": len(prog) + 2, "kill": len(prog) + 3}
    prog += [(RET, ALLOW, None, None), (RET, EPERM, None, None), (RET, ENOSYS, None, None), (RET, KILL, None, None)]
    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]
    rows = (Filter * len(prog))()
    for i, (code, k, jt, jf) in enumerate(prog):
        rows[i] = Filter(code, labels[jt] - i - 1 if jt else 0, labels[jf] - i - 1 if jf else 0, k)
    fprog = Prog(len(prog), rows)
    if libc.prctl(U(22), U(2), ctypes.byref(fprog), U(0), U(0)) == 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        layers.append("seccomp")

landlock()
drop_capabilities()
seccomp()

def inside(path):
    try:
        path = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return True                          # an fd: already open
    return path == tmp or path.startswith(tmp + os.sep) or path == os.devnull

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
               "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "os.chflags", "os.mkfifo", "os.mknod",
               "os.setxattr", "os.removexattr"}
BLOCKED = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
           "pty.spawn", "os.startfile", "socket.__new__", "socket.connect", "socket.bind", "sys.addaudithook",
           "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function"}

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (flags or 0) & WRITE_FLAGS or (mode and any(c in mode for c in "wax+")):
            if not inside(path):
                raise PermissionError(f"sandbox: writing {path} outside the temp dir")
    elif event in PATH_EVENTS:
        for p in args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]:
            if p is not None and not inside(p):
                raise PermissionError(f"sandbox: {event} on {p} outside the temp dir")
    elif event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    elif event in ("os.kill", "os.killpg") and args[0] not in (0, os.getpid()):
        raise PermissionError(f"sandbox: {event} of another process is not allowed")
    elif event == "import" and args[0] in ("ctypes", "_ctypes"):
        raise PermissionError("sandbox: ctypes is not allowed")

for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
    del sys.modules[name]                    # so an `import ctypes` of the program meets the hook
del libc, ctypes
if cfg["guard"]:
    sys.addaudithook(hook)
    layers.append("audit-hook")

try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException as e:
    where = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "program.py"]
    line = f" (line {where[-1].lineno})" if where else ""
    try:
        message = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except BaseException:
        message = type(e).__name__
    finish("failed" if isinstance(e, AssertionError) else "error", message + line)
finish("passed")
"""


# ----------------------------------------------------------------------------------------------
# The parent side


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_reason(code: int, limits: Limits) -> tuple[str, str]:
    sig = -code
    name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else f"signal {sig}"
    if sig in (signal.SIGXCPU, signal.SIGKILL):
        return "timeout", f"killed by {name}: CPU limit of {limits.cpu_s} s"
    if sig == signal.SIGXFSZ:
        return "error", f"killed by {name}: file size limit of {limits.file_mb} MB"
    if sig == signal.SIGSYS:
        return "error", f"killed by {name}: a forbidden system call"
    return "error", f"killed by {name}"


def run_program(source: str, limits: Limits = Limits()) -> Result:
    """One program in its own temp dir and process group; never raises for anything the program does."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crystal-sandbox-", ignore_cleanup_errors=True) as tmp:
        tmp = os.path.realpath(tmp)
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        cfg = {**asdict(limits), "cpu_s": limits.cpu_s, "tmp": tmp}
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        with open(os.path.join(tmp, "stderr.txt"), "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-S", "-c", BOOTSTRAP, json.dumps(cfg)], cwd=tmp, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, start_new_session=True, close_fds=True,
            )  # fmt: skip
            try:
                out, _ = proc.communicate(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.communicate()
                return Result("timeout", f"wall clock limit of {limits.timeout_s:g} s", time.monotonic() - start)
            finally:
                _kill_group(proc.pid)  # whatever the program left in its group goes with it
        seconds = time.monotonic() - start
        try:
            verdict = json.loads(out)
            return Result(verdict["status"], verdict["reason"], seconds, verdict["layers"])
        except (ValueError, KeyError, TypeError):
            pass
        if proc.returncode < 0:
            status, reason = _signal_reason(proc.returncode, limits)
            return Result(status, reason, seconds)
        tail = open(os.path.join(tmp, "stderr.txt"), "rb").read()[-300:].decode(errors="replace").strip()
        last = tail.splitlines()[-1] if tail else ""
        return Result("error", f"exited {proc.returncode} before the test finished{': ' + last if last else ''}",
                      seconds)  # fmt: skip


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_many(sources: list[str], limits: Limits = Limits(), workers: int = 0, progress=None) -> list[Result]:
    """Results in the order of `sources`; identical programs run once. `workers` processes at a time (0: one
    per CPU core this process may use). `progress(n)` is called as programs finish."""
    unique = list(dict.fromkeys(sources))
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        futures = {src: pool.submit(run_program, src, limits) for src in unique}
        done = {}
        for src, fut in futures.items():
            done[src] = fut.result()
            if progress is not None:
                progress(1)
    return [done[s] for s in sources]
