"""The scheduler: which code versions have hosts, how much each host may run, and
what happens when a host dies.

Two layers:
- `SchedulerCore`, a plain object over the journal and the host pool
  (`pool.py`): `tick(now)` reads what is due and leased per code version and the
  tenants' `max_concurrency`, and returns the pool's decisions (start, stop,
  quota); `host_died(host_id, now, why)` counts a crash for every instance the host
  held (in the journal, so counts survive a restart of the scheduler; none when its
  node was lost), releases them to run again, and marks errored those that crashed
  `max_activation_failures` times in a row. Tests drive it with a clock.
- `Scheduler`, the Ray actor (one per engine, `dynwf-scheduler-<engine name>`,
  restarted by Ray if it dies) that runs the core's loop on a thread of its own
  and carries out its decisions through the loader (start, end hosts) and the
  hosts (`serve`, `set_quota`, `wake`, `stop`, `report`).

The scheduler is off the hot path: hosts claim their own code's due instances
(in batches) while they run fewer activations than their quota, and
`notify(tenant, version)` (an instance created, an event sent) wakes the
version's hosts directly when they have slots, and names them back: from then
on the caller's `Router` (`notify.py`) wakes them itself (by a datagram when they
run on the caller's machine: `wakeup.py`), asking again each second. It ticks when notified for a
version with no such host (at most every `MIN_TICK` seconds), when a host that
runs as many activations as its quota says it is short of slots and a tick could
raise that quota (`short_of_slots`), when a host starts or ends, at the next timer
or lease expiry of any code (hosts take
their own code's timers; the tick starts hosts for code that has none), every
`BACKLOG_TICK` while a backlog lasts, and every `poll_interval`.

When Ray restarts it (its process died; the loader and the host processes did
not), it *adopts* what its predecessor left: the loader's live hosts
(`Loader.adopt`, which from then on refuses host starts from the predecessor's
calls still in flight) and its engine session (`SessionKeeper.adopt`, same epoch,
so the hosts' leases stay valid). Running activations are not interrupted; the
new scheduler joins each host's `serve` and sets its quota at the next tick. When
there is no session to adopt (a new engine, or the predecessor's session was
ended by another engine meanwhile), it ends the loader's hosts (`reset`) and
opens a session; any other session that is certainly gone (a crashed platform on
this machine) is ended and its leases given up, so their instances run again at
once. It heartbeats its
session every second; that write is also its own probe of the journal.

Every `SWEEP_EVERY` seconds it deletes finished instances whose retention
expired (`SchedulerCore.sweep`), in small transactions off its loop.

It owns the engine's metrics (`metrics.py`) and health: hosts report what
their activations did and how their process's journal writes go; the
scheduler merges that with its own (`health.merge`) into `health()`, logging
each transition once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from . import wakeup
from .config import EngineConfig
from .errors import JournalUnavailableError
from .health import JournalHealth, merge
from .host import HostReport
from .journal import Journal, LeaseLostError
from .metrics import EngineMetrics
from .pool import CodeKey, Decision, HostPool, PoolConfig, Quota, Start, Stop, Want
from .sandbox.policy import TenantPolicy
from .sessions import SessionKeeper, this_process
from .tracing import end_instance_trace
from .types import InstanceStatus
from .types import Retention

if TYPE_CHECKING:  # the loader imports this module
    from .loader import LiveHost

log = logging.getLogger("dynwf_ray.scheduler")

#: Shortest time between two ticks asked for by notifications (they coalesce).
MIN_TICK = 0.02
#: Time between ticks while instances are due (hosts work a backlog off; the pool
#: re-shares capacity and sizes hosts by it at this pace).
BACKLOG_TICK = 0.25
#: Longest a host whose calls fail with "temporarily unavailable" is waited for before it
#: counts as dead (Ray declares a silent node dead well before: see cluster/README.md).
UNAVAILABLE_FOR = 120.0
#: Seconds between two rounds of host reports (metrics, stats, health).
REPORT_EVERY = 1.0
#: A host process's journal health counts this long after its last report.
HEALTH_FRESH = 5.0
#: The sweeper of expired instances: every SWEEP_EVERY seconds, at most SWEEP_BATCHES
#: transactions of SWEEP_BATCH instances each, SWEEP_PAUSE seconds apart.
SWEEP_EVERY, SWEEP_BATCH, SWEEP_BATCHES, SWEEP_PAUSE = 10.0, 200, 50, 0.02


def pool_config(config: EngineConfig, cpus: float, memory_bytes: float) -> PoolConfig:
    """The pool's limits: the engine's settings, or defaults from the cluster's size."""
    cpus_ = max(1, int(cpus))
    max_hosts = config.max_hosts or max(4, min(16 * cpus_, int(memory_bytes // (256 << 20))))
    return PoolConfig(
        max_activations=config.max_activations or 8 * cpus_,
        max_hosts=max_hosts,
        host_concurrency=config.host_concurrency,
        cpus=cpus_,
        idle_after=config.hibernate_after,
    )


class SchedulerCore:
    """The scheduler's decisions, free of Ray (see the module docstring)."""

    def __init__(
        self, journal: Journal, pool: PoolConfig, *, max_failures: int,
        host_owner: Any = str, telemetry_env: dict | None = None,
        retention: Retention | None = None,
    ):
        self.journal = journal
        self._retention = (retention or Retention()).model_dump()
        self.pool = HostPool(pool)
        self.pool._next_id = time.time_ns() // 1000  # never an id of a predecessor's host
        self._max_failures = max_failures
        self._host_owner = host_owner
        self._telemetry_env = telemetry_env or {}
        self._caps: dict[str, int | None] = {}
        self._caps_at = float("-inf")
        self.counters = {"host_deaths": 0, "hosts_lost_with_node": 0, "instances_given_up": 0,
                         "instances_swept": 0, "hosts_adopted": 0, "instances_unadopted": 0}

    def tick(self, now: float) -> list[Decision]:
        demand = {CodeKey(*k): Want(*v) for k, v in self.journal.demand(now).items()}
        return self.pool.tick(now, demand, self._tenant_caps(now))

    def refresh_policies(self) -> None:
        self._caps_at = float("-inf")

    def _tenant_caps(self, now: float) -> dict[str, int | None]:
        if now - self._caps_at >= 1.0:
            self._caps = {
                tenant: TenantPolicy.model_validate_json(text).max_concurrency
                for tenant, text in self.journal.tenant_policies().items()
            }
            self._caps_at = now
        return self._caps

    def sweep(self, now: float, batches: int = SWEEP_BATCHES, pause: float = 0.0) -> int:
        """Delete finished instances whose retention (the engine's, or their tenant's
        own) has expired, in up to `batches` transactions of `SWEEP_BATCH` instances,
        `pause` seconds apart; returns how many."""
        tenants = {
            tenant: {**self._retention, **json.loads(text)}
            for tenant, text in self.journal.retention_rules().items()
        }
        swept = 0
        for i in range(batches):
            n = self.journal.sweep(now, self._retention, tenants, SWEEP_BATCH)
            swept += n
            if n < SWEEP_BATCH:
                break
            if pause:
                time.sleep(pause)  # let the hot path's writes in between
        self.counters["instances_swept"] += swept
        return swept

    def host_died(self, host_id: int, now: float, why: str, node_lost: bool = False) -> list[int]:
        """A host died: its instances crashed. Returns the pks given up on (errored). When
        its node was lost (`node_lost`), that is no fault of the instances: they are
        released at their place in the queue without counting a crash."""
        self.pool.ended(host_id)
        self.counters["host_deaths"] += 1
        if node_lost:
            self.counters["hosts_lost_with_node"] += 1
        return self.crashed(self.journal.held_by(self._host_owner(host_id)), now, "HostDiedError",
                            f"the instance's host process died: {why}", count=not node_lost)

    def release_unadopted(self, epoch: int, adopted: set[str], now: float) -> int:
        """After a restart that adopted session `epoch`: give up the leases of its owners
        that were not adopted (`adopted`: owner ids), i.e. hosts that died while no
        scheduler watched them, or the predecessor's own claims. No crash is counted:
        whose fault those deaths were cannot be told now. Returns how many."""
        released = 0
        for owner in self.journal.lease_owners(epoch):
            if owner not in adopted:
                claims = self.journal.held_by(owner)
                self.crashed(claims, now, "HostDiedError", "", count=False)
                released += len(claims)
        self.counters["instances_unadopted"] += released
        return released

    def crashed(self, claims: list, now: float, name: str, message: str,
                count: bool = True) -> list[int]:
        """These activations crashed: count it (unless not `count`); release or (at the
        limit) error them."""
        given_up = []
        for claim in claims:
            if not count:
                self.journal.release(claim.pk, claim.token, None, now)
                continue
            crashes = self.journal.count_crash(claim.pk)
            if crashes >= self._max_failures:
                self.give_up(claim, name, f"{crashes} activations in a row crashed; last: {message}", now)
                given_up.append(claim.pk)
            else:
                self.journal.release(claim.pk, claim.token, None, now)  # keeps its place
        return given_up

    def give_up(self, claim: Any, name: str, message: str, now: float) -> None:
        """Mark an instance errored for good (its activations keep crashing, or its code
        cannot be loaded) and end its trace."""
        self.counters["instances_given_up"] += 1
        try:
            self.journal.fail(claim.pk, claim.token, name, message[:4000], now)
        except LeaseLostError:
            return
        log.error("instance %s/%s errored: %s", claim.tenant_id, claim.instance_id, message)
        info = self.journal.get_instance(claim.tenant_id, claim.instance_id)
        if info is not None:
            end_instance_trace(
                self.journal, self._telemetry_env, info, InstanceStatus.errored, now, (name, message[:4000])
            )


def _node_lost(host: "_LiveHost | None", exc: BaseException) -> bool:
    """Whether a host's process died with its node: Ray says so in the actor's death
    cause, or has marked the node it ran on dead."""
    if "because its node has died" in str(exc):
        return True
    if host is None or host.node_id is None:
        return False
    try:
        return not any(n["NodeID"] == host.node_id and n.get("Alive") for n in ray.nodes())
    except Exception:  # noqa: BLE001 - the GCS cannot say now: count it as a crash
        return False


@dataclass
class _LiveHost:
    key: CodeKey
    actor: Any = None  # its HostProcess (calls name the host by its id)
    node_id: str | None = None  # the node its process runs on
    ready: bool = False
    running: int = 0


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=8)
class Scheduler:
    """The actor: a thin shell around `_RayScheduler` (so Ray sees no coroutine methods
    and runs calls on its own threads while the loop runs on another)."""

    def __init__(self, config: dict):
        self._impl = _RayScheduler(config)

    def ping(self) -> dict:
        return self._impl.ping()

    def notify(self, tenant_id: str | None = None, version: str | None = None,
               name_hosts: bool = False) -> list[tuple[int, Any]] | None:
        return self._impl.notify(tenant_id, version, name_hosts)

    def short_of_slots(self, host_id: int) -> None:
        self._impl.short_of_slots(host_id)

    def retire(self, tenant_id: str) -> None:
        self._impl.retire(tenant_id)

    def stats(self) -> dict:
        return self._impl.stats()

    def health(self) -> dict:
        return self._impl.health()

    def stop(self) -> None:
        self._impl.stop()


class _RayScheduler:
    def __init__(self, config: dict):
        self.config = cfg = EngineConfig(**config)
        self.journal = Journal(cfg.database_url, create_tables=cfg.migrate)
        self._loader = ray.get_actor(cfg.loader_name, namespace=cfg.namespace)
        # This incarnation's id: the loader refuses host starts from earlier ones.
        self._incarnation = time.time_ns()
        adopted = ray.get(self._loader.adopt.remote(self._incarnation))
        loader = ray.get(self._loader.identity.remote())
        machine, pid, started = this_process()
        self.session = SessionKeeper(
            self.journal, cfg.name, machine=machine, loader_id=loader["actor_id"],
            # whose end ends the session: this process and the loader, whose hosts die
            # with it (when it runs on another machine, only heartbeats can tell)
            processes=[(pid, started), (loader["pid"], loader["started"])]
            if loader["machine"] == machine else [],
            timeout=cfg.lease_ttl,
        )
        predecessor = self.session.predecessor()
        if predecessor is None or not self.session.adopt(predecessor):
            # Hosts of a previous incarnation whose session is gone are unaccounted
            # for: end them; opening the session gives up what they held, so it runs
            # again now.
            adopted = []
            ray.get(self._loader.reset.remote())
            self.session.open()
        self.owner = self.session.owner("scheduler")
        self.health_ = JournalHealth("the engine's journal", level=logging.WARNING)
        self._health: dict[str, tuple[float, dict]] = {}  # host process -> (when, its health)
        self._blocked: dict[int, int] = {}  # host -> instances a journal fault blocked there
        resources = ray.cluster_resources()
        self.core = SchedulerCore(
            self.journal,
            pool_config(cfg, resources.get("CPU", os.cpu_count() or 1), resources.get("memory", 8 << 30)),
            max_failures=cfg.max_activation_failures, host_owner=self._host_owner,
            telemetry_env=cfg.telemetry_env, retention=cfg.retention,
        )
        self._hosts: dict[int, _LiveHost] = {}
        self._by_key: dict[CodeKey, list[tuple[int, Any]]] = {}  # ready hosts, for notify
        self._counters = {"activations": 0, "warm_starts": 0, "outcomes": {}}
        self._writes: dict[str, dict] = {}  # host process -> its journal's write stats
        self._wakes: dict[str, dict] = {}  # host process -> its wakes by datagram
        self.metrics = EngineMetrics(
            cfg.telemetry_env, cfg.metrics_port, cfg.metrics_host,
            self._hosts_by_tenant, self.journal.count_by_tenant_status,
            self._blocked_by_tenant, lambda: self.health_.ok,
        )
        self._stopping = False
        self._last_tick = 0.0
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._adopt(adopted)
        self._thread = threading.Thread(target=self._run_loop, name="dynwf-scheduler", daemon=True)
        self._thread.start()

    # -- called through the actor --------------------------------------------

    def ping(self) -> dict:
        return {"owner": self.owner, "config": self.config.model_dump(),
                "pool": vars(self.core.pool.config)}

    def notify(
        self, tenant_id: str | None, version: str | None, name_hosts: bool = False,
    ) -> list[tuple[int, Any]] | None:
        """New work may be due (created, event sent, resumed): the version's hosts look
        now, and the next tick sees it. With `name_hosts`, the hosts woken are named
        back (host id, its process's handle), for the caller's `Router`."""
        woken: list[tuple[int, Any]] = []
        if tenant_id is not None and version is not None:
            key = CodeKey(tenant_id, version)
            for host_id, actor in list(self._by_key.get(key, ())):
                host = self.core.pool.hosts.get(host_id)
                if host is not None and host.quota > 0:
                    actor.wake.remote(host_id)
                    woken.append((host_id, actor))
        if not woken:
            self._loop.call_soon_threadsafe(self._wake.set)
        # else it runs at once; the next tick counts it in
        return woken if name_hosts else None

    def short_of_slots(self, host_id: int) -> None:
        """The host is at its quota with work of its code waiting: tick soon (coalesced
        with other reasons to, MIN_TICK apart) when that could raise its quota."""
        if self.core.pool.could_give_more(host_id):
            self._loop.call_soon_threadsafe(self._wake.set)

    def retire(self, tenant_id: str) -> None:
        """A tenant's settings changed: replace its hosts (running activations finish)."""
        def apply() -> None:
            self.core.refresh_policies()
            self._apply(self.core.pool.stop_version(tenant_id))
            self._wake.set()
        self._loop.call_soon_threadsafe(apply)

    def stats(self) -> dict:
        writes: dict[str, float] = {}
        for report in list(self._writes.values()):
            for k, v in report.items():
                writes[k] = max(writes.get(k, 0), v) if k == "group_max" else round(writes.get(k, 0) + v, 6)
        pool = self.core.pool
        return {
            "running_activations": sum(h.running for h in self._hosts.values()),
            "busy_hosts": sum(1 for h in self._hosts.values() if h.running),
            "ready_hosts": sum(1 for h in self._hosts.values() if h.ready),
            "pool": {**pool.counters, "max_hosts": pool.config.max_hosts,
                     "max_activations": pool.config.max_activations,
                     "cold_start_estimate_s": round(pool.cold_start_s, 3)},
            "journal_writes": writes,
            "wakes": {k: sum(w.get(k, 0) for w in list(self._wakes.values()))
                      for k in wakeup.STATS},
            **{k: v for k, v in self._counters.items()},
            **self.core.counters,
            "session": self.session.epoch,
            "instances_reclaimed": self.session.reclaimed,  # from sessions found gone
            "metrics_url": self.metrics.url,
        }

    def health(self) -> dict:
        """The engine's journal health (`health.merge` of its processes'), and `ready`:
        whether the scheduler runs and the journal can be written."""
        return {"ready": self.health_.ok and not self._stopping,
                "journal": self.health_.snapshot(), "session": self.session.epoch}

    def stop(self) -> None:
        """Stop activating; end hosts; release their instances so the next engine resumes them."""
        self._stopping = True
        self._loop.call_soon_threadsafe(self._wake.set)
        self._thread.join(timeout=10)  # no tick after this one: nothing new starts
        ray.get(self._loader.reset.remote(close=True))
        try:
            self.session.close()
        except Exception:  # noqa: BLE001 - the next engine on this machine ends it
            log.exception("could not end this engine's session")
        self.metrics.shutdown()

    def _host_owner(self, host_id: int) -> str:
        return self.session.owner(f"host-{host_id}")

    # -- the loop ------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._loop.create_task(self._report_forever())
        self._loop.create_task(self._sweep_forever())
        while not self._stopping:
            self._wake.clear()
            wait = self.config.poll_interval
            try:
                since = time.monotonic() - self._last_tick
                if since < MIN_TICK:
                    await asyncio.sleep(MIN_TICK - since)
                self._last_tick = time.monotonic()
                self._apply(self.core.tick(time.time()))
                nxt = self.journal.next_wake_at()
                if nxt is not None:
                    # Due now: a backlog the hosts are working off; look again soon to
                    # share and size by it. Later: a timer, perhaps of code with no host.
                    wait = min(wait, max(nxt - time.time(), BACKLOG_TICK))
            except JournalUnavailableError:
                pass  # the journal's health says so, once; the next tick retries
            except Exception:  # noqa: BLE001 - a bug: say so, and go on
                log.exception("scheduler tick failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _adopt(self, hosts: list[LiveHost]) -> None:
        """Take over the hosts a previous incarnation started (see the module docstring)."""
        now = time.time()
        for h in hosts:
            key = CodeKey(h.tenant_id, h.version)
            self._hosts[h.host_id] = _LiveHost(key, h.actor, h.node_id, ready=True)
            self._by_key.setdefault(key, []).append((h.host_id, h.actor))
            self.core.pool.adopt(h.host_id, key, now)
            self._loop.create_task(self._serve_host(h.host_id, key, h.actor.serve.remote(h.host_id)))
        self.core.counters["hosts_adopted"] += len(hosts)
        if self.session.epoch is not None and self.session.adopted:
            owners = {self._host_owner(h.host_id) for h in hosts}
            try:
                released = self.core.release_unadopted(self.session.epoch, owners, now)
            except JournalUnavailableError:
                released = 0  # those leases expire instead; the journal's health says why
            log.info("adopted %d live host(s) of the previous scheduler; %d instance(s) "
                     "leased by hosts that are gone run again", len(hosts), released)

    def _apply(self, decisions: list[Decision]) -> None:
        for d in decisions:
            if isinstance(d, Start):
                self._hosts[d.host_id] = _LiveHost(d.key)
                self._loop.create_task(self._run_host(d.host_id, d.key, d.reason))
            elif isinstance(d, Stop):
                self.metrics.host_change("stopped", d.key.tenant_id, d.reason)
                host = self._hosts.get(d.host_id)
                log.info("stopping a host of tenant %s version %s: %s", *d.key, d.reason)
                self._forget(d.host_id, keep=True)
                if host is not None and host.actor is not None:
                    host.actor.stop.remote(d.host_id)
            elif isinstance(d, Quota):
                host = self._hosts.get(d.host_id)
                if host is not None and host.actor is not None:
                    host.actor.set_quota.remote(d.host_id, d.slots)

    async def _run_host(self, host_id: int, key: CodeKey, reason: str) -> None:
        """Start a host, then serve it (`_serve_host`)."""
        try:
            actor, node_id = await self._loader.start.remote(
                host_id, key.tenant_id, key.version, self._host_owner(host_id), True,
                self._incarnation,
            )
        except RayActorError as exc:  # the loader died: the host's fate is unknown
            await self._serve_host(host_id, key, exc)
            return
        except Exception as exc:  # noqa: BLE001 - its code cannot be loaded (now)
            cause = getattr(exc, "cause", None) or exc
            self._forget(host_id)
            self.core.pool.ended(host_id)
            self._wake.set()
            if not isinstance(cause, JournalUnavailableError):  # then the next tick tries again
                await self._code_unavailable(key, cause)
            return
        self._hosts[host_id].actor, self._hosts[host_id].node_id = actor, node_id
        self.metrics.host_change("started", key.tenant_id, reason)
        served = actor.serve.remote(host_id)
        self.core.pool.started(host_id, time.time())
        self._hosts[host_id].ready = True
        if not self.core.pool.hosts.get(host_id, None) or self.core.pool.hosts[host_id].stopping:
            actor.stop.remote(host_id)
        else:
            self._by_key.setdefault(key, []).append((host_id, actor))
        self._wake.set()
        await self._serve_host(host_id, key, served)

    async def _serve_host(self, host_id: int, key: CodeKey, served: Any) -> None:
        """Wait until the host stops (`served`: its `serve` call, or why it could not
        start), and clean up after it, or after its death."""
        why, node_lost = None, False
        try:
            if isinstance(served, BaseException):
                raise served
            last = await self._until_settled(host_id, served)
            self._account(host_id, last)
        except Exception as exc:  # noqa: BLE001 - its process died, or a bug: its work crashed
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not isinstance(exc, RayActorError):
                log.error("host %s failed: %s", host_id, exc)
            elif _node_lost(self._hosts.get(host_id), exc):
                node_lost = True
        finally:
            self._forget(host_id)
            self._blocked.pop(host_id, None)
            self.core.pool.ended(host_id)
            self._loader.end.remote(host_id)
            self._wake.set()
        if why is not None and not self._stopping:
            log.warning("a host of tenant %s version %s died: %s", *key, why)
            pooled = self.core.pool.hosts.get(host_id)
            if pooled is None or not pooled.stopping:  # a stop already counted it
                self.metrics.host_change("stopped", key.tenant_id, "died")
            try:
                self.core.host_died(host_id, time.time(), why, node_lost=node_lost)
            except JournalUnavailableError:
                pass  # its instances' leases expire; the journal's health says why

    async def _until_settled(self, host_id: int, served: Any) -> Any:
        """`served`'s outcome once Ray knows it. A call whose connection broke
        (`ActorUnavailableError`: the process or its node may be gone, or a network
        hiccup) is made again every second (`serve` joins the host's one serving) until
        it returns, or Ray says the process died: by then a lost node has been declared
        dead, so its hosts count as lost with it, not as crashes. Gives up after
        `UNAVAILABLE_FOR` seconds and counts the host dead."""
        deadline = time.monotonic() + UNAVAILABLE_FOR
        while True:
            try:
                return await served
            except ActorUnavailableError:
                host = self._hosts.get(host_id)
                if host is None or host.actor is None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
                served = host.actor.serve.remote(host_id)

    async def _code_unavailable(self, key: CodeKey, cause: BaseException) -> None:
        """No host can run this code: error its due instances if it cannot ever run
        (no such code stored), else count a crash for each (it may work next time)."""
        log.error("cannot load code for tenant %s version %s: %s", *key, cause)
        now = time.time()
        claims = self.journal.claim_due(now, 1000, self.owner, self.config.lease_ttl, *key)
        message = f"tenant {key.tenant_id!r}: {cause}"
        if isinstance(cause, LookupError):  # no such code stored: retrying cannot help
            for claim in claims:
                self.core.give_up(claim, "CodeUnavailableError", message, now)
        else:
            self.core.crashed(claims, now, "CodeUnavailableError", message)

    def _forget(self, host_id: int, keep: bool = False) -> None:
        host = self._hosts.get(host_id) if keep else self._hosts.pop(host_id, None)
        if host is not None and host.actor is not None:
            ready = [(i, a) for i, a in self._by_key.get(host.key, []) if i != host_id]
            if ready:
                self._by_key[host.key] = ready
            else:
                self._by_key.pop(host.key, None)

    async def _report_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(REPORT_EVERY)
            hosts = [(i, h) for i, h in list(self._hosts.items()) if h.ready]
            replies = await asyncio.gather(
                *(h.actor.report.remote(i) for i, h in hosts), return_exceptions=True
            )
            for (host_id, _), reply in zip(hosts, replies):
                if isinstance(reply, HostReport):
                    self._account(host_id, reply)
            await asyncio.to_thread(self._keep_session)
            self._merge_health()

    async def _sweep_forever(self) -> None:
        """Delete expired finished instances, off the loop, a bounded batch at a time."""
        while not self._stopping:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                await asyncio.to_thread(self.core.sweep, time.time(), SWEEP_BATCHES, SWEEP_PAUSE)
            except JournalUnavailableError:
                pass  # the journal's health says so; the next round tries again
            except Exception:  # noqa: BLE001 - a bug: say so, and go on
                log.exception("sweeping expired instances failed")

    def _keep_session(self) -> None:
        """Heartbeat (the scheduler's own probe of the journal) and end sessions that are
        gone. A scheduler whose session another engine ended must not go on: it exits,
        and Ray starts it again, in a new session, with its hosts ended."""
        try:
            alive = self.session.tick()
        except JournalUnavailableError:
            return
        if not alive and not self._stopping:
            os._exit(1)

    def _merge_health(self) -> None:
        now = time.monotonic()
        fresh = [h for at, h in self._health.values() if now - at < HEALTH_FRESH]
        before = dict(self.health_.failures)
        self.health_.observe(merge([self.journal.health.snapshot(), *fresh]))
        for cause, n in self.health_.failures.items():
            if n > before.get(cause, 0):
                self.metrics.journal_failures(cause, n - before.get(cause, 0))

    def _account(self, host_id: int, report: HostReport) -> None:
        host = self._hosts.get(host_id)
        if host is None:
            return
        host.running = report.running
        self._writes[report.process] = report.writes  # one journal per host process
        self._wakes[report.process] = report.wakes
        self._health[report.process] = (time.monotonic(), report.journal)
        self._blocked[host_id] = report.blocked
        outcomes = self._counters["outcomes"]
        for outcome, n in report.outcomes.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n
            self._counters["activations"] += n
        self._counters["warm_starts"] += report.counts.warm
        self.metrics.record(host.key.tenant_id, report.counts)

    def _blocked_by_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for host_id, n in list(self._blocked.items()):
            host = self._hosts.get(host_id)
            if host is not None and n:
                counts[host.key.tenant_id] = counts.get(host.key.tenant_id, 0) + n
        return counts

    def _hosts_by_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for host in list(self._hosts.values()):
            counts[host.key.tenant_id] = counts.get(host.key.tenant_id, 0) + 1
        return counts
