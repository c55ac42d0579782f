"""The scheduler actor: decides which instance is activated where, and when.

One per engine, named `dynwf-scheduler-<engine name>`, restarted by Ray if it
dies. It keeps nothing that the journal does not: on (re)start it simply
resumes claiming due instances, and instances leased by a dead predecessor
become due again when their leases expire.

Its loop, on a thread of its own:
1. claim (lease) up to `free slots` instances whose timer is due: new ones,
   sleeps that ended, waits whose event arrived or deadline passed, resumed
   or restarted ones, and ones whose lease holder died;
2. activate each on a host actor for its (tenant, code version): a warm idle
   one if there is one, else a new one (cold) while fewer than `max_hosts`
   are alive, evicting an idle host of other code if needed (admission:
   instances beyond that wait, `queued`);
3. deactivate hosts idle for longer than `hibernate_after` (kill the process:
   hibernated instances cost no process);
4. sleep until the next timer, a `notify()`, a finished activation, or the
   poll interval.

A host that dies mid-activation has its lease released at once so the
instance is activated again; `max_activation_failures` crashes in a row mark
the instance errored instead of looping forever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from .binding import WorkflowBinding
from .config import EngineConfig
from .host import InstanceHost
from .journal import Claim, Journal, LeaseLostError
from .loader import runtime_env_for

log = logging.getLogger("dynwf_ray.scheduler")

CodeKey = tuple[str, str]  # (tenant_id, code_version)


@dataclass
class _Host:
    key: CodeKey
    actor: Any
    owner: str
    idle_since: float = field(default_factory=time.monotonic)
    activations: int = 0


class HostBindingFactory:
    """Builds the tenant-scoped WORKFLOWS binding inside a host (picklable)."""

    def __init__(self, tenant_id: str, scheduler_name: str, namespace: str):
        self.tenant_id = tenant_id
        self.scheduler_name = scheduler_name
        self.namespace = namespace

    def __call__(self, journal: Journal) -> WorkflowBinding:
        return WorkflowBinding(journal, self.tenant_id, notify=self._notify)

    def _notify(self) -> None:
        try:
            ray.get_actor(self.scheduler_name, namespace=self.namespace).notify.remote()
        except ValueError:
            pass  # no scheduler running: the instance is picked up by the next one's poll


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=8)
class Scheduler:
    def __init__(self, config: dict):
        self.config = EngineConfig(**config)
        self.journal = Journal(self.config.database_url)
        self.owner = f"scheduler-{uuid.uuid4().hex[:12]}"
        self._idle: dict[CodeKey, list[_Host]] = {}
        self._busy: dict[int, tuple[_Host, Claim]] = {}
        self._code: OrderedDict[CodeKey, tuple[str, bytes]] = OrderedDict()
        self._crashes: dict[int, int] = {}
        self._host_seq = 0
        self._counters = {"activations": 0, "cold_starts": 0, "warm_starts": 0, "host_deaths": 0}
        self._stopping = False
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._thread = threading.Thread(target=self._run_loop, name="dynwf-scheduler", daemon=True)
        self._thread.start()

    # -- called through Ray --------------------------------------------------

    def ping(self) -> dict:
        return {"owner": self.owner, "config": self.config.model_dump()}

    def notify(self) -> None:
        """New work may be due (created, event sent, resumed): look now."""
        self._loop.call_soon_threadsafe(self._wake.set)

    def stats(self) -> dict:
        return asyncio.run_coroutine_threadsafe(self._stats(), self._loop).result(timeout=30)

    def stop(self) -> None:
        """Stop activating; kill hosts; release their instances so the next engine resumes them."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=60)

    # -- the loop ------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        cfg = self.config
        while not self._stopping:
            self._wake.clear()
            try:
                timeout = self._tick()
            except Exception:  # noqa: BLE001 - e.g. the database is briefly unreachable
                log.exception("scheduler tick failed; retrying")
                timeout = cfg.poll_interval
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
        free = cfg.max_hosts - len(self._busy)
        claims = self.journal.claim_due(now, free, self.owner, cfg.lease_ttl) if free > 0 else []
        for claim in claims:
            self._dispatch(claim)
        self._deactivate_idle()
        if free > 0 and len(claims) == free:
            return 0.0  # every free slot taken: more may be due, look again at once
        timeout = cfg.poll_interval
        if free > len(claims):
            next_due = self.journal.next_wake_at()
            if next_due is not None:
                timeout = min(timeout, next_due - time.time())
        idle_deadline = self._next_idle_deadline()
        if idle_deadline is not None:
            timeout = min(timeout, idle_deadline - time.monotonic())
        return max(timeout, 0.0)

    def _dispatch(self, claim: Claim) -> None:
        key = (claim.tenant_id, claim.code_version)
        try:
            host = self._host_for(key)
        except Exception as exc:  # noqa: BLE001 - missing or unloadable code
            log.error("cannot activate %s/%s: %s", claim.tenant_id, claim.instance_id, exc)
            self._give_up(claim, type(exc).__name__, str(exc))
            return
        host.activations += 1
        self._counters["activations"] += 1
        self._busy[claim.pk] = (host, claim)
        ref = host.actor.activate.remote(claim.pk, claim.token)
        self._loop.create_task(self._finish(ref, host, claim))

    def _host_for(self, key: CodeKey) -> _Host:
        idle = self._idle.get(key)
        if idle:
            self._counters["warm_starts"] += 1
            return idle.pop()
        live = len(self._busy) + sum(len(v) for v in self._idle.values())
        if live >= self.config.max_hosts:
            self._evict_one_idle()
        kind, blob = self._code_for(key)
        options: dict[str, Any] = {}
        runtime_env = runtime_env_for(kind, blob)
        if runtime_env:
            options["runtime_env"] = runtime_env
        self._host_seq += 1
        owner = f"{self.owner}/host-{self._host_seq}"
        actor = InstanceHost.options(**options).remote(
            self.config.database_url, key[0], key[1], kind, blob, self.config.lease_ttl,
            owner, self.config.host_slice,
            HostBindingFactory(key[0], self.config.scheduler_name, self.config.namespace),
        )
        self._counters["cold_starts"] += 1
        log.info("starting a new host for tenant %s version %s", *key)
        return _Host(key, actor, owner)

    def _code_for(self, key: CodeKey) -> tuple[str, bytes]:
        code = self._code.get(key)
        if code is None:
            code = self.journal.get_code(*key)
            if code is None:
                raise LookupError(f"no code stored for tenant {key[0]!r} version {key[1]!r}")
            self._code[key] = code
            while len(self._code) > 256:
                self._code.popitem(last=False)
        else:
            self._code.move_to_end(key)
        return code

    async def _finish(self, ref: Any, host: _Host, claim: Claim) -> None:
        try:
            outcomes = await ref
        except RayActorError as exc:
            dead, host = host, None
            if self._stopping:
                return
            self._counters["host_deaths"] += 1
            self._on_host_death(claim, exc)
            # Instances the host claimed for itself after this one: due again now.
            self.journal.release_owner(dead.owner, time.time(), time.time())
        except Exception as exc:  # noqa: BLE001 - a bug below activate(); don't lose the instance
            log.exception("activation of %s/%s failed", claim.tenant_id, claim.instance_id)
            self._on_crash(claim, type(exc).__name__, str(exc))
        else:
            self._crashes.pop(claim.pk, None)
            self._counters["activations"] += sum(outcomes.values()) - 1
        finally:
            self._busy.pop(claim.pk, None)
            if host is not None:
                if self._stopping:
                    ray.kill(host.actor)
                else:
                    host.idle_since = time.monotonic()
                    self._idle.setdefault(host.key, []).append(host)
            self._wake.set()

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
        try:
            self.journal.fail(claim.pk, claim.token, name, message[:4000], time.time())
        except LeaseLostError:
            pass

    def _deactivate_idle(self) -> None:
        limit = self.config.hibernate_after
        now = time.monotonic()
        for key, hosts in list(self._idle.items()):
            keep = []
            for host in hosts:
                if now - host.idle_since >= limit:
                    log.info("deactivating idle host of tenant %s version %s", *key)
                    ray.kill(host.actor)
                else:
                    keep.append(host)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def _evict_one_idle(self) -> None:
        oldest: _Host | None = None
        for hosts in self._idle.values():
            for host in hosts:
                if oldest is None or host.idle_since < oldest.idle_since:
                    oldest = host
        if oldest is not None:
            self._idle[oldest.key].remove(oldest)
            if not self._idle[oldest.key]:
                del self._idle[oldest.key]
            ray.kill(oldest.actor)

    def _next_idle_deadline(self) -> float | None:
        times = [h.idle_since for hosts in self._idle.values() for h in hosts]
        return min(times) + self.config.hibernate_after if times else None

    async def _stats(self) -> dict:
        idle = sum(len(v) for v in self._idle.values())
        return {
            "live_hosts": len(self._busy) + idle,
            "busy_hosts": len(self._busy),
            "idle_hosts": idle,
            "max_hosts": self.config.max_hosts,
            **self._counters,
        }

    async def _shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        for host, claim in list(self._busy.values()):
            ray.kill(host.actor)
            try:
                self.journal.release(claim.pk, claim.token, time.time(), time.time())
            except Exception:  # noqa: BLE001
                log.exception("could not release %s/%s", claim.tenant_id, claim.instance_id)
        for hosts in self._idle.values():
            for host in hosts:
                ray.kill(host.actor)
        self._idle.clear()
