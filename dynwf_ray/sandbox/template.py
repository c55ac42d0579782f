"""Sandbox processes in milliseconds: a pre-imported template forks jailed children.

`Template.start` runs a clean Python process (`-I`, environment exactly `env`,
nothing inherited from the supervisor, whose environment holds Ray tokens,
database URLs and telemetry credentials). It imports the `preload` modules once,
so every sandbox forked from it shares those pages, and serves spawn requests
on a control socketpair: length-prefixed JSON (never pickle), the child's
channel sockets passed by SCM_RIGHTS. The template is trusted and never runs
tenant code; it keeps root's capabilities to make namespaces. So the tenant's
files and settings never reach it: its import path is the runtime's (`sys_path`)
and its environment the platform's (`env`), never the tenant's; the tenant's code
directory (`code_path`) goes first on the import path, and the tenant's environment
(`sandbox_env`) replaces the process's, only in each child, once it is jailed (a
module of the tenant's named like one of the standard library, or an `LD_PRELOAD`
in its settings, would otherwise run in the template, unjailed, as root). It dies with the
supervisor (PR_SET_PDEATHSIG, so: with the *thread* that called `start`; call
it from a thread that lives as long as the templates do) and when its control
socket closes, killing its sandboxes.

`Template.spawn` answers with a `Sandbox` once the child is jailed and about to
call its entry: the template forks the child, which closes every descriptor
but its channel(s), points 0-2 at /dev/null, applies `jail.enter(spec)` (which
also chdirs to the scratch dir), sets HOME and TMPDIR to it, imports `entry`
("module:function"), tells the template it is ready (or what failed, which
`spawn` raises as `SandboxUnavailableError`), reads `boot`, and calls
`function(sock, boot, extra)`; its return value (an int, else 0) is the exit
status, by `os._exit`, never back into the template's loop. `boot` travels as
the first frame on the channel itself (4-byte big-endian length + JSON, sent by
`spawn`), so a template never holds one sandbox's boot data in memory that its
next fork would hand to another.

PID namespace: before each strict fork the template calls
unshare(CLONE_NEWPID), which only changes the namespace of its *next* child,
and right after the fork it setns()es back into its own namespace (opened at
start from /proc/self/ns/pid). So each sandbox is pid 1 of a namespace of its
own, one fork, no intermediate process: it cannot see or signal anything
outside, and when it dies the kernel kills whatever it left behind in there.
(A double fork would cost a second fork and an extra process per sandbox.)
The template is a child subreaper and reaps on SIGCHLD, keeping each exit status
(with the cgroup's final counters, read before it removes the cgroup) until the
caller asks for it. Orphans of a tenant's own children are reaped by the tenant's
pid 1, i.e. not at all unless it waits: they count against its pids limit.

The caller's side of each sandbox holds a pidfd (sent by the template right
after the fork), so `kill`, `alive` and `wait` never hit a recycled pid.

cgroups: the template makes `dynwf/<template pid>-<n>` below its own cgroup in
each hierarchy (v1 pids, memory, cpuacct; or v2), removes it when the sandbox
is reaped, and at start sweeps the empty ones that dead templates left.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Literal, NoReturn, Sequence

from . import jail
from .jail import Cgroup, SandboxUnavailableError
from .policy import JailSpec

__all__ = ["Sandbox", "SandboxUnavailableError", "Template"]

_HDR = struct.Struct(">I")
_MAX_FRAME = 256 * 1024 * 1024
_START_TIMEOUT = 120.0  # preloading may import a lot
_READY_TIMEOUT = 30.0  # fork + jail + import of the entry module
_REQUEST_TIMEOUT = _READY_TIMEOUT + 30.0
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- framing -------------------------------------------------------------------------


def _send(sock: socket.socket, obj: Any, fds: Sequence[int] = ()) -> None:
    """One frame: 4-byte big-endian length + JSON; `fds` ride on its first byte."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    buf = _HDR.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [buf], list(fds))
        buf = buf[sent:]
    if buf:
        sock.sendall(buf, socket.MSG_NOSIGNAL)


def _recv(sock: socket.socket, maxfds: int = 0) -> tuple[Any, list[int]]:
    """One frame and the descriptors that came with it; (None, []) at end of stream."""
    fds: list[int] = []
    head = b""
    try:
        while len(head) < _HDR.size:
            if maxfds:
                chunk, got, _flags, _ = socket.recv_fds(
                    sock, _HDR.size - len(head), maxfds, socket.MSG_CMSG_CLOEXEC)
                fds += got
            else:
                chunk = sock.recv(_HDR.size - len(head))
            if not chunk:
                for fd in fds:
                    os.close(fd)
                return None, []
            head += chunk
        (n,) = _HDR.unpack(head)
        if n > _MAX_FRAME:
            raise ValueError(f"frame of {n} bytes is too large")
        body = bytearray()
        while len(body) < n:
            chunk = sock.recv(min(n - len(body), 1 << 20))
            if not chunk:
                raise EOFError("stream ended inside a frame")
            body += chunk
        return json.loads(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# The template's first code: read the config, drop what Python's C-locale coercion
# added to the environment, put sys_path in place, hand over to _serve (or say why
# dynwf_ray, or what it imports, is not found: a sandbox sees the runtime's own path,
# not PYTHONPATH; see host._runtime_sys_path).
_BOOTSTRAP = r"""
import ctypes, json, os, socket, struct, sys
ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
s = socket.socket(fileno=int(sys.argv[1]))
def rd(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            os._exit(0)
        b += c
    return b
cfg = json.loads(rd(struct.unpack(">I", rd(4))[0]))
if os.getppid() != cfg["parent"]:
    os._exit(0)
for k in [k for k in os.environ if k not in cfg["env"]]:
    del os.environ[k]
sys.path[:0] = [p for p in cfg["sys_path"] if p not in sys.path]
try:
    import importlib.util as u
    if u.find_spec("dynwf_ray") is None:
        sp = u.spec_from_file_location("dynwf_ray", cfg["package"] + "/__init__.py",
                                       submodule_search_locations=[cfg["package"]])
        m = u.module_from_spec(sp)
        sys.modules["dynwf_ray"] = m
        sp.loader.exec_module(m)
    from dynwf_ray.sandbox.template import _serve
except BaseException as e:  # say why, rather than leave the caller an end of stream
    m = json.dumps({"ok": False, "error": f"importing dynwf_ray failed: {type(e).__name__}: {e} "
                    f"(Python {sys.executable} with the host's runtime path: {sys.path})"}).encode()
    s.sendall(struct.pack(">I", len(m)) + m)
    os._exit(1)
_serve(s, cfg)
"""


# --- the caller's side ---------------------------------------------------------------


class Template:
    """A pre-imported process that forks jailed sandboxes (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen, ctl: socket.socket, mode: str, info: dict):
        self._proc = proc
        self._ctl = ctl
        #: "strict": every jail mechanism was found at start; "process": rlimits only.
        self.mode = mode
        self.pid: int = proc.pid
        #: What `jail.probe()` said inside the template.
        self.probe: dict[str, str | None] = info.get("probe", {})
        #: The cgroup version sandboxes get (1 or 2), or why they get none.
        self.cgroup: int | str = info.get("cgroup")
        self._lock = threading.Lock()
        self._sandboxes: dict[int, Sandbox] = {}
        self._closed = False
        self._broken: str | None = None

    @classmethod
    def start(
        cls,
        *,
        python: str = sys.executable,
        sys_path: list[str],
        env: dict[str, str],
        cwd: str,
        preload: Sequence[str] = (),
        mode: Literal["strict", "process"] = "strict",
        code_path: str | None = None,
        sandbox_env: dict[str, str] | None = None,
    ) -> "Template":
        """Start a template; in mode "strict" raise SandboxUnavailableError if a jail
        mechanism is missing here (the message names each). `sys_path` and `env` are the
        template's own (trusted: never the tenant's); each sandbox, once jailed, puts
        `code_path` first on its import path and takes `sandbox_env` (default: `env`)
        as its whole environment."""
        if mode not in ("strict", "process"):
            raise ValueError(f"mode must be 'strict' or 'process', not {mode!r}")
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [python, "-I", "-c", _BOOTSTRAP, str(theirs.fileno())],
                env=dict(env), cwd=cwd, pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(_START_TIMEOUT)
        try:
            _send(ours, {"sys_path": list(sys_path), "env": sorted(env), "preload": list(preload),
                         "mode": mode, "parent": os.getpid(), "package": _PACKAGE_DIR,
                         "code_path": code_path,
                         "sandbox_env": dict(env if sandbox_env is None else sandbox_env)})
            info, _ = _recv(ours)
        except (OSError, ValueError, EOFError) as e:
            info = {"ok": False, "error": f"no answer ({e})"}
        if not info or not info.get("ok"):
            proc.kill()
            status = proc.wait()
            ours.close()
            why = (info or {}).get("error") or f"it exited with status {status}"
            raise SandboxUnavailableError(f"the sandbox template did not start: {why}")
        ours.settimeout(_REQUEST_TIMEOUT)
        return cls(proc, ours, mode, info)

    def spawn(self, spec: JailSpec, entry: str, boot: dict, extra: int = 0) -> "Sandbox":
        """Fork a sandbox confined by `spec` that calls `entry`(sock, boot, extra sockets)."""
        if spec.mode == "strict" and self.mode != "strict":
            raise SandboxUnavailableError(
                "a template started in mode 'process' cannot make strict sandboxes")
        if ":" not in entry:
            raise ValueError(f"entry {entry!r} must be 'module:function'")
        boot_frame = json.dumps(boot, separators=(",", ":")).encode()
        pairs = [socket.socketpair() for _ in range(1 + extra)]
        try:
            reply, fds = self._request(
                {"op": "spawn", "spec": spec.model_dump(mode="json"), "entry": entry,
                 "extra": extra}, [theirs.fileno() for _, theirs in pairs])
        except BaseException:
            for ours, _ in pairs:
                ours.close()
            raise
        finally:
            for _, theirs in pairs:
                theirs.close()
        if not reply.get("ok"):
            for ours, _ in pairs:
                ours.close()
            for fd in fds:
                os.close(fd)
            raise SandboxUnavailableError(f"sandbox could not start: {reply.get('error')}")
        cg = Cgroup.from_dict(reply["cgroup"]) if reply.get("cgroup") else None
        sb = Sandbox(self, reply["pid"], fds[0] if fds else -1, pairs[0][0],
                     [ours for ours, _ in pairs[1:]], cg, spec)
        with self._lock:
            self._sandboxes[sb.pid] = sb
        try:
            sb.sock.sendall(_HDR.pack(len(boot_frame)) + boot_frame, socket.MSG_NOSIGNAL)
        except OSError:
            pass  # it is gone already; wait() says how
        return sb

    def close(self) -> None:
        """Kill the template and every sandbox it forked; remove their cgroups."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sandboxes = list(self._sandboxes.values())
        for sb in sandboxes:
            sb.kill()
        exited: dict[str, dict] = {}
        answered = False
        with self._lock:
            if self._broken is None:
                try:
                    self._ctl.settimeout(10.0)
                    _send(self._ctl, {"op": "close"})
                    reply, _ = _recv(self._ctl)
                    answered = reply is not None
                    exited = (reply or {}).get("exited", {})
                except (OSError, ValueError, EOFError):
                    pass
        try:
            self._proc.wait(2 if answered else 0.01)  # it exits right after its answer
        except subprocess.TimeoutExpired:
            self._proc.kill()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for sb in sandboxes:
            sb._template_closed(exited.get(str(sb.pid)))
        self._ctl.close()

    def __enter__(self) -> "Template":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, obj: dict, fds: Sequence[int] = ()) -> tuple[dict, list[int]]:
        with self._lock:
            if self._closed:
                raise SandboxUnavailableError("the sandbox template is closed")
            if self._broken:
                raise SandboxUnavailableError(self._broken)
            try:
                _send(self._ctl, obj, fds)
                reply, rfds = _recv(self._ctl, maxfds=4)
            except (OSError, ValueError, EOFError) as e:
                reply, rfds, why = None, [], str(e)
            else:
                why = "it closed its socket"
            if reply is None:
                status = self._proc.poll()
                self._broken = (f"the sandbox template (pid {self.pid}) is gone: {why}"
                                + (f", exit status {status}" if status is not None else ""))
                raise SandboxUnavailableError(self._broken)
            return reply, rfds

    def _forget(self, pid: int) -> None:
        with self._lock:
            self._sandboxes.pop(pid, None)


class Sandbox:
    """One jailed process forked by a `Template` (its caller's side)."""

    def __init__(self, template: Template, pid: int, pidfd: int, sock: socket.socket,
                 extra: list[socket.socket], cgroup: Cgroup | None, spec: JailSpec):
        #: The sandbox's pid as seen from the caller's PID namespace.
        self.pid = pid
        #: Caller's end of the channel.
        self.sock = sock
        #: Caller's ends of the extra socketpairs.
        self.extra = extra
        self.spec = spec
        self.cgroup = cgroup
        self._template = template
        self._pidfd = pidfd
        self._status: int | None = None
        self._stats: dict[str, Any] = {}
        self._killed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Sandbox pid={self.pid} {'alive' if self.alive() else 'gone'}>"

    def kill(self) -> None:
        """SIGKILL the sandbox and everything under it; idempotent."""
        with self._lock:
            if self._status is not None:
                return
            self._killed = True
            if self._pidfd >= 0:
                try:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.spec.mode != "strict" and self.cgroup is not None:
            self.cgroup.kill()  # no PID namespace to take its descendants along

    def alive(self) -> bool:
        return self._status is None and not self._exited(0)

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit status once gone (negative: killed by that signal); None on timeout."""
        if self._status is None:
            if not self._exited(timeout):
                return None
            self._collect()
        return self._status

    def cpu_seconds(self) -> float:
        """User + system CPU time of the sandbox and its descendants."""
        if self._status is None and self.cgroup is not None:
            ns = self.cgroup.cpu_ns()
            if ns is not None:
                return ns / 1e9
        if self._status is None:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
            if self.wait(1.0) is None:
                return 0.0
        return (self._stats.get("cpu_ns") or 0) / 1e9

    def memory_uss(self) -> int:
        """Unique bytes (Private_Clean + Private_Dirty) of the sandbox's processes."""
        pids = (self.cgroup.pids() if self.cgroup is not None else []) or [self.pid]
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith(("Private_Clean:", "Private_Dirty:")):
                            total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def exit_reason(self) -> str | None:
        """None while alive; after exit the cause when it can be told, e.g. "memory
        limit of 1024 MiB", "processes limit of 32", else "exit code N" / "killed by signal N"."""
        if self.wait(0) is None:
            return None
        status, s, lim = self._status, self._stats, self.spec.limits
        assert status is not None
        if not self._killed:
            oom, hits = s.get("oom_kills"), s.get("memory_hits")
            if (oom or 0) > 0 and status != 0:
                return f"memory limit of {lim.memory_mb} MiB"
            if oom is None and (hits or 0) > 0 and status == -signal.SIGKILL:
                return f"memory limit of {lim.memory_mb} MiB"
            if (s.get("pids_max_hits") or 0) > 0 and status != 0:
                return f"processes limit of {lim.processes}"
            if status == -signal.SIGXFSZ:
                return f"file size limit of {lim.file_size_mb} MiB"
        if status < 0:
            return f"killed by signal {-status}"
        return f"exit code {status}"

    # -- internals --

    def _exited(self, timeout: float | None) -> bool:
        if self._status is not None:
            return True
        if self._pidfd < 0:
            return False
        p = select.poll()
        p.register(self._pidfd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        try:
            return bool(p.poll(ms))
        except (OSError, ValueError):  # closed meanwhile by another thread
            return self._status is not None

    def _collect(self) -> None:
        with self._lock:
            if self._status is not None:
                return
            info: dict | None = None
            for _ in range(50):
                try:
                    reply, _ = self._template._request({"op": "status", "pid": self.pid})
                except SandboxUnavailableError:
                    break
                if reply.get("exited"):
                    info = reply
                    break
                time.sleep(0.01)  # exited but not reaped yet
            self._finish(info)

    def _template_closed(self, info: dict | None) -> None:
        self._exited(2.0)  # killed already: by kill() and by the template's end
        with self._lock:
            if self._status is None:
                self._finish(info)

    def _finish(self, info: dict | None) -> None:
        if info is not None and info.get("status") is not None:
            self._status = int(info["status"])
            self._stats = info
        else:
            # the template died first: it took the sandbox along (pdeathsig SIGKILL)
            self._status = -signal.SIGKILL
            if self.cgroup is not None:
                self._stats = dict(self.cgroup.stats())
                self.cgroup.kill()
                for _ in range(50):
                    if self.cgroup.remove():
                        break
                    time.sleep(0.01)
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self._template._forget(self.pid)


# --- the template process ------------------------------------------------------------


def _serve(ctl: socket.socket, cfg: dict) -> NoReturn:
    """The template's main loop (called by _BOOTSTRAP); never returns."""
    try:
        server = _Server(ctl, cfg)
    except BaseException as e:
        try:
            msg = str(e) if isinstance(e, SandboxUnavailableError) else f"{type(e).__name__}: {e}"
            _send(ctl, {"ok": False, "error": msg})
        finally:
            os._exit(1)
    server.run()


def _noop(*_: object) -> None:
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class _Server:
    def __init__(self, ctl: socket.socket, cfg: dict):
        self.ctl = ctl
        self.mode: str = cfg["mode"]
        self.code_path: str | None = cfg.get("code_path")
        self.sandbox_env: dict[str, str] = cfg["sandbox_env"]
        for name in cfg["preload"]:
            importlib.import_module(name)
        probe = jail.probe()
        if self.mode == "strict":
            missing = [f"{k}: {probe[k]}" for k in jail.REQUIRED if probe.get(k)]
            if missing:
                raise SandboxUnavailableError("strict sandboxes need what is missing here: "
                                              + "; ".join(missing))
        layout = jail.cgroup_layout()
        self.layout = None if isinstance(layout, str) or probe.get("cgroup") else layout
        self.pidns = -1
        if self.mode == "strict":
            self.pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        # Each child closes its copy of the write end, then checks the read end
        # for a hang-up: the template died before the child's pdeathsig was set.
        self.lifeline_r, self.lifeline_w = os.pipe()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, _noop)
        jail.set_child_subreaper()
        self.children: dict[int, Cgroup | None] = {}
        self.exited: dict[int, dict] = {}
        self.leftover: list[Cgroup] = []
        self.seq = 0
        me = os.getpid()
        if self.layout is not None:
            def stale(name: str) -> bool:
                head = name.split("-", 1)[0]
                return head.isdigit() and int(head) != me and not _alive(int(head))

            Cgroup.sweep(self.layout, stale)
        _send(ctl, {"ok": True, "pid": me, "probe": probe,
                    "cgroup": self.layout.version if self.layout else
                    (layout if isinstance(layout, str) else probe.get("cgroup"))})

    def run(self) -> NoReturn:
        poller = select.poll()
        poller.register(self.ctl.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            events = poller.poll(200 if self.leftover else None)
            self._drain_wake()
            self._reap()
            self._retry_leftover()
            for fd, _ev in events:
                if fd == self.ctl.fileno() and not self._handle():
                    self._shutdown()

    def _handle(self) -> bool:
        try:
            req, fds = _recv(self.ctl, maxfds=64)
        except (OSError, ValueError, EOFError):
            return False
        if req is None:
            return False
        op = req.get("op")
        try:
            if op == "spawn":
                self._spawn(req, fds)
            elif op == "status":
                self._reap()
                pid = req["pid"]
                if pid in self.exited:
                    _send(self.ctl, {"ok": True, "exited": True, **self.exited.pop(pid)})
                elif pid in self.children:
                    _send(self.ctl, {"ok": True, "exited": False})
                else:
                    _send(self.ctl, {"ok": True, "exited": True, "status": None})
            elif op == "close":
                self._shutdown(reply=True)
            else:
                _send(self.ctl, {"ok": False, "error": f"unknown request {op!r}"})
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        return True

    def _spawn(self, req: dict, fds: list[int]) -> None:
        try:
            spec = JailSpec.model_validate(req["spec"])
            entry, extra = str(req["entry"]), int(req["extra"])
            if len(fds) != 1 + extra:
                raise ValueError(f"expected {1 + extra} channel descriptors, got {len(fds)}")
            if spec.mode == "strict" and self.mode != "strict":
                raise SandboxUnavailableError("this template runs in mode 'process'")
        except Exception as e:
            _send(self.ctl, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            return
        strict = spec.mode == "strict"
        cg: Cgroup | None = None
        if self.layout is not None:
            self.seq += 1
            try:
                cg = Cgroup.create(self.layout, f"{os.getpid()}-{self.seq}", spec.limits)
            except SandboxUnavailableError as e:
                if strict:
                    _send(self.ctl, {"ok": False, "error": str(e)})
                    return
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            if strict:
                jail.unshare(jail.CLONE_NEWPID)  # for the next child only
            pid = os.fork()
        except OSError as e:
            if strict:
                jail.setns(self.pidns, jail.CLONE_NEWPID)
            os.close(ready_r)
            os.close(ready_w)
            if cg is not None:
                cg.remove()
            _send(self.ctl, {"ok": False, "error": f"namespaces: cannot fork: {e}"})
            return
        if pid == 0:
            self._child(spec, entry, fds, ready_w, cg)
        if strict:
            # back to our own namespace: unshare(CLONE_NEWPID) fails with EINVAL
            # while the namespace for children differs from our own
            jail.setns(self.pidns, jail.CLONE_NEWPID)
        os.close(ready_w)
        for fd in fds:
            os.close(fd)
        fds.clear()
        msg = self._await_ready(ready_r)
        if msg == b"K":
            pidfd = os.pidfd_open(pid)
            self.children[pid] = cg
            try:
                _send(self.ctl, {"ok": True, "pid": pid, "cgroup": cg.to_dict() if cg else None},
                      [pidfd])
            finally:
                os.close(pidfd)
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            _, st = os.waitpid(pid, 0)
            status = os.waitstatus_to_exitcode(st)
        except ChildProcessError:
            status = None
        if cg is not None:
            cg.kill()
            if not cg.remove():
                self.leftover.append(cg)
        if msg.startswith(b"E"):
            why = msg[1:].decode(errors="replace")
        elif msg:
            why = f"unexpected readiness message {msg[:40]!r}"
        else:
            why = (f"it exited during setup (status {status})" if status is not None
                   else f"no sign of readiness in {_READY_TIMEOUT:.0f} s")
        _send(self.ctl, {"ok": False, "error": why})

    def _await_ready(self, fd: int) -> bytes:
        deadline = time.monotonic() + _READY_TIMEOUT
        p = select.poll()
        p.register(fd, select.POLLIN)
        buf = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not p.poll(int(left * 1000) + 1):
                    return buf
                chunk = os.read(fd, 4096)
                if not chunk or buf + chunk == b"K":
                    return buf + chunk
                buf += chunk
        finally:
            os.close(fd)

    def _child(self, spec: JailSpec, entry: str, fds: list[int], ready_w: int,
               cg: Cgroup | None) -> NoReturn:
        code = 1
        try:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                jail.set_pdeathsig(signal.SIGKILL)
                os.close(self.lifeline_w)
                p = select.poll()
                p.register(self.lifeline_r, select.POLLIN)
                if p.poll(0):
                    os._exit(1)  # the template is gone: pdeathsig came too late
                self.ctl.detach()
                os.setsid()  # a session and process group of its own: killpg(0) reaches only it
                null = os.open("/dev/null", os.O_RDWR)
                for std in (0, 1, 2):
                    os.dup2(null, std)
                low = 3
                for keep in sorted({*fds, ready_w}):
                    if keep > low:
                        os.closerange(low, keep)
                    low = max(low, keep + 1)
                os.closerange(low, 0x7FFFFFFF)
                sys.dont_write_bytecode = True
                jail.enter(spec, cgroup=cg)
                # Jailed: now, and only now, the tenant's settings and code.
                os.environ.clear()
                os.environ.update(self.sandbox_env)
                if self.code_path:
                    sys.path.insert(0, self.code_path)
                if spec.read_write:
                    os.environ["HOME"] = os.environ["TMPDIR"] = os.getcwd()
                module, _, name = entry.partition(":")
                fn = getattr(importlib.import_module(module), name)
            except BaseException as e:
                msg = (str(e) if isinstance(e, SandboxUnavailableError)
                       else f"{type(e).__name__}: {e}")
                os.write(ready_w, b"E" + msg.encode(errors="replace")[:3000])
                os._exit(111)
            os.write(ready_w, b"K")
            os.close(ready_w)
            sock = socket.socket(fileno=fds[0])
            extra = [socket.socket(fileno=fd) for fd in fds[1:]]
            boot, _ = _recv(sock)
            if boot is None:
                os._exit(0)
            rc = fn(sock, boot, extra)
            code = rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            code = 1
        finally:
            os._exit(code & 0xFF)

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, st, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.children:
                continue  # an orphan re-parented to us (process mode), or a failed spawn
            cg = self.children.pop(pid)
            info: dict[str, Any] = {
                "status": os.waitstatus_to_exitcode(st),
                # its own and its reaped descendants' (the cgroup's count is better)
                "cpu_ns": int((usage.ru_utime + usage.ru_stime) * 1e9),
            }
            if cg is not None:
                cg.kill()  # process mode: descendants go with it
                info.update({k: v for k, v in cg.stats().items() if v is not None})
                if not cg.remove():
                    self.leftover.append(cg)
            self.exited[pid] = info

    def _retry_leftover(self) -> None:
        self.leftover = [cg for cg in self.leftover if not (cg.kill() or cg.remove())]

    def _kill_all(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            if self.children:
                time.sleep(0.005)

    def _shutdown(self, reply: bool = False) -> NoReturn:
        """Kill and reap every sandbox, remove the cgroups, (answer,) exit."""
        try:
            self._kill_all()
            deadline = time.monotonic() + 2
            while self.leftover and time.monotonic() < deadline:
                self._retry_leftover()
                if self.leftover:
                    time.sleep(0.01)
            if self.layout is not None:
                Cgroup.remove_parents(self.layout)
            if reply:
                _send(self.ctl, {"ok": True,
                                 "exited": {str(k): v for k, v in self.exited.items()}})
        finally:
            os._exit(0)
