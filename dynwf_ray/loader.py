"""The loader actor: tenant code -> Ray runtime env -> warm instance hosts.

One per engine, named `dynwf-loader-<engine name>`. It owns:
- `get(id, load)`: a cache by id whose `load` callback runs only on a miss;
  the least recently used entries beyond `loader_cache_size` are evicted. The
  loader caches each code version's spec through it: the stored code read from
  the journal, and the Ray runtime_env of its hosts (its pip packages, if any).
- the host pool: instance host actors per (tenant, code version). `acquire`
  hands the scheduler an idle (warm) host or starts a new (cold) one in that
  version's runtime env; `release` takes it back as idle, keeping at most
  `warm_pool_size` idle hosts per version; idle hosts are deactivated (their
  processes killed) after `hibernate_after` seconds, and the least recently
  used idle host is evicted when a cold start needs a slot under `max_hosts`.

A host is started with its tenant's merged telemetry settings (see
`tracing.tenant_env`) and sandbox policy (the engine's mode and limits, the
tenant's `TenantPolicy` from the journal), and is asked to flush its pending
spans before it is deactivated. `retire(tenant)` deactivates a tenant's idle
hosts, so new settings apply from its next activation.

Hosts are owned by this actor: if it dies they die with it, and the scheduler
re-activates their instances.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from .binding import WorkflowBinding
from .config import EngineConfig
from .errors import InvalidInputError
from .host import InstanceHost
from .journal import Journal
from .package import PACKAGE, Manifest, check_pip_allowed, runtime_env_for
from .tracing import tenant_env

log = logging.getLogger("dynwf_ray.loader")

CodeKey = tuple[str, str]  # (tenant_id, code_version)


@dataclass(frozen=True)
class CodeSpec:
    """What a host of one code version needs."""

    tenant_id: str
    version: str
    kind: str
    blob: bytes
    manifest_json: str
    runtime_env: dict | None


@dataclass
class _Host:
    id: int
    key: CodeKey
    actor: Any
    owner: str
    idle_since: float = field(default_factory=time.monotonic)


class HostBindingFactory:
    """Builds the tenant-scoped WORKFLOWS binding inside a host (picklable)."""

    def __init__(
        self, tenant_id: str, scheduler_name: str, namespace: str, otel_env: dict[str, str]
    ):
        self.tenant_id = tenant_id
        self.scheduler_name = scheduler_name
        self.namespace = namespace
        self.otel_env = otel_env

    def __call__(self, journal: Journal) -> WorkflowBinding:
        return WorkflowBinding(journal, self.tenant_id, notify=self._notify, otel_env=self.otel_env)

    def _notify(self) -> None:
        try:
            ray.get_actor(self.scheduler_name, namespace=self.namespace).notify.remote()
        except ValueError:
            pass  # no scheduler running: the instance is picked up by the next one's poll


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4)
class Loader:
    def __init__(self, config: dict, bindings: dict[str, Callable[[str], Any]] | None = None):
        self.config = EngineConfig(**config)
        self._bindings = dict(bindings or {})
        self.journal = Journal(self.config.database_url, create_tables=False)
        self._lock = threading.RLock()
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self._idle: dict[CodeKey, list[_Host]] = {}
        self._busy: dict[int, _Host] = {}
        # Host ids never repeat across restarts of this actor: Ray retries the scheduler's
        # calls that were in flight when it died, and a `discard` of an old host must
        # not end a new one that happens to get the same number.
        self._seq = time.time_ns() // 1000
        self._sent: set[int] = set()  # hosts whose handle the scheduler has
        self._ended: list[int] = []  # of those, ended since the last acquire
        self._counters = {"cache_hits": 0, "cache_misses": 0, "cold_starts": 0, "warm_starts": 0}
        threading.Thread(target=self._reap_forever, name="dynwf-loader-reaper", daemon=True).start()

    # -- the cache ----------------------------------------------------------

    def get(self, id: Any, load: Callable[[], Any]) -> Any:
        """The value cached under `id`; `load()` is called (and cached) only on a miss."""
        with self._lock:
            if id in self._cache:
                self._counters["cache_hits"] += 1
                self._cache.move_to_end(id)
                return self._cache[id]
        value = load()
        with self._lock:
            self._counters["cache_misses"] += 1
            self._cache[id] = value
            self._cache.move_to_end(id)
            while len(self._cache) > self.config.loader_cache_size:
                self._cache.popitem(last=False)
        return value

    def code_spec(self, tenant_id: str, version: str) -> CodeSpec:
        return self.get(("code", tenant_id, version), lambda: self._load_spec(tenant_id, version))

    def _load_spec(self, tenant_id: str, version: str) -> CodeSpec:
        code = self.journal.get_code(tenant_id, version)
        if code is None:
            raise LookupError(f"no code stored for tenant {tenant_id!r} version {version!r}")
        kind, blob, manifest_json = code
        if kind != PACKAGE:
            return CodeSpec(tenant_id, version, kind, blob, manifest_json, None)
        manifest = Manifest(**json.loads(manifest_json))
        return CodeSpec(tenant_id, version, kind, blob, manifest_json, runtime_env_for(manifest))

    # -- the host pool --------------------------------------------------------

    def acquire(self, tenant_id: str, version: str) -> dict:
        """A host for this code: {"host_id", "owner", "warm", "actor", "ended"}.

        The actor handle is sent only the first time a host is lent (passing a
        handle costs milliseconds; the scheduler keeps the ones it got), and
        "ended" lists hosts ended since the last call, whose handles it can drop.
        """
        key = (tenant_id, version)
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                host = idle.pop()
                if not idle:
                    del self._idle[key]
                self._busy[host.id] = host
                self._counters["warm_starts"] += 1
                return self._lend(host, warm=True)
        spec = self.code_spec(tenant_id, version)
        policy = json.loads(self.journal.tenant_policy(tenant_id) or "{}")
        if spec.kind == PACKAGE:  # the platform may have withdrawn pip since the push
            try:
                check_pip_allowed(tenant_id, Manifest(**json.loads(spec.manifest_json)), policy)
            except InvalidInputError as exc:
                raise LookupError(str(exc)) from None
        otel_env = tenant_env(self.journal, self.config.telemetry_env, tenant_id, version)
        sandbox = {
            "mode": self.config.sandbox,
            "limits": self.config.sandbox_limits.model_dump(),
            "policy": policy,
            "max_crashes": self.config.max_activation_failures,
            "bindings": self._bindings,
        }
        with self._lock:
            while self._live() >= self.config.max_hosts and self._evict_one_idle():
                pass
            self._seq += 1
            owner = f"{self.config.host_owner_prefix}{self._seq}-{time.time_ns() % 10**9}"
            # Spread hosts over the cluster's nodes: each holds its own sandboxes, and
            # a node's loss then takes only its share of the activations with it. (Ray
            # places actors that ask for no resource at all on random nodes, which
            # bunches them up: a token request of 1 byte of memory makes SPREAD work.)
            options: dict[str, Any] = {"scheduling_strategy": "SPREAD", "memory": 1}
            if spec.runtime_env:
                options["runtime_env"] = spec.runtime_env
            cfg = self.config
            actor = InstanceHost.options(**options).remote(
                cfg.database_url, spec.tenant_id, spec.version, spec.kind, spec.blob,
                spec.manifest_json, cfg.lease_ttl, owner, cfg.host_slice,
                HostBindingFactory(tenant_id, cfg.scheduler_name, cfg.namespace, cfg.telemetry_env),
                otel_env, cfg.log_lines_per_instance, sandbox,
            )
            host = _Host(self._seq, key, actor, owner)
            self._busy[host.id] = host
            self._counters["cold_starts"] += 1
            lent = self._lend(host, warm=False)
        log.info("started a host for tenant %s version %s", tenant_id, version)
        return lent

    def sandboxes(self) -> list[dict]:
        """What every live host reports of its sandboxes (see `InstanceHost.sandboxes`)."""
        with self._lock:
            actors = [h.actor for h in self._busy.values()] + [
                h.actor for v in self._idle.values() for h in v
            ]
        refs = [a.sandboxes.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0) if refs else ([], [])
        out = []
        for ref in ready:
            try:
                out.append(ray.get(ref))
            except Exception:  # noqa: BLE001 - a host that died meanwhile
                pass
        return out

    def handle(self, host_id: int) -> Any:
        """The actor handle of a live host (for a caller that lost it)."""
        with self._lock:
            host = self._busy.get(host_id)
            return host.actor if host is not None else None

    def _lend(self, host: _Host, warm: bool) -> dict:
        lent = {"host_id": host.id, "owner": host.owner, "warm": warm, "ended": self._ended}
        self._ended = []
        if host.id not in self._sent:
            self._sent.add(host.id)
            lent["actor"] = host.actor
        return lent

    def _end(self, host: _Host) -> None:
        """Deactivate a host: flush its spans, then kill its process (lock held)."""
        threading.Thread(target=_drain_and_kill, args=([host.actor],), daemon=True).start()
        if host.id in self._sent:
            self._sent.discard(host.id)
            self._ended.append(host.id)

    def release(self, host_id: int) -> None:
        """An activation ended: the host goes back to its version's warm pool."""
        with self._lock:
            host = self._busy.pop(host_id, None)
            if host is None:
                return
            pool = self._idle.setdefault(host.key, [])
            if len(pool) >= self.config.warm_pool_size:
                self._end(host)
                return
            host.idle_since = time.monotonic()
            pool.append(host)

    def discard(self, host_id: int) -> None:
        """The host died (or must not be reused): forget it, make sure it is gone."""
        with self._lock:
            host = self._busy.pop(host_id, None)
            if host is not None:
                self._end(host)

    def reset(self) -> None:
        """Kill every host (the scheduler restarted and lost track of busy ones)."""
        with self._lock:
            hosts = list(self._busy.values()) + [h for v in self._idle.values() for h in v]
            self._busy.clear()
            self._idle.clear()
            self._sent.clear()
            self._ended.clear()
        _drain_and_kill([host.actor for host in hosts])

    def retire(self, tenant_id: str) -> int:
        """Deactivate a tenant's idle hosts (its telemetry settings or policy changed)."""
        with self._lock:
            keys = [key for key in self._idle if key[0] == tenant_id]
            hosts = [host for key in keys for host in self._idle.pop(key)]
            for host in hosts:
                self._end(host)
        return len(hosts)

    def stats(self) -> dict:
        with self._lock:
            idle = sum(len(v) for v in self._idle.values())
            return {
                "live_hosts": len(self._busy) + idle,
                "busy_hosts": len(self._busy),
                "idle_hosts": idle,
                "warm_versions": len(self._idle),
                "hosts_by_tenant": self._hosts_by_tenant(),
                "max_hosts": self.config.max_hosts,
                "warm_pool_size": self.config.warm_pool_size,
                "cache_entries": len(self._cache),
                "loader_cache_size": self.config.loader_cache_size,
                **self._counters,
            }

    def _hosts_by_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for host in [*self._busy.values(), *(h for v in self._idle.values() for h in v)]:
            counts[host.key[0]] = counts.get(host.key[0], 0) + 1
        return counts

    def _live(self) -> int:
        return len(self._busy) + sum(len(v) for v in self._idle.values())

    def _evict_one_idle(self) -> bool:
        oldest: _Host | None = None
        for hosts in self._idle.values():
            for host in hosts:
                if oldest is None or host.idle_since < oldest.idle_since:
                    oldest = host
        if oldest is None:
            return False
        self._idle[oldest.key].remove(oldest)
        if not self._idle[oldest.key]:
            del self._idle[oldest.key]
        self._end(oldest)
        return True

    def _reap_forever(self) -> None:
        limit = self.config.hibernate_after
        while True:
            time.sleep(min(max(limit / 4, 0.05), 1.0))
            now = time.monotonic()
            with self._lock:
                for key, hosts in list(self._idle.items()):
                    keep = [h for h in hosts if now - h.idle_since < limit]
                    for host in hosts:
                        if host not in keep:
                            log.info("deactivating idle host of tenant %s version %s", *key)
                            self._end(host)
                    if keep:
                        self._idle[key] = keep
                    else:
                        del self._idle[key]


#: Longest a host being deactivated gets to export its pending spans.
DRAIN_TIMEOUT = 3.0


def _drain_and_kill(actors: list[Any]) -> None:
    """Ask hosts to flush their spans (bounded wait), then end their processes."""
    if actors:
        refs = [actor.drain.remote(DRAIN_TIMEOUT) for actor in actors]
        ray.wait(refs, num_returns=len(refs), timeout=DRAIN_TIMEOUT + 1)
    for actor in actors:
        ray.kill(actor)
