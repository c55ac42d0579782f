"""The host pool: which instance hosts live, and how many activations each may run.

A plain object (no Ray, no journal, no clock of its own): the scheduler calls
`tick(now, demand, caps)` with what the journal says is due and leased per code
version, and carries out the `Start`, `Stop` and `Quota` decisions it returns;
it reports back what happened (`started`, `ended`, and `adopt` for a host a
previous scheduler started). Tests drive it the same way.

What it decides:
- **Admission, fair between tenants.** `max_activations` slots are shared by
  max-min fairness: every tenant with work gets an equal share, capped by what
  it wants (its due and leased instances) and by its `max_concurrency`; what one
  tenant cannot use goes to the others. A tenant's share is split among its code
  versions the same way, and a version's among its hosts as their *quotas*: a
  host claims due instances of its code itself while it runs fewer than its
  quota. Capacity no tenant wants now is lent evenly to all warm hosts (within
  their tenants' caps), and every warm host keeps at least one slot, so that
  new work starts without waiting for the scheduler; quotas stay put while
  capacity is plentiful.
- **Hosts follow demand.** A version with work and no host gets one at once
  (there is no warm one to wait for). It gets another only while it has more
  work than its hosts may run, for longer than a cold start takes (the expected
  wait for a warm slot is then longer than a cold start), and never more than
  `cpus` hosts. A host is stopped when its version has had no work for
  `idle_after` seconds, or, for all but one host of a version, when the
  version's work has fitted in fewer hosts for `idle_after / 4` seconds. Under
  a steady load nothing is started or stopped after warm-up.
- **Eviction.** At `max_hosts`, a version that needs its first host evicts the
  host idle the longest; one whose hosts all work waits.

Every start and stop carries its reason; `counters` counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple


class CodeKey(NamedTuple):
    """One tenant's code version: what a host runs."""

    tenant_id: str
    version: str


@dataclass(frozen=True)
class Want:
    """What one code version has to do now: instances due (not leased) and leased."""

    due: int
    leased: int

    @property
    def total(self) -> int:
        return self.due + self.leased


@dataclass(frozen=True)
class Start:
    """Start a host for `key`; report back with `HostPool.started(host_id, ...)`."""

    host_id: int
    key: CodeKey
    reason: str


@dataclass(frozen=True)
class Stop:
    """Stop a host: it takes no more work, finishes what it runs, and ends."""

    host_id: int
    key: CodeKey
    reason: str


@dataclass(frozen=True)
class Quota:
    """Let a host run up to `slots` activations at once."""

    host_id: int
    slots: int


Decision = Start | Stop | Quota


@dataclass
class PoolHost:
    id: int
    key: CodeKey
    ready: bool = False  # started: it takes quotas
    stopping: bool = False
    quota: int = 0
    started_at: float = 0.0
    ready_at: float | None = None
    idle_since: float = 0.0  # last time its version had no work, or it was started


@dataclass
class PoolConfig:
    max_activations: int
    max_hosts: int
    host_concurrency: int
    cpus: int
    idle_after: float
    #: Expected seconds a cold start takes (before one has been seen).
    cold_start_s: float = 1.5


def fair_shares(capacity: int, wants: dict, caps: dict | None = None) -> dict:
    """Max-min fair split of `capacity` slots among claimants by what they `wants`
    (each capped by `caps`): every claimant with a want gets at least one slot
    while slots last, then equal shares, and what a claimant cannot use goes to
    the others. Ties in the remainder go in key order (deterministic)."""
    caps = caps or {}
    limit = {k: min(w, caps.get(k) if caps.get(k) is not None else w) for k, w in wants.items()}
    shares = {k: 0 for k in wants}
    open_ = sorted(k for k, w in limit.items() if w > 0)
    left = capacity
    while open_ and left > 0:
        each = max(1, left // len(open_))
        still = []
        for k in open_:
            if left <= 0:
                break
            give = min(each, limit[k] - shares[k], left)
            shares[k] += give
            left -= give
            if shares[k] < limit[k]:
                still.append(k)
        open_ = still
    return shares


@dataclass
class HostPool:
    config: PoolConfig
    hosts: dict[int, PoolHost] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    _next_id: int = 1
    _backlog_since: dict[CodeKey, float] = field(default_factory=dict)
    _fits_since: dict[CodeKey, float] = field(default_factory=dict)
    _cold_start_s: float | None = None

    # -- what the scheduler reports ----------------------------------------------

    def started(self, host_id: int, now: float) -> None:
        """The host is up and takes quotas."""
        host = self.hosts.get(host_id)
        if host is not None:
            host.ready, host.ready_at, host.idle_since = True, now, now
            took = now - host.started_at
            self._cold_start_s = took if self._cold_start_s is None else (
                0.8 * self._cold_start_s + 0.2 * took
            )

    def adopt(self, host_id: int, key: CodeKey, now: float) -> None:
        """A host a previous scheduler started, alive and serving: it takes quotas now
        (its quota is unknown, so the next tick sets one)."""
        self.hosts[host_id] = PoolHost(host_id, key, ready=True, quota=-1, started_at=now,
                                       ready_at=now, idle_since=now)
        self._next_id = max(self._next_id, host_id + 1)

    def ended(self, host_id: int) -> PoolHost | None:
        """The host is gone (stopped, failed to start, or died)."""
        return self.hosts.pop(host_id, None)

    def stop_version(self, tenant_id: str) -> list[Stop]:
        """Stop every host of a tenant (its settings changed: new hosts get them)."""
        return [self._stop(h, "settings changed") for h in list(self.hosts.values())
                if h.key.tenant_id == tenant_id and not h.stopping]

    def could_give_more(self, host_id: int) -> bool:
        """A host runs as many activations as its quota and has more work of its code
        waiting: True when a tick could raise its quota (it is below what one host may
        run), so that sharing again now is worth it. Capacity lent to idle hosts comes
        back only at a tick, so without this a version whose load just rose works with
        the quota of its quiet time until the next one."""
        host = self.hosts.get(host_id)
        if host is None or host.stopping or not host.ready:
            return False
        return 0 <= host.quota < min(self.config.host_concurrency, self.config.max_activations)

    @property
    def cold_start_s(self) -> float:
        return self._cold_start_s if self._cold_start_s is not None else self.config.cold_start_s

    # -- the decisions -------------------------------------------------------------

    def tick(
        self, now: float, demand: dict[CodeKey, Want], caps: dict[str, int | None] | None = None
    ) -> list[Decision]:
        """Decide starts, stops and quotas for what is due now (`demand`: every code
        version with work; `caps`: tenants' `max_concurrency`)."""
        cfg = self.config
        out: list[Decision] = []
        by_tenant: dict[str, dict[CodeKey, int]] = {}
        for key, want in demand.items():
            if want.total > 0:
                by_tenant.setdefault(key.tenant_id, {})[key] = want.total
        tenant_shares = fair_shares(
            cfg.max_activations, {t: sum(w.values()) for t, w in by_tenant.items()}, caps
        )
        shares: dict[CodeKey, int] = {}
        for tenant, wants in by_tenant.items():
            shares.update(fair_shares(tenant_shares[tenant], wants))
        live = {h.id: h for h in self.hosts.values() if not h.stopping}

        # Hosts that are not needed: idle too long, or more than the work needs.
        for key in {h.key for h in live.values()}:
            mine = sorted((h for h in live.values() if h.key == key), key=lambda h: h.id)
            if shares.get(key, 0) > 0:
                for h in mine:
                    h.idle_since = now
                need = max(1, math.ceil(shares[key] / cfg.host_concurrency))
                if len(mine) > need:
                    since = self._fits_since.setdefault(key, now)
                    if now - since >= cfg.idle_after / 4:
                        out.append(self._stop(mine[-1], "surplus"))
                        del live[mine[-1].id]
                        self._fits_since[key] = now
                else:
                    self._fits_since.pop(key, None)
            else:
                self._fits_since.pop(key, None)
                for h in mine:
                    if h.ready and now - h.idle_since >= cfg.idle_after:
                        out.append(self._stop(h, "idle"))
                        del live[h.id]

        # Hosts that are needed: a first one at once, more while a backlog lasts.
        for key in sorted(shares, key=lambda k: (-shares[k], k)):
            share = shares[key]
            if share <= 0:
                continue
            mine = [h for h in live.values() if h.key == key]
            need = min(cfg.cpus, math.ceil(share / cfg.host_concurrency))
            if not mine:
                reason = "first host of its code"
            elif len(mine) < need and demand[key].due > 0 and all(h.ready for h in mine):
                since = self._backlog_since.setdefault(key, now)
                if now - since < self.cold_start_s:
                    continue
                reason = "backlog longer than a cold start"
            else:
                self._backlog_since.pop(key, None)
                continue
            if len(live) >= cfg.max_hosts:
                victim = self._evictable(live, shares, now) if not mine else None
                if victim is None:
                    continue
                out.append(self._stop(victim, "evicted"))
                del live[victim.id]
            host = PoolHost(self._next_id, key, started_at=now, idle_since=now)
            self._next_id += 1
            self.hosts[host.id] = live[host.id] = host
            self._backlog_since.pop(key, None)
            self._count(f"starts: {reason}")
            out.append(Start(host.id, key, reason))

        # Quotas: a version's share over its ready hosts, plus an even part of the
        # capacity nobody wants now (within the tenant's cap): new work of any warm
        # version starts without a round trip, and quotas do not follow every swing
        # of demand while capacity is plentiful.
        ready = sorted((h for h in live.values() if h.ready), key=lambda h: (h.key, h.id))
        spare = max(0, cfg.max_activations - sum(shares.values()))
        per_host = {h.id: 0 for h in ready}
        for key in {h.key for h in ready}:
            mine = [h for h in ready if h.key == key]
            share = shares.get(key, 0)
            for i, h in enumerate(mine):
                per_host[h.id] = share // len(mine) + (1 if i < share % len(mine) else 0)
        if ready and spare:
            each, extra = divmod(spare, len(ready))
            for i, h in enumerate(ready):
                per_host[h.id] += each + (1 if i < extra else 0)
        caps = caps or {}
        plentiful = sum(w.total for w in demand.values()) <= cfg.max_activations
        for h in ready:
            # Every warm host keeps at least one slot, even when capacity is scarce: new
            # work of its code starts at once, without waiting for a tick to share again.
            slots = max(1, min(per_host[h.id], cfg.host_concurrency))
            if plentiful:  # everything wanted runs anyway: lower no quota
                slots = max(slots, h.quota)
            cap = caps.get(h.key.tenant_id)
            if cap is not None:
                hosts_of_tenant = sum(1 for o in ready if o.key.tenant_id == h.key.tenant_id)
                slots = min(slots, max(1, cap // hosts_of_tenant))
            if slots != h.quota:
                h.quota = slots
                out.append(Quota(h.id, slots))
        return out

    # -- internals -------------------------------------------------------------

    def _stop(self, host: PoolHost, reason: str) -> Stop:
        host.stopping, host.quota = True, 0
        self._count(f"stops: {reason}")
        return Stop(host.id, host.key, reason)

    def _evictable(self, live: dict[int, PoolHost], shares: dict, now: float) -> PoolHost | None:
        idle = [h for h in live.values() if h.ready and shares.get(h.key, 0) == 0]
        return min(idle, key=lambda h: h.idle_since) if idle else None

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1
