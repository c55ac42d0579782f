"""`InstanceHost`: the Ray actor in which an instance is activated.

A host is created for one (tenant, code version) and hosts one instance at a
time: the scheduler sends it `activate(pk, token)`, it runs the activation
(see `activation.py`) writing straight to the journal. While more instances of
its code are due it claims and runs them itself, one after the other, for up to
`host_slice` seconds before it returns to the scheduler: a warm tenant's
instances are activated without a scheduler round trip each. Leases it claims
carry its owner id, so if it dies the scheduler releases all of them at once.
Idle hosts stay warm for the next activation of the same code until the
loader deactivates them (kills the process) after the hibernation timeout.

Its watchdog thread does two things while an activation runs: it renews the
lease every third of the lease TTL (so a long step keeps its lease), and if a
step callback blocks the process past its timeout (a synchronous loop cannot
be interrupted) it records that attempt as timed out and ends the process;
the scheduler sees the host die and activates the instance elsewhere, where
the retry policy decides what happens next.

A host serves one tenant, so its process has one set of telemetry settings
(`otel_env`, merged by the loader): its tracer provider is made the process's
global one, and tenant code that uses the OpenTelemetry API gets spans nested
under its steps. It captures what activations print (`logs.py`) and counts
what they did; `activate` returns those counts with its outcomes. `drain`
flushes pending spans before the loader deactivates the host.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable

import ray

from opentelemetry import trace

from . import tracing
from .activation import Outcome, activate
from .journal import Journal, LeaseLostError
from .logs import LogCapture
from .metrics import ActivityCounts
from .package import load_class

log = logging.getLogger("dynwf_ray.host")

#: Extra time a blocking step callback gets past its timeout before its host is ended.
OVERRUN_GRACE = 1.0


class _Watchdog:
    """Lease heartbeat and blocked-step detector, on its own thread."""

    def __init__(self, journal: Journal, lease_ttl: float):
        self._journal = journal
        self._lease_ttl = lease_ttl
        self._cond = threading.Condition()
        self._lease: tuple[int, int] | None = None
        self._deadline: float | None = None
        self._on_overrun: Callable[[], None] | None = None
        threading.Thread(target=self._loop, name="dynwf-watchdog", daemon=True).start()

    def watch(self, lease: tuple[int, int] | None) -> None:
        with self._cond:
            self._lease = lease
            self._cond.notify()

    # AttemptTracker protocol (called by Step on the activation's thread).
    def begin(self, deadline: float, on_overrun: Callable[[], None]) -> None:
        self._deadline = deadline
        self._on_overrun = on_overrun

    def end(self) -> None:
        self._deadline = None
        self._on_overrun = None

    def _loop(self) -> None:
        heartbeat_every = self._lease_ttl / 3
        next_beat = time.monotonic() + heartbeat_every
        while True:
            with self._cond:
                if self._lease is None:
                    self._cond.wait()
                    next_beat = time.monotonic() + heartbeat_every
                    continue
                self._cond.wait(timeout=min(0.2, heartbeat_every))
                lease, deadline, on_overrun = self._lease, self._deadline, self._on_overrun
            if lease is None:
                continue
            now = time.monotonic()
            if deadline is not None and on_overrun is not None and now > deadline + OVERRUN_GRACE:
                self._overrun(on_overrun)
            if now >= next_beat:
                next_beat = now + heartbeat_every
                try:
                    self._journal.renew_lease(lease[0], lease[1], time.time(), self._lease_ttl)
                except LeaseLostError:
                    pass  # the activation's next write finds out and stops
                except Exception:  # noqa: BLE001 - keep beating through a DB hiccup
                    log.exception("lease heartbeat failed")

    @staticmethod
    def _overrun(on_overrun: Callable[[], None]) -> None:
        try:
            on_overrun()
        except Exception:  # noqa: BLE001 - we end the process either way
            log.exception("could not record the timed-out attempt")
        print(
            "dynwf: a step callback blocked past its timeout; ending this host process",
            file=sys.stderr, flush=True,
        )
        tracing.flush_all(1.0)  # the spans of the steps before it
        os._exit(70)


@ray.remote(num_cpus=0)
class InstanceHost:
    def __init__(
        self,
        database_url: str,
        tenant_id: str,
        version: str,
        kind: str,
        blob: bytes,
        manifest_json: str,
        lease_ttl: float,
        owner: str,
        host_slice: float,
        binding_factory: Callable[[Journal], Any] | None = None,
        otel_env: dict[str, str] | None = None,
        keep_logs: int = 1000,
    ):
        self._journal = Journal(database_url, create_tables=False)
        self._tracing = tracing.tracing_for(otel_env or {}, tenant_id, version)
        if self._tracing is not None:
            trace.set_tracer_provider(self._tracing.provider)
        self._capture = LogCapture().install()
        self._keep_logs = keep_logs
        self._activations = 0
        self._workflow_cls = load_class(tenant_id, version, kind, blob, manifest_json)
        self._code = (tenant_id, version)
        self._lease_ttl = lease_ttl
        self._owner = owner
        self._slice = host_slice
        self._watchdog = _Watchdog(self._journal, lease_ttl)
        self._env = {"WORKFLOWS": binding_factory(self._journal)} if binding_factory else {}

    async def activate(self, pk: int, token: int) -> dict[str, Any]:
        """Activate this instance, then other due ones of this code for up to host_slice s.

        Returns {"outcomes": {outcome: how many}, "counts": ActivityCounts as a dict}.
        """
        outcomes: dict[str, int] = {}
        counts = ActivityCounts()
        until = time.monotonic() + self._slice
        while True:
            outcome = await self._activate_one(pk, token, counts)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if time.monotonic() >= until:
                return {"outcomes": outcomes, "counts": counts.as_dict()}
            claims = self._journal.claim_due(
                time.time(), 1, self._owner, self._lease_ttl, *self._code
            )
            if not claims:
                return {"outcomes": outcomes, "counts": counts.as_dict()}
            pk, token = claims[0].pk, claims[0].token

    async def _activate_one(self, pk: int, token: int, counts: ActivityCounts) -> Outcome:
        self._watchdog.watch((pk, token))
        self._activations += 1
        try:
            return await activate(
                self._journal, pk, token, self._workflow_cls,
                env=self._env, lease_ttl=self._lease_ttl, tracker=self._watchdog,
                tracing=self._tracing, capture_logs=True, keep_logs=self._keep_logs,
                counts=counts, warm=self._activations > 1,
            )
        finally:
            self._watchdog.watch(None)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Export pending spans (called before this host is deactivated)."""
        tracing.flush_all(timeout_s)

    async def pid(self) -> int:
        return os.getpid()
