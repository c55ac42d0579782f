"""The loader actor: tenant code -> Ray runtime env -> hosts in host processes.

One per engine, named `dynwf-loader-<engine name>`. It owns:
- `get(id, load)`: a cache by id whose `load` callback runs only on a miss;
  the least recently used entries beyond `loader_cache_size` are evicted. The
  loader caches each code version's spec through it: the stored code read from
  the journal, and the Ray runtime_env of its hosts (its pip packages, if any).
- the host processes (`host.HostProcess` actors) and the hosts in them:
  `start` places a host for a (tenant, code version) in a process (`_place`:
  code without pip packages shares `host_processes` per node, code with pip
  packages gets a process per runtime env) and returns that process's handle;
  `end` deactivates a host (its sandboxes ended, its spans flushed); `adopt`
  hands a restarted scheduler the live hosts. Which hosts live, and how much
  each runs, is the scheduler's decision (`pool.py`); the loader only carries
  it out. Each `start` names its scheduler's incarnation, and one from an
  incarnation older than the newest seen is refused (`StaleSchedulerError`): a
  call a dead scheduler left in flight never starts a host nobody accounts for.

A host is started with its tenant's merged telemetry settings (see
`tracing.tenant_env`) and sandbox policy (the engine's mode and limits, the
tenant's `TenantPolicy` from the journal).

Host processes are named, detached actors (`dynwf-hosts-<engine>-<id>`), so
they outlive this actor: when Ray restarts it, the new loader finds its
predecessor's processes by name and takes their hosts over (`_rediscover`), and
their activations go on. A host process ends itself once its loader is gone for
good (the engine stopped, or its driver died): see `HostProcess`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .binding import WorkflowBinding
from .config import EngineConfig
from .errors import InvalidInputError
from .host import HostProcess, HostSpec
from .journal import Journal
from .journal.node_writer import NodeWriter
from .sessions import this_process
from .notify import Notifier, Router
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


@dataclass(eq=False)
class _Process:
    actor: Any  # a HostProcess
    env: str | None  # its pip runtime env (as JSON), None for code without one
    node_id: str | None  # where it runs (until its first host says: where it was asked to)
    hosts: set[int] = field(default_factory=set)


@dataclass
class _Host:
    id: int
    key: CodeKey
    process: _Process
    node_id: str


@dataclass(frozen=True)
class LiveHost:
    """A host the loader has started and not ended, as a restarted scheduler adopts it."""

    host_id: int
    tenant_id: str
    version: str
    actor: Any  # its HostProcess
    node_id: str


class StaleSchedulerError(RuntimeError):
    """A call from a scheduler incarnation a newer one has replaced (it was in flight
    when its scheduler died): refused, so it cannot start a host nobody accounts for."""


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
            journal, self.tenant_id, notify=Notifier(Router(self._scheduler)), otel_env=self.otel_env
        )

    def _scheduler(self) -> Any:
        """The scheduler's handle (ValueError when none runs: the instance is picked up
        by the next one's poll)."""
        return ray.get_actor(self.scheduler_name, namespace=self.namespace)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4)
class Loader:
    def __init__(self, config: dict, bindings: dict[str, Callable[[str], Any]] | None = None):
        self.config = EngineConfig(**config)
        self._bindings = dict(bindings or {})
        self.journal = Journal(self.config.database_url, create_tables=False)
        # On SQLite, the machine's writer: it commits for every host process here.
        self._machine_writer = self.journal.is_sqlite and machine_writer(self.config, ray.nodes())
        self._writer: NodeWriter | None = None
        if self._machine_writer:
            writer = NodeWriter(self.journal)
            self._writer = writer if writer.start() else None  # else another engine's
        self._lock = threading.RLock()
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self._hosts: dict[int, _Host] = {}
        self._processes: list[_Process] = []
        self._closed = False
        self._incarnation: int | None = None  # the scheduler incarnation it serves
        self._counters = {"cache_hits": 0, "cache_misses": 0, "cold_starts": 0}
        self._id = ray.get_runtime_context().get_actor_id()
        self._rediscover()

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

    def identity(self) -> dict[str, Any]:
        """Where the loader runs ({"actor_id", "machine", "pid", "started"}): its hosts die
        with it, so a session that used it is gone once it is (sessions.py)."""
        machine, pid, started = this_process()
        return {"actor_id": ray.get_runtime_context().get_actor_id(), "machine": machine,
                "pid": pid, "started": started}

    def adopt(self, incarnation: int) -> list[LiveHost]:
        """A (re)started scheduler takes over: from now on only its calls to `start`
        (`incarnation`) are served. Returns the hosts alive now, for it to adopt."""
        with self._lock:
            self._incarnation = max(incarnation, self._incarnation or 0)
            return [LiveHost(h.id, h.key[0], h.key[1], h.process.actor, h.node_id)
                    for h in self._hosts.values()]

    def start(
        self, host_id: int, tenant_id: str, version: str, owner: str, bindings: bool = True,
        incarnation: int | None = None,
    ) -> tuple[Any, str]:
        """Start an instance host for this code (a cold start) in a host process, and
        return that process's handle (the scheduler calls it with `host_id`) and the id
        of the node it runs on.

        The host leases as `owner`; without `bindings` its sandboxes get none (a replay
        check's host: `check_replay`). Raises LookupError when the
        code cannot be run (none stored, or pip packages its tenant may no longer use),
        and StaleSchedulerError when `incarnation` (the calling scheduler's) is no longer
        the newest (`adopt`).
        """
        if self._closed:
            raise RuntimeError("the engine is stopping")
        self._check_incarnation(incarnation)
        with self._lock:
            known = self._hosts.get(host_id)
        if known is not None:  # Ray retried this call after restarting the loader
            return known.process.actor, known.node_id
        code = self.code_spec(tenant_id, version)
        policy = json.loads(self.journal.tenant_policy(tenant_id) or "{}")
        if code.kind == PACKAGE:  # the platform may have withdrawn pip since the push
            try:
                check_pip_allowed(tenant_id, Manifest(**json.loads(code.manifest_json)), policy)
            except InvalidInputError as exc:
                raise LookupError(str(exc)) from None
        cfg = self.config
        spec = HostSpec(
            tenant_id=tenant_id, version=version, kind=code.kind, blob=code.blob,
            manifest_json=code.manifest_json, lease_ttl=cfg.lease_ttl,
            owner=owner, poll_interval=cfg.poll_interval,
            binding_factory=HostBindingFactory(
                tenant_id, cfg.scheduler_name, cfg.namespace, cfg.telemetry_env
            ) if bindings else None,
            otel_env=tenant_env(self.journal, cfg.telemetry_env, tenant_id, version),
            keep_logs=cfg.log_lines_per_instance,
            sandbox={
                "mode": cfg.sandbox, "limits": cfg.sandbox_limits.model_dump(), "policy": policy,
                "max_crashes": cfg.max_activation_failures,
                "bindings": self._bindings if bindings else {},
            },
        )
        for _ in range(3):  # a process on a node that is gone: place the host elsewhere
            process = self._place(code.runtime_env)
            try:
                node_id = ray.get(process.actor.add.remote(host_id, spec))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError):
                self._drop(process)
                continue
            break
        else:
            raise RuntimeError("no host process could take the host")
        with self._lock:
            stale = self._stale(incarnation)
            process.node_id = node_id  # Ray may have placed it elsewhere than asked
            if not (self._closed or stale):
                process.hosts.add(host_id)
                self._hosts[host_id] = _Host(host_id, (tenant_id, version), process, node_id)
                self._counters["cold_starts"] += 1
        if self._closed or stale:  # the engine stopped, or a new scheduler took over, meanwhile
            ray.wait([process.actor.end.remote(host_id, DRAIN_TIMEOUT)], timeout=DRAIN_TIMEOUT + 1)
            self._check_incarnation(incarnation)
            raise RuntimeError("the engine is stopping")
        log.info("started a host for tenant %s version %s", tenant_id, version)
        return process.actor, node_id

    def _stale(self, incarnation: int | None) -> bool:
        """Whether a call comes from a scheduler incarnation older than the newest seen
        (incarnations grow; a restarted loader learns the newest from its first call)."""
        if incarnation is None:
            return False
        with self._lock:
            if self._incarnation is not None and incarnation < self._incarnation:
                return True
            self._incarnation = incarnation
            return False

    def _check_incarnation(self, incarnation: int | None) -> None:
        if self._stale(incarnation):
            raise StaleSchedulerError(
                f"refused a host start from scheduler incarnation {incarnation}: "
                f"incarnation {self._incarnation} has replaced it"
            )

    def check_replay(self, tenant_id: str, version: str, states: list) -> list[str | None]:
        """Whether each instance's history (`ActivationState`) replays on this code version
        (`replay_check.py`): None, or why not. In a host started for it, without
        bindings, ended afterwards."""
        host_id = -time.time_ns()  # never the id of a pool's host
        actor, _ = self.start(host_id, tenant_id, version, "replay-check", bindings=False)
        try:
            return ray.get(actor.check.remote(host_id, states))
        finally:
            self.end(host_id)

    def end(self, host_id: int) -> None:
        """Deactivate a host: end its sandboxes, flush its spans (bounded wait). A
        process of a pip runtime env that no longer hosts anything ends too."""
        with self._lock:
            host = self._hosts.pop(host_id, None)
            if host is None:
                return
            host.process.hosts.discard(host_id)
            last = host.process.env is not None and not host.process.hosts
            if last:
                self._processes.remove(host.process)
        ref = host.process.actor.end.remote(host_id, DRAIN_TIMEOUT)
        ray.wait([ref], timeout=DRAIN_TIMEOUT + 1)
        if last:
            ray.kill(host.process.actor)

    def _place(self, runtime_env: dict | None) -> "_Process":
        """The process a new host goes to. Code without pip packages shares the plain
        processes (`host_processes` per node, started as needed, least loaded first);
        code with pip packages gets a process per runtime env."""
        env = json.dumps(runtime_env, sort_keys=True) if runtime_env else None
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is stopping")
            mine = [p for p in self._processes if p.env == env]
            if env is not None and mine:
                return mine[0]
            node = None
            if env is None:
                nodes = ray.nodes()
                alive = {n["NodeID"] for n in nodes if n.get("Alive")}
                for gone in [p for p in mine if p.node_id is not None and p.node_id not in alive]:
                    self._drop(gone)  # its node is dead: its hosts went with it
                    mine.remove(gone)
                per_node = processes_per_node(nodes, _draining_nodes(), self.journal.is_sqlite,
                                              self.config.host_processes)
                counts = {n: sum(1 for p in mine if p.node_id == n) for n in per_node}
                short = [n for n, c in counts.items() if c < per_node[n]]
                usable = [p for p in mine if p.node_id in per_node]  # not on a draining node
                if not short and usable:
                    return min(usable, key=lambda p: len(p.hosts))
                node = min(short or counts, key=lambda n: counts[n], default=None)
            options: dict[str, Any] = {"scheduling_strategy": "SPREAD", "memory": 1}
            if node is not None:
                # hard: Ray's soft affinity falls back to another node too readily (most
                # processes ended up on one node); a node that died meanwhile makes the
                # process unschedulable, and `start` places the host elsewhere
                options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
            if runtime_env:
                options["runtime_env"] = runtime_env
            cfg = self.config
            actor = HostProcess.options(
                name=f"{self._prefix}{uuid.uuid4().hex[:16]}", namespace=cfg.namespace,
                lifetime="detached", **options,
            ).remote(cfg.database_url, (cfg.loader_name, cfg.namespace, self._id), env,
                     (cfg.scheduler_name, cfg.namespace), self._machine_writer)
            process = _Process(actor, env, node)
            self._processes.append(process)
            return process

    @property
    def _prefix(self) -> str:
        return f"dynwf-hosts-{self.config.name}-"

    def _rediscover(self) -> None:
        """Take over the host processes (and their hosts) of this loader's previous
        incarnation, found by name; end those of another loader of the same name (an
        engine that died before this one started)."""
        try:
            named = ray.util.list_named_actors(all_namespaces=True)
        except Exception:  # noqa: BLE001 - the GCS cannot say now: none to take over
            log.exception("could not list the host processes to take over")
            return
        asked = []
        for entry in named:
            if entry["namespace"] != self.config.namespace or not entry["name"].startswith(self._prefix):
                continue
            try:
                actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            except ValueError:  # gone meanwhile
                continue
            asked.append((actor, actor.describe.remote()))
        deadline = time.monotonic() + DESCRIBE_TIMEOUT  # all asked at once: one wait in all
        for actor, ref in asked:
            try:
                info = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - gone (with its node) or not answering
                continue
            if info["loader_id"] != self._id:
                ray.kill(actor)
                continue
            process = _Process(actor, info["env"], info["node_id"])
            self._processes.append(process)
            for host_id, tenant_id, version in info["hosts"]:
                process.hosts.add(host_id)
                self._hosts[host_id] = _Host(host_id, (tenant_id, version), process, info["node_id"])
        if self._processes:
            log.warning("restarted: took over %d host process(es) with %d host(s)",
                        len(self._processes), len(self._hosts))

    def _drop(self, process: "_Process") -> None:
        with self._lock:
            if process in self._processes:
                self._processes.remove(process)
            for host_id in process.hosts:
                self._hosts.pop(host_id, None)

    def sandboxes(self) -> list[dict]:
        """What every live host reports of its sandboxes (see `InstanceHost.sandboxes`)."""
        with self._lock:
            actors = [p.actor for p in self._processes]
        refs = [a.sandboxes.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0) if refs else ([], [])
        out = []
        for ref in ready:
            try:
                out.extend(ray.get(ref))
            except Exception:  # noqa: BLE001 - a process that died meanwhile
                pass
        return out

    def reset(self, close: bool = False) -> None:
        """End every host (the scheduler (re)started: hosts of its predecessor are
        unaccounted for; their instances' leases are released or expire). With
        `close`, the engine is stopping: start no host from now on."""
        with self._lock:
            self._closed = self._closed or close
            processes, self._processes, self._hosts = self._processes, [], {}
        _drain_and_kill(processes)
        if close and self._writer is not None:
            self._writer.close()

    def stats(self) -> dict:
        with self._lock:
            by_tenant: dict[str, int] = {}
            for host in self._hosts.values():
                by_tenant[host.key[0]] = by_tenant.get(host.key[0], 0) + 1
            return {
                "live_hosts": len(self._hosts),
                "host_processes": len(self._processes),
                "hosts_by_tenant": by_tenant,
                "cache_entries": len(self._cache),
                "loader_cache_size": self.config.loader_cache_size,
                **self._counters,
                "journal_writer": self._writer_stats(),
            }

    def _writer_stats(self) -> dict | None:
        """The machine's writer, when this loader serves it: its clients, messages and
        writes, and its commits (`group_commits`, `group_writes`) with their lock waits."""
        if self._writer is None:
            return None
        return {**self.journal.write_stats(), **self._writer.stats()}


#: Longest a host being deactivated gets to export its pending spans.
DRAIN_TIMEOUT = 3.0
#: Longest a restarted loader waits for the host processes it finds to describe themselves.
DESCRIBE_TIMEOUT = 10.0


def processes_per_node(nodes: list[dict], draining: set[str], is_sqlite: bool,
                       host_processes: int | None) -> dict[str, int]:
    """Plain host processes wanted per node that takes new hosts (alive, and not being
    drained: Ray drains a node that got SIGTERM, or that the autoscaler removes; its
    hosts keep running, but no new one goes there): `host_processes`, or by default a
    quarter of the node's CPUs, 2 to 4, on SQLite (its writers take turns on the file:
    on 16 cores 4 processes ran the most workflows and 16 half as many; on 2 cores, 2
    beat 1 and 4) and one per CPU, 2 to 16, on PostgreSQL (16 on 16 cores ran 1.7x
    what 8 did; more was not measured); one on a node with one CPU. Measured in docs/benchmarks.md.
    `nodes` as `ray.nodes()` lists them."""
    wanted = {}
    for node in nodes:
        if node.get("Alive") and node["NodeID"] not in draining:
            cpus = int(node.get("Resources", {}).get("CPU", 1))
            default = max(2, min(4, cpus // 4)) if is_sqlite else max(2, min(16, cpus))
            default = min(default, max(cpus, 1))
            wanted[node["NodeID"]] = host_processes or default
    return wanted


def machine_writer(config: EngineConfig, nodes: list[dict]) -> bool:
    """Whether the host processes of a SQLite journal send their writes to the machine's
    writer: `journal_writer`, or by default when the machine runs 4 host processes or
    more (the nodes of a SQLite journal share one machine). `nodes` as `ray.nodes()`."""
    if config.journal_writer is not None:
        return config.journal_writer == "machine"
    per_node = processes_per_node(nodes, set(), True, config.host_processes)
    return sum(per_node.values()) >= MACHINE_WRITER_FROM


#: Host processes on the machine from which a SQLite journal's writer per machine pays
#: by default (`journal_writer` None): docs/benchmarks.md.
MACHINE_WRITER_FROM = 4


def _draining_nodes() -> set[str]:
    """Ids of the nodes Ray is draining (GCS; Ray has no public call for it yet)."""
    try:
        from ray._private.state import state

        return set(state.get_draining_nodes())
    except Exception:  # noqa: BLE001 - unknown to this Ray, or the GCS did not answer
        log.debug("could not read Ray's draining nodes", exc_info=True)
        return set()


def _drain_and_kill(processes: list[_Process]) -> None:
    """End every host of these processes (spans flushed, bounded wait), then the processes."""
    refs = [p.actor.end.remote(h, DRAIN_TIMEOUT) for p in processes for h in p.hosts]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=DRAIN_TIMEOUT + 1)
    for process in processes:
        ray.kill(process.actor)
