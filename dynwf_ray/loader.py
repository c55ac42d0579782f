"""The loader actor: tenant code -> Ray runtime env -> instance host actors.

One per engine, named `dynwf-loader-<engine name>`. It owns:
- `get(id, load)`: a cache by id whose `load` callback runs only on a miss;
  the least recently used entries beyond `loader_cache_size` are evicted. The
  loader caches each code version's spec through it: the stored code read from
  the journal, and the Ray runtime_env of its hosts (its pip packages, if any).
- the host actors: `start` creates one for a (tenant, code version) in that
  version's runtime env, `end` deactivates one (its spans flushed, its process
  killed). Which hosts live, and how much each runs, is the scheduler's
  decision (`pool.py`); the loader only carries it out.

A host is started with its tenant's merged telemetry settings (see
`tracing.tenant_env`) and sandbox policy (the engine's mode and limits, the
tenant's `TenantPolicy` from the journal).

Hosts are owned by this actor: if it dies they die with it, and the scheduler
re-activates their instances.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import ray

from .binding import WorkflowBinding
from .config import EngineConfig
from .errors import InvalidInputError
from .host import InstanceHost
from .journal import Journal
from .scheduler import Notifier
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
        return WorkflowBinding(
            journal, self.tenant_id, notify=Notifier(self._notify), otel_env=self.otel_env
        )

    def _notify(self, tenant_id: str, version: str | None) -> None:
        try:
            ray.get_actor(self.scheduler_name, namespace=self.namespace).notify.remote(
                tenant_id, version
            )
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
        self._hosts: dict[int, _Host] = {}
        self._closed = False
        self._counters = {"cache_hits": 0, "cache_misses": 0, "cold_starts": 0}

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

    # -- hosts ----------------------------------------------------------------

    def start(self, host_id: int, tenant_id: str, version: str) -> Any:
        """Start an instance host for this code (a cold start) and return its handle.

        The host leases as `<host_owner_prefix><host_id>`. Raises LookupError when the
        code cannot be run (none stored, or pip packages its tenant may no longer use).
        """
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
        # Spread hosts over the cluster's nodes: each holds its own sandboxes, and a
        # node's loss then takes only its share of the activations with it. (Ray places
        # actors that ask for no resource at all on random nodes, which bunches them
        # up: a token request of 1 byte of memory makes SPREAD work.)
        options: dict[str, Any] = {"scheduling_strategy": "SPREAD", "memory": 1}
        if spec.runtime_env:
            options["runtime_env"] = spec.runtime_env
        cfg = self.config
        actor = InstanceHost.options(**options).remote(
            cfg.database_url, spec.tenant_id, spec.version, spec.kind, spec.blob,
            spec.manifest_json, cfg.lease_ttl, cfg.host_owner(host_id), cfg.poll_interval,
            HostBindingFactory(tenant_id, cfg.scheduler_name, cfg.namespace, cfg.telemetry_env),
            otel_env, cfg.log_lines_per_instance, sandbox,
        )
        with self._lock:
            if self._closed:  # the engine stopped while this host was being created
                ray.kill(actor)
                raise RuntimeError("the engine is stopping")
            self._hosts[host_id] = _Host(host_id, (tenant_id, version), actor)
            self._counters["cold_starts"] += 1
        log.info("started a host for tenant %s version %s", tenant_id, version)
        return actor

    def end(self, host_id: int) -> None:
        """Deactivate a host: flush its spans, then end its process (a dead one: forget it)."""
        with self._lock:
            host = self._hosts.pop(host_id, None)
        if host is not None:
            _drain_and_kill([host.actor])

    def sandboxes(self) -> list[dict]:
        """What every live host reports of its sandboxes (see `InstanceHost.sandboxes`)."""
        with self._lock:
            actors = [h.actor for h in self._hosts.values()]
        refs = [a.sandboxes.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0) if refs else ([], [])
        out = []
        for ref in ready:
            try:
                out.append(ray.get(ref))
            except Exception:  # noqa: BLE001 - a host that died meanwhile
                pass
        return out

    def reset(self, close: bool = False) -> None:
        """End every host (the scheduler (re)started: hosts of its predecessor are
        unaccounted for; their instances' leases are released or expire). With
        `close`, the engine is stopping: start no host from now on."""
        with self._lock:
            self._closed = self._closed or close
            hosts, self._hosts = list(self._hosts.values()), {}
        _drain_and_kill([host.actor for host in hosts])

    def stats(self) -> dict:
        with self._lock:
            by_tenant: dict[str, int] = {}
            for host in self._hosts.values():
                by_tenant[host.key[0]] = by_tenant.get(host.key[0], 0) + 1
            return {
                "live_hosts": len(self._hosts),
                "hosts_by_tenant": by_tenant,
                "cache_entries": len(self._cache),
                "loader_cache_size": self.config.loader_cache_size,
                **self._counters,
            }


#: Longest a host being deactivated gets to export its pending spans.
DRAIN_TIMEOUT = 3.0


def _drain_and_kill(actors: list[Any]) -> None:
    """Ask hosts to flush their spans (bounded wait), then end their processes."""
    if actors:
        refs = [actor.drain.remote(DRAIN_TIMEOUT) for actor in actors]
        ray.wait(refs, num_returns=len(refs), timeout=DRAIN_TIMEOUT + 1)
    for actor in actors:
        ray.kill(actor)
