"""The kernel jail of a sandbox process: applied in the child before any tenant code runs.

`enter(spec)` confines the calling process for good (nothing here can be undone
from inside); `probe()` says which mechanisms this machine offers; `Cgroup` is a
sandbox's control group, made and removed by the trusted side (`template.py`)
and joined by the sandbox in `enter`. Everything is done with ctypes on libc
and raw syscalls (x86_64 numbers), no dependency.

Mode "strict" (each mechanism is required; a missing one raises
`SandboxUnavailableError` naming it):

1. Namespaces. The process must already be pid 1 of a fresh PID namespace (the
   template forks it there: unshare(CLONE_NEWPID) only affects children). It
   joins its cgroup, then unshares mount, network, IPC, UTS and cgroup
   namespaces. Mounts: everything becomes private and read-only recursively
   (mount_setattr), `read_write[1:]` are bound read-write on themselves, a tmpfs
   of `scratch_mb` MiB goes on the scratch dir (`read_write[0]`: it vanishes
   with the mount namespace, i.e. with the sandbox) and a fresh read-only proc
   on /proc (it shows only the sandbox's own processes). The network namespace
   holds only `lo`, brought up (the egress forwarder listens on 127.0.0.1 in it).
2. cgroup (v1 controllers pids, memory and cpuacct, else v2 pids and memory):
   pids.max = `processes`, memory limit = `memory_mb`. The tmpfs scratch is
   charged to it too.
3. rlimits: RLIMIT_AS = `memory_mb`, RLIMIT_NOFILE = `open_files`,
   RLIMIT_FSIZE = `file_size_mb`, RLIMIT_CORE = 0. RLIMIT_NPROC does not bind
   uid 0; processes are capped by the pids cgroup.
4. Capabilities: securebits NOROOT, NO_SETUID_FIXUP and NO_CAP_AMBIENT_RAISE set and
   locked, KEEP_CAPS off and locked, the bounding set emptied, ambient cleared, effective, permitted
   and inheritable set to 0; then PR_SET_NO_NEW_PRIVS.
   The sandbox stays uid 0: the Python runtime lives under /root/.pyenv and
   /root is mode 0700, so another uid could not even load it. uid 0 without a
   single capability (and no way back: bounding set empty, NOROOT locked, no
   new privileges) is an ordinary user that happens to own root's files; what
   it could do as their owner is taken away by Landlock (no write anywhere but
   its own paths, no read outside the allow list) and the read-only mounts
   (no chmod, chown, utime or xattr on root's files, which Landlock does not
   cover), and /proc/sys is read-only.
5. Landlock (best ABI available, at least 1): read and execute on the Python
   runtime (prefixes and sys.path), the dynwf_ray package, `read_only`, shared
   libraries, CA certificates, zoneinfo, a few /dev files and the fresh /proc;
   read and write on `read_write` and /dev/null; nothing else. ABI >= 4: no TCP
   bind or connect except on `egress_port`. ABI >= 6: signals and abstract Unix
   sockets scoped to the sandbox. (Network and scopes are defence in depth, the
   network and PID namespaces already isolate, so they are not required.)
6. seccomp: a BPF filter built here (no libseccomp binding needed for ~60 fixed
   rules): kill on a foreign arch or x32 syscall; EPERM for the kernel-wide and
   cross-process syscalls (ptrace, mount API, namespaces, bpf, keyrings,
   modules, io_uring...), for clone with namespace flags, for prctl
   PR_SET_PDEATHSIG (the sandbox must die with its template), for personality
   other than the default; ENOSYS for clone3 (its flags cannot be inspected;
   libc falls back to clone); socket() only for AF_INET/AF_INET6 and only when
   `egress_port` is set (socketpair stays: asyncio needs it).

Mode "process": a separate process with rlimits, no_new_privs and (best effort)
no capabilities, in the cgroup when one was made; no namespaces, Landlock or
seccomp. The clean environment and closed file descriptors are the template's
part.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import resource
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import SandboxUnavailableError
from .policy import JailSpec, SandboxLimits

__all__ = ["Cgroup", "SandboxUnavailableError", "cgroup_layout", "enter", "probe"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

MiB = 1024 * 1024

# --- syscall numbers (x86_64; 424 and above are the same on every arch) --------------
_NR_CAPGET, _NR_CAPSET = 125, 126
_NR_MOUNT_SETATTR = 442
_NR_LANDLOCK_CREATE_RULESET, _NR_LANDLOCK_ADD_RULE, _NR_LANDLOCK_RESTRICT_SELF = 444, 445, 446

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_SECCOMP = 22
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_PR_SET_CHILD_SUBREAPER = 36

# securebits: NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED (KEEP_CAPS itself off),
# NO_CAP_AMBIENT_RAISE, each with its lock.
_SECUREBITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x4000, 1 << 18
_MOUNT_ATTR_RDONLY = 0x1
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000

_CAP_SETPCAP, _CAP_SYS_ADMIN = 8, 21


def _errcheck(res: int, what: str) -> int:
    if res == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return res


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    """prctl(2), raising OSError on failure."""
    return _errcheck(_libc.prctl(option, a2, a3, a4, a5), f"prctl({option})")


def unshare(flags: int) -> None:
    """unshare(2)."""
    _errcheck(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    """setns(2)."""
    _errcheck(_libc.setns(fd, nstype), f"setns({nstype:#x})")


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Ask for `sig` when the parent (thread) exits."""
    prctl(_PR_SET_PDEATHSIG, int(sig))


def set_child_subreaper() -> None:
    """Orphaned descendants are re-parented to this process (which must reap them)."""
    prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _errcheck(
        _libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}"
    )


# --- cgroups -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where this process's cgroups are: version and, per controller, its directory."""

    version: int
    #: v1: {"pids": dir, "memory": dir, "cpuacct": dir}; v2: {"unified": dir}
    own: dict[str, str]


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def _mountinfo() -> list[tuple[str, str, str, str, str]]:
    """(root, mountpoint, options, fstype, superoptions) of every mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            out.append((_unescape(a[3]), _unescape(a[4]), a[5], b[0], b[2] if len(b) > 2 else ""))
    return out


def _under(mountpoint: str, mount_root: str, path: str) -> str | None:
    if mount_root != "/" and path != mount_root and not path.startswith(mount_root + "/"):
        return None
    rel = path[len(mount_root):] if mount_root != "/" else path
    return os.path.normpath(mountpoint + "/" + rel.lstrip("/"))


def cgroup_layout() -> _Layout | str:
    """This process's cgroup directories for the controllers a sandbox needs, or why not."""
    try:
        own: dict[str, str] = {}
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                for c in ctrls.split(",") if ctrls else [""]:
                    own[c] = path
        mounts = _mountinfo()
    except OSError as e:
        return f"cannot read the cgroup setup: {e}"
    v1: dict[str, str] = {}
    for ctrl in ("pids", "memory", "cpuacct"):
        for root, mp, _opts, fstype, superopts in mounts:
            if fstype == "cgroup" and ctrl in superopts.split(",") and ctrl in own:
                d = _under(mp, root, own[ctrl])
                if d and os.path.isdir(d):
                    v1[ctrl] = d
                    break
    if len(v1) == 3:
        return _Layout(1, v1)
    for root, mp, _opts, fstype, _super in mounts:
        if fstype == "cgroup2" and "" in own:
            d = _under(mp, root, own[""])
            if d and os.path.isdir(d):
                try:
                    with open(os.path.join(d, "cgroup.controllers")) as f:
                        ctrls = f.read().split()
                except OSError:
                    ctrls = []
                missing = {"pids", "memory"} - set(ctrls)
                if not missing:
                    return _Layout(2, {"unified": d})
                why = f"cgroup v2 at {d} lacks the {', '.join(sorted(missing))} controller"
                if v1:
                    why += f" (and cgroup v1 has only {', '.join(sorted(v1))})"
                return why
    return "no cgroup v1 pids+memory+cpuacct hierarchies and no cgroup v2 mount"


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _keyed(path: str) -> dict[str, int]:
    out = {}
    try:
        for line in _read(path).splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


@dataclass
class Cgroup:
    """One sandbox's cgroup (in each v1 hierarchy, or the v2 one).

    Made by the trusted side with `create`, joined by the sandbox in `enter`,
    read (`stats`) and removed (`remove`) by the trusted side once the sandbox is gone.
    Crosses between processes as `to_dict()` / `from_dict()`.
    """

    version: int
    #: controller -> directory (v2: {"unified": dir})
    dirs: dict[str, str]
    memory_mb: int = 0
    processes: int = 0

    PARENT = "dynwf"

    @classmethod
    def create(cls, layout: _Layout, name: str, limits: SandboxLimits) -> "Cgroup":
        """Make `dynwf/<name>` below this process's own cgroup(s), with the limits set.

        Another template in the same cgroup may rmdir the empty `dynwf` parent
        (`remove_parents`) between our making it and making `<name>` in it; that shows as
        FileNotFoundError and is simply tried again.
        """
        for _ in range(5):
            try:
                return cls._create_once(layout, name, limits)
            except FileNotFoundError as e:
                missing = e
        raise SandboxUnavailableError(
            f"cgroup: cannot make the sandbox's cgroup: {missing}") from missing

    @classmethod
    def _create_once(cls, layout: _Layout, name: str, limits: SandboxLimits) -> "Cgroup":
        dirs: dict[str, str] = {}
        try:
            if layout.version == 2:
                own = layout.own["unified"]
                base = os.path.join(own, cls.PARENT)
                _v2_enable(own, base)
                dirs["unified"] = os.path.join(base, name)
            else:
                for ctrl, own in layout.own.items():
                    base = os.path.join(own, cls.PARENT)
                    os.makedirs(base, exist_ok=True)
                    dirs[ctrl] = os.path.join(base, name)
            cg = cls(layout.version, {}, limits.memory_mb, limits.processes)
            for ctrl, d in dirs.items():
                if d not in cg.dirs.values():  # co-mounted controllers share a directory
                    os.mkdir(d, 0o755)
                cg.dirs[ctrl] = d
            mem = str(limits.memory_mb * MiB)
            if layout.version == 2:
                d = dirs["unified"]
                _write(f"{d}/pids.max", str(limits.processes))
                _write(f"{d}/memory.max", mem)
                try:
                    _write(f"{d}/memory.swap.max", "0")
                except OSError:
                    pass
            else:
                _write(f"{dirs['pids']}/pids.max", str(limits.processes))
                _write(f"{dirs['memory']}/memory.limit_in_bytes", mem)
                try:  # only where swap accounting is on
                    _write(f"{dirs['memory']}/memory.memsw.limit_in_bytes", mem)
                except OSError:
                    pass
            return cg
        except OSError as e:
            for d in dirs.values():
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            if isinstance(e, FileNotFoundError):
                raise
            raise SandboxUnavailableError(f"cgroup: cannot make the sandbox's cgroup: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "dirs": self.dirs, "memory_mb": self.memory_mb,
                "processes": self.processes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cgroup":
        return cls(d["version"], dict(d["dirs"]), d["memory_mb"], d["processes"])

    def join(self) -> None:
        """Move the calling process into this cgroup (every hierarchy)."""
        for d in self.dirs.values():
            _write(f"{d}/cgroup.procs", "0")

    def pids(self) -> list[int]:
        """Processes in it (pids as this process sees them)."""
        d = self.dirs.get("pids") or self.dirs.get("unified")
        try:
            return [int(x) for x in _read(f"{d}/cgroup.procs").split()]
        except (OSError, TypeError):
            return []

    def cpu_ns(self) -> int | None:
        try:
            if self.version == 2:
                return _keyed(f"{self.dirs['unified']}/cpu.stat")["usage_usec"] * 1000
            return int(_read(f"{self.dirs['cpuacct']}/cpuacct.usage"))
        except (OSError, KeyError, ValueError):
            return None

    def stats(self) -> dict[str, int | None]:
        """cpu_ns, oom_kills, memory_hits (limit reached), pids_max_hits, pids_current."""
        if self.version == 2:
            d = self.dirs["unified"]
            mev, pev = _keyed(f"{d}/memory.events"), _keyed(f"{d}/pids.events")
            oom, hits = mev.get("oom_kill"), mev.get("max")
            pids_cur = f"{d}/pids.current"
        else:
            mem = self.dirs["memory"]
            oom = _keyed(f"{mem}/memory.oom_control").get("oom_kill")
            try:
                hits = int(_read(f"{mem}/memory.failcnt"))
            except (OSError, ValueError):
                hits = None
            pev = _keyed(f"{self.dirs['pids']}/pids.events")
            pids_cur = f"{self.dirs['pids']}/pids.current"
        try:
            cur: int | None = int(_read(pids_cur))
        except (OSError, ValueError):
            cur = None
        return {"cpu_ns": self.cpu_ns(), "oom_kills": oom, "memory_hits": hits,
                "pids_max_hits": pev.get("max"), "pids_current": cur}

    def kill(self) -> None:
        """SIGKILL everything in it (v2: cgroup.kill; v1: each listed process, a few rounds)."""
        if self.version == 2:
            try:
                _write(f"{self.dirs['unified']}/cgroup.kill", "1")
                return
            except OSError:
                pass
        for _ in range(5):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def remove(self) -> bool:
        """rmdir it; True once gone (False: processes still in it, try again later)."""
        ok = True
        for d in self.dirs.values():
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        return ok

    @staticmethod
    def remove_parents(layout: _Layout) -> None:
        """rmdir the `dynwf` parents if no sandbox cgroup is left in them."""
        for own in layout.own.values():
            try:
                os.rmdir(os.path.join(own, Cgroup.PARENT))
            except OSError:
                pass

    @staticmethod
    def sweep(layout: _Layout, is_stale: Callable[[str], bool], min_age: float = 60.0) -> None:
        """rmdir the (empty) sandbox cgroups, older than `min_age` seconds, whose name
        `is_stale(name)` says are left over (by a template that was killed)."""
        now = time.time()
        for own in layout.own.values():
            base = os.path.join(own, Cgroup.PARENT)
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                p = os.path.join(base, name)
                try:
                    young = now - os.stat(p).st_ctime < min_age
                except OSError:
                    continue
                if not young and is_stale(name):
                    try:
                        os.rmdir(p)
                    except OSError:
                        pass


def _v2_undelegated(own: str) -> str | None:
    """Why no sandbox cgroup can be made below this v2 cgroup, or None. The kernel lets
    a cgroup other than the root enable controllers for its children only while it
    holds no process itself, and sandbox cgroups are made below the template's own
    cgroup, which holds the template: so on cgroup v2 this works at the root cgroup
    only. Seen in a container: each sandbox failed with EBUSY after the probe passed."""
    if not os.path.exists(f"{own}/cgroup.type"):
        return None  # the root cgroup: exempt from the rule
    try:
        enabled = set(_read(f"{own}/cgroup.subtree_control").split())
        busy = bool(_read(f"{own}/cgroup.procs").split())
    except OSError as e:
        return f"cannot read the cgroup at {own}: {e.strerror}"
    if {"pids", "memory"} <= enabled or not busy:
        return None
    return (f"cgroup v2 at {own} holds processes and does not enable pids and memory for "
            "its children, which the kernel allows only in a cgroup without processes of "
            "its own (or the root cgroup): strict sandboxes on cgroup v2 need the engine "
            "in the root cgroup for now (docs/security.md, cgroup v2)")


def _v2_enable(own: str, base: str) -> None:
    want = {"pids", "memory"}
    for d, create in ((own, False), (base, True)):
        if create:
            os.makedirs(d, exist_ok=True)
        enabled = set(_read(f"{d}/cgroup.subtree_control").split())
        if not want <= enabled:
            try:
                _write(f"{d}/cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(want)))
            except OSError as e:
                raise OSError(e.errno, f"cannot enable pids and memory in {d} (a v2 cgroup "
                              "with processes in it cannot delegate controllers: start the "
                              f"template in a cgroup of its own): {e.strerror}") from e


# --- rlimits -------------------------------------------------------------------------


def _set_rlimits(limits: SandboxLimits) -> None:
    with open("/proc/self/statm") as f:
        vsz = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    if vsz + 16 * MiB > limits.memory_mb * MiB:
        raise SandboxUnavailableError(
            f"rlimits: this process already maps {vsz // MiB} MiB, the memory limit of "
            f"{limits.memory_mb} MiB leaves no room (preload less in the template)")
    for res, value in ((resource.RLIMIT_AS, limits.memory_mb * MiB),
                       (resource.RLIMIT_NOFILE, limits.open_files),
                       (resource.RLIMIT_FSIZE, limits.file_size_mb * MiB),
                       (resource.RLIMIT_CORE, 0)):
        _soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))


# --- capabilities --------------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CAP_V3 = 0x20080522


def _cap_last() -> int:
    try:
        return int(_read("/proc/sys/kernel/cap_last_cap"))
    except (OSError, ValueError):
        return 63


def _drop_capabilities(strict: bool) -> None:
    """Empty every capability set for good. Not strict: as far as allowed, silently."""
    steps = [lambda: prctl(_PR_SET_SECUREBITS, _SECUREBITS)]
    steps += [lambda c=c: prctl(_PR_CAPBSET_DROP, c) for c in range(_cap_last() + 1)]
    steps.append(lambda: prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL))

    def capset() -> None:
        hdr, data = _CapHeader(_CAP_V3, 0), (_CapData * 2)()
        _errcheck(_libc.syscall(ctypes.c_long(_NR_CAPSET), ctypes.byref(hdr), ctypes.byref(data)),
                  "capset")

    steps.append(capset)
    for step in steps:
        try:
            step()
        except OSError:
            if strict:
                raise
    if strict:
        hdr, data = _CapHeader(_CAP_V3, 0), (_CapData * 2)()
        _errcheck(_libc.syscall(ctypes.c_long(_NR_CAPGET), ctypes.byref(hdr), ctypes.byref(data)),
                  "capget")
        if any(d.effective or d.permitted or d.inheritable for d in data):
            raise OSError(errno.EPERM, "capabilities are still held after capset")


def _caps_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Cap"):
                k, v = line.split(":")
                out[k] = int(v, 16)
    return out


# --- landlock ------------------------------------------------------------------------

_LL_EXECUTE = 1 << 0
_LL_WRITE_FILE = 1 << 1
_LL_READ_FILE = 1 << 2
_LL_READ_DIR = 1 << 3
_LL_REMOVE_DIR = 1 << 4
_LL_REMOVE_FILE = 1 << 5
_LL_MAKE_CHAR = 1 << 6
_LL_MAKE_DIR = 1 << 7
_LL_MAKE_REG = 1 << 8
_LL_MAKE_SOCK = 1 << 9
_LL_MAKE_FIFO = 1 << 10
_LL_MAKE_BLOCK = 1 << 11
_LL_MAKE_SYM = 1 << 12
_LL_REFER = 1 << 13  # ABI 2
_LL_TRUNCATE = 1 << 14  # ABI 3
_LL_IOCTL_DEV = 1 << 15  # ABI 5
_LL_FILE_ONLY = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV
_LL_NET_BIND_TCP, _LL_NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_LL_SCOPE_ABSTRACT_UNIX_SOCKET, _LL_SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
_LL_RULE_PATH_BENEATH, _LL_RULE_NET_PORT = 1, 2

_RO = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
_RW = (_LL_READ_FILE | _LL_READ_DIR | _LL_WRITE_FILE | _LL_REMOVE_DIR | _LL_REMOVE_FILE
       | _LL_MAKE_DIR | _LL_MAKE_REG | _LL_MAKE_FIFO | _LL_MAKE_SYM | _LL_REFER | _LL_TRUNCATE)

#: Read-only system paths every sandbox gets (those that exist).
SYSTEM_READ_ONLY = (
    "/usr/lib", "/lib", "/lib64", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache",
    "/etc/ssl", "/etc/ca-certificates", "/usr/share/ca-certificates", "/usr/share/zoneinfo",
    "/etc/localtime", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random",
)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel; 0 if Landlock is missing or disabled."""
    res = _libc.syscall(ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                        ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    return max(int(res), 0)


def _fs_handled(abi: int) -> int:
    bits = (1 << 13) - 1
    if abi >= 2:
        bits |= _LL_REFER
    if abi >= 3:
        bits |= _LL_TRUNCATE
    if abi >= 5:
        bits |= _LL_IOCTL_DEV
    return bits


def _runtime_paths() -> list[str]:
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    paths += [p for p in sys.path if p and os.path.isabs(p)]
    pkg = sys.modules.get("dynwf_ray")
    if pkg is not None and getattr(pkg, "__file__", None):
        paths.append(os.path.dirname(pkg.__file__))
    return paths


def _landlock_ruleset(spec: JailSpec, scratch: str | None, proc: bool) -> int:
    abi = landlock_abi()
    if abi < 1:
        raise OSError(errno.ENOSYS, "Landlock is not available (kernel without it, or not in lsm=)")
    handled = _fs_handled(abi)
    attr = _RulesetAttr(handled, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = _LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = _LL_SCOPE_ABSTRACT_UNIX_SOCKET | _LL_SCOPE_SIGNAL
        size = 24
    fd = _errcheck(_libc.syscall(ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                                 ctypes.c_size_t(size), ctypes.c_uint32(0)),
                   "landlock_create_ruleset")
    try:
        rules: list[tuple[str, int]] = [(p, _RO) for p in _runtime_paths()]
        rules += [(p, _RO) for p in (*SYSTEM_READ_ONLY, *spec.read_only)]
        if proc:
            rules.append(("/proc", _LL_READ_FILE | _LL_READ_DIR))
        rules += [(p, _RW) for p in spec.read_write]
        rules.append(("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE | _LL_TRUNCATE))
        if scratch and scratch not in spec.read_write:
            rules.append((scratch, _RW))
        for path, access in rules:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a path that does not exist grants nothing
            try:
                if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                    access &= _LL_FILE_ONLY
                rule = _PathBeneathAttr(access & handled, pfd)
                _errcheck(_libc.syscall(ctypes.c_long(_NR_LANDLOCK_ADD_RULE), ctypes.c_int(fd),
                                        ctypes.c_int(_LL_RULE_PATH_BENEATH), ctypes.byref(rule),
                                        ctypes.c_uint32(0)), f"landlock_add_rule {path}")
            finally:
                os.close(pfd)
        if abi >= 4 and spec.egress_port:
            rule = _NetPortAttr(_LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP, spec.egress_port)
            _errcheck(_libc.syscall(ctypes.c_long(_NR_LANDLOCK_ADD_RULE), ctypes.c_int(fd),
                                    ctypes.c_int(_LL_RULE_NET_PORT), ctypes.byref(rule),
                                    ctypes.c_uint32(0)), "landlock_add_rule port")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _landlock_restrict(fd: int) -> None:
    try:
        _errcheck(_libc.syscall(ctypes.c_long(_NR_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd),
                                ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(fd)


# --- seccomp -------------------------------------------------------------------------

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16  # struct seccomp_data; args are little-endian

#: Syscalls that answer EPERM (x86_64 numbers).
_DENY_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "process_madvise": 440,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "setns": 308,
    "unshare": 272, "bpf": 321, "keyctl": 250, "add_key": 248, "request_key": 249,
    "perf_event_open": 298, "init_module": 175, "finit_module": 313, "delete_module": 176,
    "kexec_load": 246, "kexec_file_load": 320, "reboot": 169, "swapon": 167, "swapoff": 168,
    "acct": 163, "quotactl": 179, "quotactl_fd": 443, "syslog": 103, "settimeofday": 164,
    "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "ioperm": 173, "iopl": 172,
    "userfaultfd": 323, "open_by_handle_at": 304, "name_to_handle_at": 303,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "mknod": 133,
    "mknodat": 259, "fanotify_init": 300, "lookup_dcookie": 212, "kcmp": 312,
    "pidfd_getfd": 438, "move_mount": 429, "open_tree": 428, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "mount_setattr": 442, "open_tree_attr": 467, "uselib": 134,
}
_NR_SOCKET, _NR_CLONE, _NR_CLONE3, _NR_PERSONALITY, _NR_PRCTL = 41, 56, 435, 135, 157
_NS_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
             | CLONE_NEWPID | CLONE_NEWNET)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(egress: bool) -> list[tuple[int, int, int, int]]:
    """The BPF program of the sandbox's seccomp filter, as (code, jt, jf, k) rows."""
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    p: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _OFF_NR),
        (_JSET_K, 0, 1, _X32_BIT),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
    ]
    for nr in sorted(_DENY_X86_64.values()):
        p += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, eperm)]
    p += [(_JEQ_K, 0, 1, _NR_CLONE3), (_RET_K, 0, 0, enosys)]

    def block(nr: int, body: list[tuple[int, int, int, int]]) -> None:
        # if nr == NR: body (which always returns); else skip it (A still holds nr)
        p.append((_JEQ_K, 0, len(body), nr))
        p.extend(body)

    # socket(family, ...): AF_INET/AF_INET6 with egress only
    if egress:
        block(_NR_SOCKET, [(_LD_W_ABS, 0, 0, _OFF_ARG0), (_JEQ_K, 2, 0, socket.AF_INET),
                           (_JEQ_K, 1, 0, socket.AF_INET6), (_RET_K, 0, 0, eperm),
                           (_RET_K, 0, 0, _RET_ALLOW)])
    else:
        block(_NR_SOCKET, [(_RET_K, 0, 0, eperm)])
    # clone(flags, ...): no namespace flags
    block(_NR_CLONE, [(_LD_W_ABS, 0, 0, _OFF_ARG0), (_JSET_K, 0, 1, _NS_FLAGS),
                      (_RET_K, 0, 0, eperm), (_RET_K, 0, 0, _RET_ALLOW)])
    # personality(persona): only PER_LINUX (0) and the query 0xffffffff
    block(_NR_PERSONALITY, [(_LD_W_ABS, 0, 0, _OFF_ARG0), (_JEQ_K, 2, 0, 0),
                            (_JEQ_K, 1, 0, 0xFFFFFFFF), (_RET_K, 0, 0, eperm),
                            (_RET_K, 0, 0, _RET_ALLOW)])
    # prctl(PR_SET_PDEATHSIG, ...): the sandbox must die with its template
    block(_NR_PRCTL, [(_LD_W_ABS, 0, 0, _OFF_ARG0), (_JEQ_K, 0, 1, _PR_SET_PDEATHSIG),
                      (_RET_K, 0, 0, eperm), (_RET_K, 0, 0, _RET_ALLOW)])
    p.append((_RET_K, 0, 0, _RET_ALLOW))
    return p


def _install_seccomp(egress: bool) -> None:
    prog = seccomp_program(egress)
    arr = (_SockFilter * len(prog))(*[_SockFilter(*row) for row in prog])
    fprog = _SockFprog(len(prog), arr)
    _errcheck(_libc.prctl(_PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0),  # MODE_FILTER
              "prctl(PR_SET_SECCOMP)")


# --- namespaces and mounts -----------------------------------------------------------


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _mount_setattr(path: str, attr_set: int, attr_clr: int, propagation: int) -> None:
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    _errcheck(_libc.syscall(ctypes.c_long(_NR_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD),
                            path.encode(), ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr),
                            ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr {path}")


def _remount_tree(rdonly: bool) -> None:
    """Old kernels without mount_setattr: / private, then every mount bind-remounted."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
    keep = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC}
    for _root, mp, opts, _fs, _super in _mountinfo():
        flags = _MS_REMOUNT | _MS_BIND | (_MS_RDONLY if rdonly else 0)
        for o in opts.split(","):
            flags |= keep.get(o, 0)
        try:
            _mount(None, mp, None, flags, None)
        except OSError:
            pass


def _mounts(spec: JailSpec, scratch: str | None) -> bool:
    """Private read-only tree, read-write binds, tmpfs scratch, fresh proc (True if mounted)."""
    try:
        _mount_setattr("/", _MOUNT_ATTR_RDONLY, 0, _MS_PRIVATE)
        has_setattr = True
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        _remount_tree(rdonly=True)
        has_setattr = False
    for path in spec.read_write[1:]:
        if not os.path.exists(path):
            continue
        _mount(path, path, None, _MS_BIND | _MS_REC, None)
        if has_setattr:
            _mount_setattr(path, 0, _MOUNT_ATTR_RDONLY, 0)
        else:
            _mount(None, path, None, _MS_REMOUNT | _MS_BIND, None)
    if scratch:
        mb = spec.limits.scratch_mb
        _mount("tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={mb}m,nr_inodes={max(1024, mb * 256)},mode=0700")
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY, None)
        return True
    except OSError:
        return False  # /proc stays the host's, so Landlock denies it entirely


_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack("16sH22x", ifr)[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _scratch(spec: JailSpec) -> str | None:
    if not spec.read_write:
        return None
    path = spec.read_write[0]
    if not os.path.isabs(path):
        raise SandboxUnavailableError(f"scratch: {path!r} is not an absolute path")
    return os.path.realpath(path)


# --- the jail ------------------------------------------------------------------------


def enter(spec: JailSpec, *, cgroup: Cgroup | None = None) -> None:
    """Confine the calling process as `spec` says, for good; chdir to the scratch dir.

    Call it in a freshly forked, single-threaded child; in mode "strict" it must
    be pid 1 of a fresh PID namespace, and `cgroup` (made by the parent) is required.
    Raises SandboxUnavailableError naming the mechanism that failed (the process
    is then half-confined: let it exit).
    """
    strict = spec.mode == "strict"
    scratch = _scratch(spec)
    step = "setup"
    try:
        if strict:
            if _threads() != 1:
                raise SandboxUnavailableError("landlock/seccomp: enter() needs a single-threaded "
                                              "process (fork, then enter)")
            if os.getpid() != 1:
                raise SandboxUnavailableError(
                    "namespaces: enter() must run as pid 1 of a fresh PID namespace "
                    "(unshare(CLONE_NEWPID), then fork: the template does this)")
            if cgroup is None:
                raise SandboxUnavailableError("cgroup: no cgroup was made for this sandbox")
        step = "cgroup"
        if cgroup is not None:
            cgroup.join()
        if scratch:
            step = "scratch"
            os.makedirs(scratch, mode=0o700, exist_ok=True)
        proc = False
        if strict:
            step = "namespaces"
            unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP)
            step = "namespaces (mounts)"
            proc = _mounts(spec, scratch)
            step = "namespaces (network)"
            _loopback_up()
            _errcheck(_libc.sethostname(b"sandbox", 7), "sethostname")
        if scratch:
            step = "scratch"
            os.chdir(scratch)  # after the tmpfs went on it
        step = "rlimits"
        _set_rlimits(spec.limits)
        ruleset = -1
        if strict:
            step = "landlock"
            ruleset = _landlock_ruleset(spec, scratch, proc)
        step = "capabilities"
        _drop_capabilities(strict)
        step = "no_new_privs"
        prctl(_PR_SET_NO_NEW_PRIVS, 1)
        if strict:
            step = "landlock"
            _landlock_restrict(ruleset)
            step = "seccomp"
            _install_seccomp(spec.egress_port is not None)
    except SandboxUnavailableError:
        raise
    except OSError as e:
        raise SandboxUnavailableError(f"{step}: {e.strerror or e}") from e


# --- probe ---------------------------------------------------------------------------

#: Mechanisms mode "strict" cannot do without (the others are defence in depth).
REQUIRED = ("namespaces", "cgroup", "rlimits", "capabilities", "no_new_privs", "landlock",
            "seccomp")


def probe() -> dict[str, str | None]:
    """Each mechanism -> None if this process could apply it, else why not.

    Keys: namespaces, cgroup, rlimits, capabilities, no_new_privs, landlock,
    landlock_net, landlock_scopes, seccomp (see REQUIRED). Static checks only
    (nothing is forked or confined); a spawn still reports what really failed.
    """
    out: dict[str, str | None] = {}
    try:
        caps = _caps_status()
    except OSError:
        caps = {}
    eff = caps.get("CapEff", 0)

    why = None
    if not eff & (1 << _CAP_SYS_ADMIN):
        why = "needs CAP_SYS_ADMIN (run the template as root)"
    else:
        for ns in ("pid", "net", "mnt", "ipc", "uts", "cgroup"):
            if not os.path.exists(f"/proc/self/ns/{ns}"):
                why = f"kernel without {ns} namespaces"
                break
            try:
                if int(_read(f"/proc/sys/user/max_{ns}_namespaces")) == 0:
                    why = f"user.max_{ns}_namespaces is 0"
                    break
            except (OSError, ValueError):
                pass
    out["namespaces"] = why

    layout = cgroup_layout()
    if isinstance(layout, str):
        out["cgroup"] = layout + " (only rlimits cap memory; nothing caps processes)"
    else:
        out["cgroup"] = None
        for own in layout.own.values():
            if not os.access(own, os.W_OK):
                out["cgroup"] = f"{own} is not writable (only rlimits cap memory)"
                break
            base = os.path.join(own, Cgroup.PARENT)
            if os.path.isdir(base) and not os.access(base, os.W_OK):
                out["cgroup"] = f"{base} is not writable (only rlimits cap memory)"
                break
            if layout.version == 2:
                out["cgroup"] = _v2_undelegated(own)

    out["rlimits"] = None
    if not eff:
        out["capabilities"] = None  # nothing to drop
    elif eff & (1 << _CAP_SETPCAP):
        out["capabilities"] = None
    else:
        out["capabilities"] = "cannot empty the bounding set without CAP_SETPCAP"
    try:
        _errcheck(_libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), "prctl(PR_GET_NO_NEW_PRIVS)")
        out["no_new_privs"] = None
    except OSError as e:
        out["no_new_privs"] = str(e)

    abi = landlock_abi()
    out["landlock"] = None if abi >= 1 else "Landlock is not available (kernel or lsm= setting)"
    out["landlock_net"] = None if abi >= 4 else f"needs Landlock ABI 4 (kernel has {abi})"
    out["landlock_scopes"] = None if abi >= 6 else f"needs Landlock ABI 6 (kernel has {abi})"

    if platform.machine() != "x86_64":
        out["seccomp"] = f"no syscall table for {platform.machine()} (x86_64 only)"
    else:
        try:
            actions = _read("/proc/sys/kernel/seccomp/actions_avail").split()
            missing = {"errno", "kill_process", "allow"} - set(actions)
            out["seccomp"] = (f"seccomp lacks the {', '.join(sorted(missing))} action"
                              if missing else None)
        except OSError:
            out["seccomp"] = "seccomp filters are not available (CONFIG_SECCOMP_FILTER)"
    return out
