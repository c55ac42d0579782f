"""Waking a host process on the same machine with a datagram instead of a Ray call.

A caller that knows which hosts serve a code version (`notify.Router`) wakes them
when it has made work of that version due. Through Ray, a wake is a task submitted,
scheduled and run on the host process's loop: about 1.7 ms on a 2-core machine, most
of the warm path's budget. So each host process also listens on a Unix datagram socket
named after its actor id, in a directory of this machine's temp dir that only this
user can enter (`address`); the same wake sent there arrives in about 0.15 ms. A caller
on another machine finds no such socket, and the caller then wakes the host through
Ray as before (`WakeSender.send` says False).

Only wakes go this way. A wake carries nothing but whom to wake, and a host claims only
within its quota, so a wake is never harmful, at worst useless. A host process that
does not (any more) serve the host named passes the notification on to the scheduler
(`WakeListener`'s `forward`), so none is lost to a stale route. Sandboxes cannot send
one: the strict jail allows no Unix socket and no path outside the sandbox's own.

`STATS` counts, per process, the wakes that arrived this way and those passed on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import tempfile
from typing import Any, Callable

log = logging.getLogger("dynwf_ray.wakeup")

#: Longest path a Unix socket address can hold (sun_path, less its terminating NUL).
_MAX_PATH = 107

#: Wakes of this process's hosts that came by datagram, and those passed on to the
#: scheduler because no host here serves what they named (reported with each host's
#: report, so `engine.stats()["wakes"]` sums them over host processes).
STATS = {"by_datagram": 0, "forwarded": 0}


def private_directory(create: bool) -> str | None:
    """This user's directory of sockets (wakes here, the journal's writer per machine in
    `journal.node_writer`), if it is this user's alone (else None: a directory someone
    else made or can enter is never listened or sent in)."""
    path = os.path.join(tempfile.gettempdir(), f"dynwf-wake-{os.getuid()}")
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


def address(actor_id: str, create: bool = False) -> str | None:
    """The wake socket's path of the host process whose Ray actor id is `actor_id`
    (hex), or None when this machine offers none (see `private_directory`)."""
    directory = private_directory(create)
    if directory is None:
        return None
    path = os.path.join(directory, f"{actor_id}.sock")
    return path if len(os.fsencode(path)) <= _MAX_PATH else None


def address_of(actor: Any) -> str | None:
    """`address` of a host process's actor handle (None for anything else)."""
    actor_id = getattr(actor, "_actor_id", None)
    return address(actor_id.hex()) if actor_id is not None else None


def _encode(host_id: int, tenant_id: str, version: str) -> bytes:
    return f"{host_id}\0{tenant_id}\0{version}".encode()


def _decode(data: bytes) -> tuple[int, str, str] | None:
    try:
        host_id, tenant_id, version = data.decode().split("\0")
        return int(host_id), tenant_id, version
    except ValueError:  # not a wake (UnicodeDecodeError is one too)
        return None


class WakeSender:
    """A caller's side: one unbound datagram socket, made on first use."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    def send(self, path: str, host_id: int, tenant_id: str, version: str) -> bool:
        """Wake host `host_id` of (tenant, version) in the process listening at `path`.
        False when it cannot arrive this way: no such socket on this machine (the
        process runs on another, or is gone) or its queue is full; then use Ray."""
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._sock = sock
        try:
            self._sock.sendto(_encode(host_id, tenant_id, version), path)
            return True
        except OSError:
            return False


class WakeListener:
    """A host process's side: the socket at `address(actor_id)`, read on its event loop.

    `wake(host_id)` wakes that host and says whether it serves; when it does not (the
    host ended or stops, or this process restarted without it), `forward(tenant,
    version)` hands the notification to the scheduler.
    """

    def __init__(self, actor_id: str, wake: Callable[[int], bool],
                 forward: Callable[[str, str], None]):
        self._actor_id = actor_id
        self._wake = wake
        self._forward = forward
        self._sock: socket.socket | None = None
        self._path: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Listen (False: this machine offers no wake socket; callers use Ray)."""
        path = address(self._actor_id, create=True)
        if path is None:
            return False
        _sweep(os.path.dirname(path))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            try:
                os.unlink(path)  # this actor's process before Ray restarted it
            except FileNotFoundError:
                pass
            sock.bind(path)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.warning("no wake socket at %s (%s): hosts here are woken through Ray", path, exc)
            return False
        self._sock, self._path, self._loop = sock, path, loop
        loop.add_reader(sock.fileno(), self._read)
        return True

    def close(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        try:
            os.unlink(self._path)
        except OSError:
            pass

    def _read(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(512)
            except OSError:  # nothing more queued (BlockingIOError), or the socket closed
                return
            wake = _decode(data)
            if wake is None:
                continue
            host_id, tenant_id, version = wake
            if self._wake(host_id):
                STATS["by_datagram"] += 1
            else:
                STATS["forwarded"] += 1
                try:
                    self._forward(tenant_id, version)
                except Exception:  # noqa: BLE001 - the scheduler's next poll finds the work
                    log.debug("could not pass a wake on to the scheduler", exc_info=True)


def _sweep(directory: str) -> None:
    """Remove the sockets of processes that are gone (killed: none unlinked its own)."""
    try:
        names = [n for n in os.listdir(directory) if n.endswith(".sock")]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(path)  # refused when nobody listens; sends nothing
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        finally:
            probe.close()
