"""The scheduler actor: decides which instance is activated, and when.

One per engine, named `dynwf-scheduler-<engine name>`, restarted by Ray if it
dies. It keeps nothing that the journal does not: on (re)start it ends the
hosts of its predecessor and resumes claiming due instances; instances leased
by a dead predecessor become due again when their leases expire.

Its loop, on a thread of its own:
1. claim (lease) up to `max_hosts - busy` instances whose timer is due: new
   ones, sleeps that ended, waits whose event arrived or deadline passed,
   retries, resumed or restarted ones, and ones whose lease holder died
   (admission: instances beyond that stay due in the journal, e.g. `queued`);
2. for each, ask the loader actor for a host of its (tenant, code version),
   warm or cold, call `activate` on it, and hand the host back when it ends;
3. keep the leases of dispatched activations alive while their hosts start;
4. sleep until the next timer, a `notify()`, a finished activation, or the
   poll interval.

A host that dies mid-activation has its leases released at once so its
instances are activated again; `max_activation_failures` crashes in a row mark
the instance errored instead of looping forever (and end its trace).

It also owns the engine's metrics (`metrics.py`): hosts return what their
activations did, and it serves the Prometheus endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError

from .config import EngineConfig
from .journal import Claim, Journal, LeaseLostError
from .metrics import EngineMetrics
from .tracing import end_instance_trace

log = logging.getLogger("dynwf_ray.scheduler")

@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=8)
class Scheduler:
    """The actor: a thin shell around `_SchedulerCore` (so Ray sees no coroutine methods
    and runs calls on its own threads while the core's loop runs on another)."""

    def __init__(self, config: dict):
        self._core = _SchedulerCore(config)

    def ping(self) -> dict:
        return self._core.ping()

    def notify(self) -> None:
        self._core.notify()

    def stats(self) -> dict:
        return self._core.stats()

    def stop(self) -> None:
        self._core.stop()


class _SchedulerCore:
    def __init__(self, config: dict):
        self.config = EngineConfig(**config)
        self.journal = Journal(self.config.database_url)
        self.owner = f"scheduler-{uuid.uuid4().hex[:12]}"
        self._loader = ray.get_actor(self.config.loader_name, namespace=self.config.namespace)
        # Hosts of a previous incarnation of this scheduler are unaccounted for: end them;
        # their instances' leases expire and the instances are activated again.
        ray.get(self._loader.reset.remote())
        self._busy: dict[int, Claim] = {}
        self._hosts: dict[int, Any] = {}  # host id -> actor handle
        self._crashes: dict[int, int] = {}
        self._counters = {"activations": 0, "host_deaths": 0}
        self.metrics = EngineMetrics(
            self.config.telemetry_env, self.config.metrics_port, self.config.metrics_host,
            lambda: ray.get(self._loader.stats.remote())["hosts_by_tenant"],
            self.journal.count_by_tenant_status,
        )
        self._stopping = False
        self._next_renewal = 0.0
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._thread = threading.Thread(target=self._run_loop, name="dynwf-scheduler", daemon=True)
        self._thread.start()

    # -- called through the actor --------------------------------------------

    def ping(self) -> dict:
        return {"owner": self.owner, "config": self.config.model_dump()}

    def notify(self) -> None:
        """New work may be due (created, event sent, resumed): look now."""
        self._loop.call_soon_threadsafe(self._wake.set)

    def stats(self) -> dict:
        return {
            "busy_activations": len(self._busy), **self._counters,
            "metrics_url": self.metrics.url,
        }

    def stop(self) -> None:
        """Stop activating; end hosts; release their instances so the next engine resumes them."""
        self._stopping = True
        self._loop.call_soon_threadsafe(self._wake.set)
        ray.get(self._loader.reset.remote())
        now = time.time()
        try:
            for claim in list(self._busy.values()):
                self.journal.release(claim.pk, claim.token, now, now)
            # and what the hosts claimed for themselves (host_slice chaining)
            self.journal.release_owner(self.config.host_owner_prefix, now, now, prefix=True)
        except Exception:  # noqa: BLE001 - the leases then expire on their own
            log.exception("could not release the leases of stopped activations")
        self.metrics.shutdown()

    # -- the loop ------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                timeout = self._tick()
            except Exception:  # noqa: BLE001 - e.g. the database is briefly unreachable
                log.exception("scheduler tick failed; retrying")
                timeout = self.config.poll_interval
            if timeout > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(0)  # let finished activations be collected

    def _tick(self) -> float:
        """One pass; returns how long to sleep."""
        cfg = self.config
        now = time.time()
        if self._busy and now >= self._next_renewal:
            # A host may still be starting (a new runtime env): keep its claim leased.
            self.journal.renew_leases(
                [(c.pk, c.token) for c in self._busy.values()], now, cfg.lease_ttl
            )
            self._next_renewal = now + cfg.lease_ttl / 3
        free = cfg.max_hosts - len(self._busy)
        claims = self.journal.claim_due(now, free, self.owner, cfg.lease_ttl) if free > 0 else []
        for claim in claims:
            self._busy[claim.pk] = claim
            self._loop.create_task(self._activate(claim))
        if free > 0 and len(claims) == free:
            return 0.0  # every free slot taken: more may be due, look again at once
        timeout = cfg.poll_interval
        if self._busy:
            timeout = min(timeout, max(0.0, self._next_renewal - time.time()))
        if free > len(claims):
            next_due = self.journal.next_wake_at()
            if next_due is not None:
                timeout = min(timeout, next_due - time.time())
        return max(timeout, 0.0)

    async def _activate(self, claim: Claim) -> None:
        host = None
        try:
            try:
                host = await self._loader.acquire.remote(claim.tenant_id, claim.code_version)
            except Exception as exc:  # noqa: BLE001 - the code cannot be loaded (now)
                cause = getattr(exc, "cause", None) or exc
                log.error("cannot load code for %s/%s: %s", claim.tenant_id, claim.instance_id, cause)
                message = f"tenant {claim.tenant_id!r}: {cause}"
                if isinstance(cause, LookupError):  # no such code stored: retrying cannot help
                    self._give_up(claim, "CodeUnavailableError", message)
                else:  # e.g. the journal or Ray's package store briefly unreachable
                    self._on_crash(claim, "CodeUnavailableError", message)
                return
            self._counters["activations"] += 1
            result = await self._host_actor(host).activate.remote(claim.pk, claim.token)
        except RayActorError as exc:
            if self._stopping:
                return
            self._counters["host_deaths"] += 1
            self._hosts.pop(host["host_id"], None)
            self._loader.discard.remote(host["host_id"])
            self._on_host_death(claim, exc)
            # Instances the host claimed for itself after this one: due again now.
            self.journal.release_owner(host["owner"], time.time(), time.time())
        except Exception as exc:  # noqa: BLE001 - a bug below activate(); don't lose the instance
            log.exception("activation of %s/%s failed", claim.tenant_id, claim.instance_id)
            if host is not None:
                self._loader.discard.remote(host["host_id"])
            self._on_crash(claim, type(exc).__name__, str(exc))
        else:
            self._crashes.pop(claim.pk, None)
            self._counters["activations"] += sum(result["outcomes"].values()) - 1
            self._loader.release.remote(host["host_id"])
            self.metrics.record(claim.tenant_id, result["counts"])
        finally:
            self._busy.pop(claim.pk, None)
            self._wake.set()

    def _host_actor(self, lent: dict) -> Any:
        """The host's handle: sent by the loader the first time only, then cached here."""
        for host_id in lent["ended"]:
            self._hosts.pop(host_id, None)
        if "actor" in lent:
            self._hosts[lent["host_id"]] = lent["actor"]
        actor = self._hosts.get(lent["host_id"])
        if actor is None:  # e.g. this scheduler restarted while the loader kept the host
            actor = self._hosts[lent["host_id"]] = ray.get(
                self._loader.handle.remote(lent["host_id"])
            )
        return actor

    def _on_host_death(self, claim: Claim, exc: BaseException) -> None:
        log.warning(
            "host of %s/%s died during activation: %s", claim.tenant_id, claim.instance_id,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        self._on_crash(claim, "HostDiedError", f"the instance's host process died: {exc}")

    def _on_crash(self, claim: Claim, name: str, message: str) -> None:
        crashes = self._crashes.get(claim.pk, 0) + 1
        self._crashes[claim.pk] = crashes
        if crashes >= self.config.max_activation_failures:
            self._give_up(claim, name, f"{crashes} activations in a row crashed; last: {message}")
            return
        try:
            self.journal.release(claim.pk, claim.token, time.time(), time.time())
        except Exception:  # noqa: BLE001 - the lease expires on its own then
            log.exception("could not release %s/%s", claim.tenant_id, claim.instance_id)

    def _give_up(self, claim: Claim, name: str, message: str) -> None:
        self._crashes.pop(claim.pk, None)
        now = time.time()
        try:
            self.journal.fail(claim.pk, claim.token, name, message[:4000], now)
        except LeaseLostError:
            return
        info = self.journal.get_instance(claim.tenant_id, claim.instance_id)
        if info is not None:
            end_instance_trace(
                self.journal, self.config.telemetry_env, info, "errored", now,
                (name, message[:4000]),
            )
