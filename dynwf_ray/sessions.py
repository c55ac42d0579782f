"""Engine sessions: which scheduler incarnation holds a lease, and whether it can still be alive.

Every scheduler incarnation opens a session in the journal: an `epoch` (a number
the journal hands out, greater than every earlier one), the machine and the
processes it runs in, and the loader whose hosts it uses. Leases taken in the
session are owned by `e<epoch>/host-<n>` (the scheduler's own: `e<epoch>/scheduler`). The scheduler heartbeats its session
every second and looks at the others every few seconds; a session that is
*gone* is ended and its leases are given up at once (`Journal.end_session`), so
its instances run again without waiting for the leases to expire.

A session is gone when one of these says so for certain:
- its hosts' loader is ours and was just reset (this scheduler restarted: Ray
  restarts it, and it ended its predecessor's hosts);
- it ran on this machine (same boot, same pid namespace) and none of its
  processes (the scheduler and the loader, whose hosts die with it) still runs:
  a platform that crashed and was started again;
- it has not heartbeat for `timeout` seconds (the lease time): on another
  machine that is all one can see, and its leases have expired by then anyway.
A session that may still be alive is waited for: its leases expire as before.
Two engines started on one journal by mistake therefore share its instances,
each run by one of them at a time, and neither takes over the other's.

A scheduler that Ray restarts (its process died, the loader did not) *adopts*
its predecessor's session instead of opening one: the newest live session of the
same engine and loader keeps its epoch, takes the new process ids and heartbeats
on, so the leases its hosts hold stay valid and their activations keep running
(`SessionKeeper.adopt`). Only when that session has ended meanwhile does the new
scheduler end the hosts and open a session of its own.

A scheduler whose own session another engine ended (it stalled past `timeout`)
must not go on: `SessionKeeper.tick` returns False and the scheduler
restarts, ending its hosts, in a new session.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Sequence

from .journal import Journal, SessionInfo

log = logging.getLogger("dynwf_ray.sessions")

#: Seconds between a scheduler's heartbeats, and between its looks at other sessions.
HEARTBEAT_EVERY = 1.0
CHECK_EVERY = 2.0


def machine_id() -> str:
    """Where pids mean the same thing: this boot of this machine, this pid namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: pids cannot be checked, only heartbeats
        return ""
    return f"{boot}/{namespace}"


def process_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), which tells it apart from
    a later process with the same pid; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):  # a zombie has ended
        return None
    return int(fields[19])


def running(pid: int, start: int) -> bool:
    """Whether the process that had `pid` and started at `start` still runs."""
    return process_start(pid) == start


def this_process() -> tuple[str, int, int]:
    """(machine id, pid, start time) of the calling process."""
    pid = os.getpid()
    return machine_id(), pid, process_start(pid) or 0


def why_gone(
    session: SessionInfo, *, machine: str, loader_id: str | None, now: float, timeout: float,
    is_running: Callable[[int, int], bool] = running,
) -> str | None:
    """Why `session` is certainly gone (see the module docstring), or None if it may
    still be alive."""
    if loader_id is not None and session.loader_id == loader_id:
        return "its loader was reset by a new scheduler of the same engine"
    if machine and session.machine == machine and session.processes and not any(
        is_running(pid, start) for pid, start in session.processes
    ):
        return f"none of its processes on {session.node} runs any more"
    if now - session.heartbeat_at > timeout:
        return f"no heartbeat for {now - session.heartbeat_at:.0f} s"
    return None


class SessionKeeper:
    """A scheduler's session: open it, heartbeat it, end the sessions that are gone. A
    plain object over the journal; tests drive it with a clock and a fake `is_running`."""

    def __init__(
        self, journal: Journal, engine_name: str, *, machine: str,
        processes: Sequence[tuple[int, int]], loader_id: str | None, timeout: float,
        clock: Callable[[], float] = time.time,
        is_running: Callable[[int, int], bool] = running,
    ):
        self.journal = journal
        self._engine_name = engine_name
        self._machine = machine
        self._processes = list(processes)
        self._loader_id = loader_id
        self._timeout = timeout
        self._clock = clock
        self._is_running = is_running
        self.epoch: int | None = None
        self.adopted = False  # whether this keeper took its session over (`adopt`)
        self._beat_at = self._checked_at = float("-inf")
        self.reclaimed = 0  # instances whose leases it took back from gone sessions

    def open(self) -> int:
        """Begin this scheduler's session, then end those that are gone (its predecessor's
        among them). Returns the epoch."""
        now = self._clock()
        self.epoch = self.journal.open_session(
            self._engine_name, socket.gethostname(), self._machine, self._processes,
            self._loader_id, now,
        )
        self._beat_at = now
        self.reclaim()
        return self.epoch

    def predecessor(self) -> SessionInfo | None:
        """The newest live session of this engine with this loader: a previous incarnation
        of this scheduler, whose hosts the loader still runs."""
        mine = [s for s in self.journal.live_sessions()
                if s.engine_name == self._engine_name and s.loader_id == self._loader_id]
        return max(mine, key=lambda s: s.epoch, default=None) if self._loader_id else None

    def adopt(self, session: SessionInfo) -> bool:
        """Take over `session` (see `predecessor`) instead of opening a new one: it keeps
        its epoch, so its hosts' leases stay valid. Then end those that are gone. False
        (nothing changed) when it has ended meanwhile."""
        now = self._clock()
        if not self.journal.adopt_session(session.epoch, self._processes, now):
            return False
        self.epoch, self._beat_at, self.adopted = session.epoch, now, True
        log.info("engine session %s adopted by a restarted scheduler", session.epoch)
        self.reclaim()
        return True

    def owner(self, holder: str) -> str:
        """The lease owner id of `holder` (a host, the scheduler) in this session."""
        return f"e{self.epoch}/{holder}"

    def tick(self) -> bool:
        """Heartbeat and look at the other sessions when it is time; False when another
        engine has ended this session (the scheduler must not go on)."""
        now = self._clock()
        if now - self._beat_at >= HEARTBEAT_EVERY:
            self._beat_at = now
            if not self.journal.heartbeat(self.epoch, now):
                log.error("engine session %s was ended by another engine, which found it gone "
                          "(see its log); this scheduler restarts", self.epoch)
                return False
        if now - self._checked_at >= CHECK_EVERY:
            self.reclaim()
        return True

    def reclaim(self) -> dict[int, list[int]]:
        """End every other session that is gone and give up its leases; returns
        {epoch: instance pks released}."""
        now = self._checked_at = self._clock()
        released = {}
        for session in self.journal.live_sessions():
            if session.epoch == self.epoch:
                continue
            why = why_gone(session, machine=self._machine, loader_id=self._loader_id, now=now,
                           timeout=self._timeout, is_running=self._is_running)
            if why is None:
                continue
            pks = self.journal.end_session(session.epoch, why, now)
            released[session.epoch] = pks
            self.reclaimed += len(pks)
            log.warning("engine session %s (%s on %s) is gone: %s; %d instance(s) it held run "
                        "again now", session.epoch, session.engine_name, session.node, why,
                        len(pks))
        return released

    def close(self, reason: str = "stopped") -> list[int]:
        """End this session (the engine stops) and give up its leases."""
        return self.journal.end_session(self.epoch, reason, self._clock())
