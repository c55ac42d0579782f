"""Runs inside a test sandbox (entry "jail_probe:main"): tries what `boot` lists, reports.

`boot["attempts"]` is a list of [name, arg] or [name, arg, label]; each runs
`_<name>(arg)` and reports, under its label (default: its name),
{"ok": True, "value": ...} or {"ok": False, "error": "<ExceptionName>", "errno": n,
"message": ...}. The results go back as one JSON line on the channel. With
`boot["hold"]`, the sandbox then waits until the test closes its end (or sends
anything) before it returns `boot.get("exit", 0)`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import time

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
MiB = 1024 * 1024


def main(sock: socket.socket, boot: dict, extra: list[socket.socket]) -> int:
    results = {}
    for name, arg, *label in boot.get("attempts", []):
        key = label[0] if label else name
        try:
            results[key] = {"ok": True, "value": globals()[f"_{name}"](arg)}
        except BaseException as e:  # noqa: BLE001 - report everything
            results[key] = {"ok": False, "error": type(e).__name__,
                             "errno": getattr(e, "errno", None), "message": str(e)[:300]}
    sock.sendall(json.dumps(results).encode() + b"\n")
    if boot.get("hold"):
        sock.recv(1)
    return int(boot.get("exit", 0))


def _sys(nr: int, *args: int) -> int:
    """A raw syscall; raises OSError with its errno on -1."""
    res = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if res == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


# --- attempts ---


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(200).decode(errors="replace")


def _listdir(path: str) -> list[str]:
    return sorted(os.listdir(path))[:50]


def _write(path: str) -> str:
    with open(path, "w") as f:
        f.write("escaped")
    return path


def _chmod(path: str) -> str:
    os.chmod(path, 0o777)
    return path


def _env(_: object) -> dict[str, str]:
    return dict(os.environ)


def _whoami(_: object) -> dict:
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k.startswith("Cap") or k in ("NoNewPrivs", "Seccomp", "Uid"):
                status[k] = v.strip()
    return {"pid": os.getpid(), "cwd": os.getcwd(), "status": status, "proc": _listdir("/proc"),
            "hostname": socket.gethostname(), "netdev": _read("/proc/net/dev")}


def _connect(port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
    return "connected"


def _bind(port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        return s.getsockname()[1]


def _socket(family: str) -> str:
    socket.socket(getattr(socket, family), socket.SOCK_STREAM).close()
    return "created"


def _socketpair(_: object) -> str:
    a, b = socket.socketpair()
    a.close()
    b.close()
    return "created"


def _kill(pid: int) -> str:
    os.kill(pid, signal.SIGKILL)
    return "sent"


def _syscall(args: list[int]) -> int:
    return _sys(*args)


def _unshare_userns(_: object) -> str:
    _sys(272, 0x10000000)  # unshare(CLONE_NEWUSER)
    return "unshared"


def _clone_userns(_: object) -> int:
    pid = _sys(56, 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)  # clone(CLONE_NEWUSER|SIGCHLD)
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _fork_wait(_: object) -> int:
    """A plain fork still works (clone without namespace flags, or clone3 -> ENOSYS -> clone)."""
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _thread(_: object) -> str:
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append("ran"))
    t.start()
    t.join()
    return out[0]


def _asyncio(_: object) -> int:
    import asyncio

    async def f() -> int:
        await asyncio.sleep(0)
        return 42

    return asyncio.run(f())


def _mount(_: object) -> str:
    if _libc.mount(b"none", b"/mnt", b"tmpfs", 0, None) == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return "mounted"


def _memory_bomb(chunk_mb: int) -> int:
    hoard = []
    while True:
        hoard.append(bytearray(chunk_mb * MiB))  # zero-filled: really touched


def _oom_children(arg: list[int]) -> list[int]:
    """Fork `n` children that each touch `mb` MiB and hold it for `hold` seconds;
    return their exit statuses."""
    n, mb, hold = arg
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            hoard = []
            try:
                for _ in range(mb):
                    hoard.append(bytearray(MiB))
            except MemoryError:
                pass
            time.sleep(hold)
            os._exit(0)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]


def _fork_bomb(_: object) -> dict:
    forked = 0
    error = None
    while forked < 1000:
        try:
            pid = os.fork()
        except OSError as e:
            error = type(e).__name__
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        forked += 1
    return {"forked": forked, "error": error}


def _fd_exhaust(_: object) -> dict:
    fds = []
    try:
        while len(fds) < 100000:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        return {"opened": len(fds), "error": type(e).__name__, "errno": e.errno}
    finally:
        for fd in fds:
            os.close(fd)
    return {"opened": len(fds), "error": None}


def _big_file(mb: int) -> int:
    with open("big", "wb") as f:
        for _ in range(mb):
            f.write(b"x" * MiB)
    return mb


def _fill_disk(file_mb: int) -> dict:
    """Write files of `file_mb` MiB (1 MiB at a time) until the disk is full."""
    written = 0
    i = 0
    try:
        while written < 10000:
            with open(f"fill{i}", "wb") as f:
                for _ in range(file_mb):
                    f.write(b"x" * MiB)
                    written += 1
            i += 1
    except OSError as e:
        return {"written_mb": written, "error": type(e).__name__, "errno": e.errno}
    return {"written_mb": written, "error": None}


def _touch(name: str) -> str:
    with open(name, "w") as f:
        f.write("secret")
    return os.path.abspath(name)


def _burn(seconds: float) -> int:
    end = time.process_time() + seconds
    n = 0
    while time.process_time() < end:
        n += 1
    return n
