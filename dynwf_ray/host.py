"""Instance hosts: the trusted side of every activation, and the processes they live in.

An `InstanceHost` serves one (tenant, code version). It holds the journal and
Ray; tenant code never runs in it. Tenant code runs in *sandboxes*: jailed
processes forked from a template process the host starts once
(`sandbox/template.py`, `sandbox/jail.py`), each with its own scratch directory
and nothing of the platform. Each activation runs in a sandbox of its own
through a `SandboxSession` (`sandbox/supervisor.py`), which answers every step,
binding call and log line the sandbox sends and does the fenced journal
writes. A sandbox that went over a limit, broke the protocol or died is
replaced by a new fork (milliseconds); idle ones beyond one are ended after
`IDLE_SANDBOX_S`.

Hosts pull their work (`InstanceHost.serve`): while a host runs fewer
activations than the quota the scheduler set, it claims due instances of its
code in a batch and activates them concurrently; it renews the leases of all
its activations together every third of the lease TTL. Leases carry its owner
id, so if it dies the scheduler releases all of them at once.

When the journal cannot be written (disk full, unreachable, read-only), an
activation that meets it is abandoned (the tenant's code never sees the error)
and its instance is *blocked*: the host retries with backoff (`health.backoff`)
to release it, claims nothing meanwhile, and once the journal works the
instance runs again from its last recorded step.

A `HostProcess` is the Ray actor hosts live in: the loader keeps
`host_processes` per node for code without pip packages (hosts of every tenant
share them; by default 2 to 4 on SQLite, 2 to 16 on PostgreSQL), and one per pip
runtime env (where Ray put those packages). Its hosts share its journal
connection and so its group commit: one writer per process commits for all of
them; on SQLite they send those writes to the machine's writer instead, which
commits for every host process of the machine (`journal.node_writer`,
`journal_writer`). Callers on its machine wake its hosts with a datagram to its
wake socket (`wakeup.py`) rather than a Ray call.

Telemetry stays on this side: step spans are built here, the tenant's own
spans arrive from the sandbox as data, and both are exported with the
tenant's settings (`otel_env`, merged by the loader), so the tenant's backend
credentials never enter a sandbox. `drain` flushes them before the host is
deactivated.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import site
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray

from . import tracing, wakeup
from .activation import activate
from .journal import ActivationState, Journal
from .metrics import ActivityCounts
from .package import CODE_ROOT, PACKAGE, Manifest, unpack
from .sandbox.policy import JailSpec, SandboxLimits, TenantPolicy
from .errors import InvalidInputError, JournalUnavailableError, ReplayDivergenceError
from .health import backoff
from .replay_check import check_replay
from .sessions import running, this_process
from .sandbox.supervisor import BOOT_TIMEOUT, SandboxSession, TenantError
from .sandbox.template import Template
from .step import Abandon, Step
from .tracing import InstanceTrace
from .types import WorkflowEvent

log = logging.getLogger("dynwf_ray.host")

#: Port the egress forwarder listens on inside a sandbox's own network namespace.
EGRESS_PORT = 3128
#: Environment variables a sandbox gets besides its tenant's own (`dynwf.toml [env]`).
_BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


#: CPU seconds an idle sandbox may use in one second of watching before it is ended.
IDLE_CPU_SECONDS = 0.5
#: Seconds a sandbox may stay idle (beyond the one kept warm) before it is ended.
IDLE_SANDBOX_S = 30.0


def _cpu(session: SandboxSession) -> float:
    try:
        return session.sandbox.cpu_seconds()
    except Exception:  # noqa: BLE001 - gone already
        return 0.0


@dataclass(frozen=True)
class HostReport:
    """What a host tells the scheduler (`InstanceHost.report`, and when `serve` ends)."""

    outcomes: dict[str, int]  # activations ended since the last report, by outcome
    counts: ActivityCounts  # what they did (steps, retries, warm or cold, latencies)
    running: int  # activations in progress now
    writes: dict[str, float]  # journal writes of its process so far (`Journal.write_stats`)
    process: str  # its host process: "<node id>:<pid>"
    journal: dict[str, Any]  # its process's journal health (`JournalHealth.snapshot`)
    blocked: int  # instances whose activation a journal fault interrupted, not yet released
    wakes: dict[str, int]  # wakes of its process's hosts by datagram so far (`wakeup.STATS`)


def _tenant_env(manifest: Manifest) -> dict[str, str]:
    """A sandbox's whole environment: a minimal base and the tenant's own `[env]`, less
    OTEL_* (its tracing settings are read here, on the trusted side, where spans are
    exported: its backend credentials never enter the sandbox)."""
    return {**_BASE_ENV, **{k: v for k, v in manifest.env.items() if not k.startswith("OTEL_")}}


def check_entrypoint(version: str, blob: bytes, manifest: dict[str, Any], mode: str) -> str:
    """Import a pushed tenant's entrypoint in a sandbox and resolve it to module:Class.

    Runs as a Ray task in the tenant's runtime env (its pip packages are on this
    node), before anything is stored. Raises InvalidInputError naming what is
    wrong: tenant code, even its import, never runs outside a sandbox.
    """
    from .sandbox import protocol

    manifest_ = Manifest(**manifest)
    code_dir = unpack(version, blob)
    template, close_template = _start_template(
        python=sys.executable, sys_path=_runtime_sys_path(), env=dict(_BASE_ENV), cwd="/",
        preload=["dynwf_ray.sandbox.runtime"], mode=mode,
        code_path=code_dir, sandbox_env=_tenant_env(manifest_),
    )
    scratch = tempfile.mkdtemp(prefix="dynwf-validate-")
    try:
        spec = JailSpec(mode=mode, read_only=(code_dir,), read_write=(scratch,))
        sandbox = template.spawn(
            spec, "dynwf_ray.sandbox.runtime:validate", {"entrypoint": manifest_.entrypoint}
        )
        sandbox.sock.settimeout(BOOT_TIMEOUT)
        try:
            reply = protocol.recv(sandbox.sock, protocol.MAX_SANDBOX_FRAME)
        except (OSError, protocol.ProtocolError) as exc:
            reply = {"op": "boot_error", "name": type(exc).__name__, "message": str(exc)}
        if reply is None:
            reply = {"op": "boot_error", "name": "SandboxError",
                     "message": f"the sandbox ended ({sandbox.exit_reason() or 'no answer'})"}
        if reply.get("op") == "ready" and isinstance(reply.get("entrypoint"), str):
            return reply["entrypoint"]
        if reply.get("name") == "InvalidInputError":
            raise InvalidInputError(str(reply.get("message")))
        raise InvalidInputError(f"{reply.get('name')}: {reply.get('message')}")
    finally:
        close_template()
        shutil.rmtree(scratch, ignore_errors=True)


def _start_template(**options: Any) -> tuple[Template, Callable[[], None]]:
    """Start the template from a thread of its own, which waits until the template is
    closed: the template ends when the thread that started it does (PR_SET_PDEATHSIG
    follows the thread). Returns the template and the function that closes it."""
    box: dict[str, Any] = {}
    started, closed = threading.Event(), threading.Event()

    def own() -> None:
        try:
            box["template"] = Template.start(**options)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc
        started.set()
        closed.wait()

    def close() -> None:
        try:
            box["template"].close()
        finally:
            closed.set()

    threading.Thread(target=own, name="dynwf-template", daemon=True).start()
    started.wait()
    if "error" in box:
        closed.set()
        raise box["error"]
    return box["template"], close


def _runtime_sys_path() -> list[str]:
    """The import path a sandbox gets besides its code: this process's entries that lie
    in the Python runtime or its environment (the stdlib, site-packages, a pip runtime
    env's virtualenv), and nothing else. Ray puts the driver's working directory on
    every worker's path; that is the platform's own, and stays out."""
    prefixes = {os.path.abspath(p) for p in (
        sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
    )}
    prefixes.update(os.path.abspath(p) for p in site.getsitepackages())

    def inside(entry: str) -> bool:
        entry = os.path.abspath(entry)
        return any(entry == p or entry.startswith(p.rstrip("/") + "/") for p in prefixes)

    return [p for p in sys.path if p and os.path.exists(p) and inside(p)]


def _code_location(version: str, kind: str, blob: bytes, manifest_json: str) -> tuple[str, list[str]]:
    """(the directory a sandbox imports the code from, the paths it must read for it).

    A package is unpacked from the journal's zip. A registered class is pickled by
    reference to modules (recorded at `register`): for each that is not part of the
    Python environment, the sandbox gets a link to its top-level package (or file) in
    a directory of its own, so it can import it without reading what lies beside it."""
    if kind == PACKAGE:
        code_dir = unpack(version, blob)
        return code_dir, [code_dir]
    runtime = _runtime_sys_path()
    targets = []
    for module in json.loads(manifest_json or "{}").get("modules", []):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            continue
        target = spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin
        if not any(target.startswith(p.rstrip("/") + "/") for p in runtime):
            targets.append(target)  # not part of the environment: link it
    # The same pickle may find its modules elsewhere in another checkout or node: the
    # directory is named after where the links lead, not only after the version.
    where = hashlib.sha256("\0".join(targets).encode()).hexdigest()[:16]
    shims = os.path.join(CODE_ROOT, f"{version}-imports-{where}")
    os.makedirs(shims, exist_ok=True)
    for target in targets:
        try:
            os.symlink(target, os.path.join(shims, os.path.basename(target)))
        except FileExistsError:  # made by another host of this version
            pass
    return shims, [shims, *targets]


class _Sandboxes:
    """The host's sandboxes: a `Runner` (see activation.py) that runs each activation
    in a warm sandbox, forking a new one when there is none."""

    def __init__(
        self, tenant_id: str, version: str, kind: str, blob: bytes, manifest_json: str,
        mode: str, limits: SandboxLimits, policy: TenantPolicy, bindings: dict[str, Any],
        tracing_: Any, max_crashes: int,
    ):
        manifest = Manifest(**json.loads(manifest_json)) if kind == PACKAGE else Manifest()
        self._tenant_id = tenant_id
        self._limits = policy.limits or limits
        self._policy = policy
        self._bindings = bindings
        self._tracing = tracing_
        self._max_crashes = max_crashes
        self._code_dir, readable = _code_location(version, kind, blob, manifest_json)
        self._boot: dict[str, Any] = (
            {"entrypoint": manifest.entrypoint} if kind == PACKAGE
            else {"pickled_class": base64.b64encode(blob).decode()}
        )
        env = _tenant_env(manifest)
        self._egress = None
        if policy.egress:
            from .sandbox.egress import EgressProxy, proxy_env

            self._egress = EgressProxy(policy.egress)
            env.update(proxy_env(EGRESS_PORT))
            self._boot["egress_port"] = EGRESS_PORT
        self._spec = dict(
            mode=mode,
            read_only=(*readable, *(p for p, m in policy.paths.items() if m == "ro")),
            limits=self._limits,
            egress_port=EGRESS_PORT if policy.egress else None,
        )
        self._rw_paths = tuple(p for p, m in policy.paths.items() if m == "rw")
        self.template, self._close_template = _start_template(
            python=sys.executable,
            sys_path=_runtime_sys_path(),
            env=dict(_BASE_ENV),  # the template's own: the tenant's is its sandboxes' only
            cwd="/",
            preload=["dynwf_ray.sandbox.runtime", "opentelemetry.sdk.trace"],
            mode=mode,
            code_path=self._code_dir,
            sandbox_env=env,
        )
        # Idle sandboxes: (session, scratch dir, its CPU time when last looked at (None
        # until the watcher first does: not read on the hot path), since when idle)
        self._idle: list[tuple[SandboxSession, str, float | None, float]] = []
        self._watching = False
        self._closed = False
        self.live: dict[int, dict[str, Any]] = {}  # pid -> what it runs (engine.sandboxes())
        self.started = 0

    async def _session(self) -> tuple[SandboxSession, str]:
        if not self._watching:
            self._watching = True
            asyncio.ensure_future(self._watch_idle())
        while self._idle:
            session, scratch, _, _ = self._idle.pop()
            if session.healthy:
                return session, scratch
            self._ended(session, scratch)
        scratch = tempfile.mkdtemp(prefix=f"dynwf-sandbox-{self._tenant_id}-{_SCRATCH_OWNER}-")
        spec = JailSpec(read_write=(scratch, *self._rw_paths), **self._spec)
        try:
            sandbox = self.template.spawn(
                spec, "dynwf_ray.sandbox.runtime:serve", self._boot, extra=1 if self._egress else 0
            )
        except Exception as exc:  # noqa: BLE001 - the platform's fault, never the tenant's
            shutil.rmtree(scratch, ignore_errors=True)
            raise Abandon(f"no sandbox could be started: {exc}") from None
        if self._egress is not None:
            self._egress.attach(sandbox.extra[0], self._tenant_id)
        self.started += 1
        session = SandboxSession(
            sandbox, tenant_id=self._tenant_id, limits=self._limits, bindings=self._bindings,
            values=self._policy.env, secrets=self._policy.secrets, tracing=self._tracing,
        )
        self.live[sandbox.pid] = {"pid": sandbox.pid, "instance": None, "activations": 0}
        try:
            await session.start()
        except BaseException:
            self._ended(session, scratch)
            raise
        return session, scratch

    def _ended(self, session: SandboxSession, scratch: str) -> None:
        session.close()
        self.live.pop(session.sandbox.pid, None)
        shutil.rmtree(scratch, ignore_errors=True)

    async def run(
        self, state: ActivationState, event: WorkflowEvent, step: Step, trace: InstanceTrace | None
    ) -> Any:
        session, scratch = await self._session()
        entry = self.live.get(session.sandbox.pid, {})
        entry.update(instance=state.info.instance_id, activations=entry.get("activations", 0) + 1)
        try:
            output = await session.run(state, event, step, trace)
        except Abandon as abandon:
            crashes = state.crashes + 1  # counted in the journal when the activation ends
            if crashes >= self._max_crashes:
                raise TenantError(
                    "SandboxCrashedError",
                    f"its sandbox ended {crashes} times in a row; last: {abandon.reason}",
                ) from None
            raise
        else:
            return output
        finally:
            entry["instance"] = None
            if session.healthy:
                self._idle.append((session, scratch, None, time.monotonic()))
            else:
                self._ended(session, scratch)

    async def _watch_idle(self) -> None:
        """An idle sandbox has nothing to compute: one that burns CPU between activations
        (a thread its tenant left running) is ended."""
        while not self._closed:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for i, (session, scratch, mark, since) in reversed(list(enumerate(self._idle))):
                used = _cpu(session)
                if mark is not None and used - mark > IDLE_CPU_SECONDS:
                    log.warning("ending an idle sandbox of tenant %s that kept computing", self._tenant_id)
                    del self._idle[i]
                    self._ended(session, scratch)
                else:
                    self._idle[i] = (session, scratch, used, since)
            # Fewer activations at once than before: end sandboxes idle for a while
            # (the most recently used stay; one always does).
            while len(self._idle) > 1 and now - self._idle[0][3] > IDLE_SANDBOX_S:
                session, scratch, _, _ = self._idle.pop(0)
                self._ended(session, scratch)

    def close(self) -> None:
        self._closed = True
        for session, scratch, _, _ in self._idle:
            self._ended(session, scratch)
        self._idle.clear()
        self._close_template()
        if self._egress is not None:
            self._egress.close()


@dataclass
class HostSpec:
    """What a host of one (tenant, code version) is started with (the loader builds it)."""

    tenant_id: str
    version: str
    kind: str
    blob: bytes
    manifest_json: str
    lease_ttl: float
    owner: str  # its lease owner id
    poll_interval: float = 1.0
    binding_factory: Callable[[Journal], Any] | None = None  # the tenant's WORKFLOWS
    otel_env: dict[str, str] | None = None
    keep_logs: int = 1000
    sandbox: dict[str, Any] | None = None  # mode, limits, policy, max_crashes, bindings


#: Sandbox scratch directories name the process that made them ("p<pid>.<start time>"):
#: those of a host process that died without removing them (a crash) are found by it.
_SCRATCH_OWNER = "p{}.{}".format(*this_process()[1:])
_SCRATCH_NAME = re.compile(r"^dynwf-sandbox-.+-p(\d+)\.(\d+)-[^-]+$")


def sweep_scratch(directory: str | None = None) -> list[str]:
    """Remove the sandbox scratch directories that host processes no longer running left
    behind (a platform that crashed leaves its sandboxes' directories); returns them."""
    swept = []
    with os.scandir(directory or tempfile.gettempdir()) as entries:
        for entry in entries:
            match = _SCRATCH_NAME.match(entry.name)
            if match and entry.is_dir() and not running(int(match[1]), int(match[2])):
                shutil.rmtree(entry.path, ignore_errors=True)
                swept.append(entry.path)
    return swept


#: Seconds between a host process's looks at its loader. At the first look that finds
#: it gone for good, its hosts stop claiming work; at the second, the process ends.
LOADER_CHECK_S = 1.0
LOADER_GONE_AFTER = 2


@ray.remote(num_cpus=0)
class HostProcess:
    """A trusted process in which hosts live: the Ray actor the loader starts
    (`host_processes` per node; one per runtime env with pip packages). Its hosts share
    its journal connection, hence its group commit: one writer per process commits
    for all of them (on SQLite, with `machine_writer`, the machine's writer does).
    The scheduler addresses each host by its id.

    It is a named, detached actor, so it outlives a loader that Ray restarts (the
    restarted loader finds it by name: `describe`) and its hosts' activations go on.
    It watches its loader (by name and actor id) and ends itself once the loader is
    gone for good: its engine stopped, or the driver that owned the engine died."""

    def __init__(self, database_url: str, loader: tuple[str, str, str] | None = None,
                 env: str | None = None, scheduler: tuple[str, str] | None = None,
                 machine_writer: bool = False):
        self._journal = Journal(database_url, create_tables=False)
        if machine_writer:  # on SQLite: the loader's writer commits for this process
            self._journal.write_through_node_writer()
        self._hosts: dict[int, InstanceHost] = {}
        self._adding: dict[int, asyncio.Future] = {}
        self._loader = loader  # (name, namespace, actor id) of the loader that owns it
        self._env = env  # its pip runtime env (JSON), for a restarted loader
        self._scheduler = scheduler  # (name, namespace): where wakes for no host here go
        self._scheduler_handle: Any = None
        self._watching = False
        self._listener: wakeup.WakeListener | None = None
        sweep_scratch()
        # What this process holds now (Ray's worker, the platform's modules, the
        # journal) lives as long as the process: the collector's full passes skip it.
        # Each such pass over those objects held the event loop, and every activation on
        # it, for about 60 ms; over what is left, about 2 ms (docs/benchmarks.md).
        gc.freeze()

    async def add(self, host_id: int, spec: HostSpec) -> str:
        """Start a host (its sandbox template) here; off the loop, which other hosts use.
        Returns the id of the node it runs on. A second call for the same host (Ray
        retried the loader's call after restarting it) starts nothing more."""
        self._watch_loader()
        self._listen()
        if host_id not in self._hosts:
            adding = self._adding.get(host_id)
            if adding is None:
                adding = self._adding[host_id] = asyncio.ensure_future(asyncio.to_thread(
                    InstanceHost, self._journal, spec,
                    lambda: self._tell_scheduler("short_of_slots", host_id)))
                adding.add_done_callback(lambda _: self._adding.pop(host_id, None))
            self._hosts.setdefault(host_id, await asyncio.shield(adding))
        return ray.get_runtime_context().get_node_id()

    async def describe(self) -> dict[str, Any]:
        """What a restarted loader needs: {"node_id", "pid", "env", "loader_id",
        "hosts": [[host id, tenant, version], ...]}, hosts being added included; and
        "wakes", its `wakeup.STATS`."""
        await asyncio.gather(*list(self._adding.values()), return_exceptions=True)
        return {
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "env": self._env, "loader_id": self._loader[2] if self._loader else None,
            "hosts": [[i, *h.code] for i, h in self._hosts.items()],
            "wakes": dict(wakeup.STATS),
        }

    def _listen(self) -> None:
        """Take wakes by datagram from callers on this machine (`wakeup`)."""
        if self._listener is None:
            self._listener = wakeup.WakeListener(
                ray.get_runtime_context().get_actor_id(), self._wake_host, self._forward)
            self._listener.start(asyncio.get_running_loop())

    def _wake_host(self, host_id: int) -> bool:
        host = self._hosts.get(host_id)
        return host is not None and host.wake()

    def _forward(self, tenant_id: str, version: str) -> None:
        """A wake for a host this process does not (any more) run: the scheduler's."""
        self._tell_scheduler("notify", tenant_id, version)

    def _tell_scheduler(self, method: str, *args: Any) -> None:
        """Call the scheduler's `method` without waiting (a wake passed on, or a host
        short of slots); lost when no scheduler runs: its next tick sees the work."""
        if self._scheduler is None:
            return
        if self._scheduler_handle is not None:
            getattr(self._scheduler_handle, method).remote(*args)
            return

        def find_and_call() -> None:  # a GCS lookup: off the loop
            name, namespace = self._scheduler
            try:
                self._scheduler_handle = ray.get_actor(name, namespace=namespace)
                getattr(self._scheduler_handle, method).remote(*args)
            except Exception:  # noqa: BLE001 - none runs now: its next tick finds the work
                log.debug("no scheduler to tell %s", method, exc_info=True)
        asyncio.get_running_loop().run_in_executor(None, find_and_call)

    def _watch_loader(self) -> None:
        if not self._watching and self._loader is not None:
            self._watching = True
            asyncio.get_running_loop().create_task(self._watch_forever())

    async def _watch_forever(self) -> None:
        name, namespace, actor_id = self._loader
        missing = 0
        while True:
            await asyncio.sleep(LOADER_CHECK_S)
            try:
                found = await asyncio.to_thread(ray.get_actor, name, namespace=namespace)
                missing = 0 if found._actor_id.hex() == actor_id else missing + 1
            except ValueError:  # no such actor: killed for good (a restarting one is found)
                missing += 1
            except Exception:  # noqa: BLE001 - the GCS cannot say now: look again
                continue
            if missing:
                for host in list(self._hosts.values()):
                    await host.stop()
            if missing >= LOADER_GONE_AFTER:
                log.warning("the loader of this host process is gone (its engine stopped or "
                            "its driver died): ending %d host(s) and this process", len(self._hosts))
                for host_id in list(self._hosts):
                    await self.end(host_id, 1.0)
                if self._listener is not None:
                    self._listener.close()
                os._exit(0)

    async def serve(self, host_id: int) -> HostReport:
        return await self._hosts[host_id].serve()

    async def set_quota(self, host_id: int, slots: int) -> None:
        if host_id in self._hosts:
            await self._hosts[host_id].set_quota(slots)

    async def wake(self, host_id: int) -> bool:
        """Work of the host's code may be due; False if this process has no such host
        (any more), or it takes no more work."""
        host = self._hosts.get(host_id)
        return host is not None and host.wake()

    async def stop(self, host_id: int) -> None:
        if host_id in self._hosts:
            await self._hosts[host_id].stop()

    async def report(self, host_id: int) -> HostReport | None:
        host = self._hosts.get(host_id)
        return await host.report() if host is not None else None

    async def end(self, host_id: int, timeout_s: float = 5.0) -> None:
        """Deactivate a host: end its sandboxes and template, export its pending spans."""
        host = self._hosts.pop(host_id, None)
        if host is not None:
            await host.stop()
            await host.drain(timeout_s)

    async def pid(self) -> int:
        return os.getpid()

    async def sandboxes(self) -> list[dict[str, Any]]:
        return [await h.sandboxes() for h in list(self._hosts.values())]

    async def check(self, host_id: int, states: list[ActivationState]) -> list[str | None]:
        """Replay-check instances on this host's code (`replay_check.py`)."""
        return await self._hosts[host_id].check(states)


class InstanceHost:
    """One (tenant, code version) in a host process: see the module docstring. The
    scheduler calls `serve` (it returns when the host has stopped; a restarted
    scheduler calls it again to adopt the host), `set_quota`, `wake`, `stop` and
    `report`, through its `HostProcess`."""

    def __init__(self, journal: Journal, spec: HostSpec,
                 short_of_slots: Callable[[], None] | None = None):
        tenant_id, version = spec.tenant_id, spec.version
        # Told once per quota when a wake finds every slot taken (see `wake`).
        self._short_of_slots = short_of_slots
        self._said_short = False
        sandbox = spec.sandbox or {}
        self._journal = journal
        self._tracing = tracing.tracing_for(spec.otel_env or {}, tenant_id, version)
        self._keep_logs = spec.keep_logs
        self._activations = 0
        self.code = (tenant_id, version)  # (tenant, code version)
        self._lease_ttl = spec.lease_ttl
        self._owner = spec.owner
        self._poll = spec.poll_interval
        self._quota = 0
        self._stopping = False
        self._running: dict[int, int] = {}  # pk -> lease token of the activations in progress
        self._blocked: dict[int, int] = {}  # pk -> token of activations a journal fault ended
        self._ending: set[int] = set()  # pks of activations whose last write is committing
        self._faults = 0  # journal faults in a row (the backoff grows with them)
        self._retry_at = 0.0  # monotonic time before which no journal work is tried again
        self._wake: asyncio.Event | None = None
        self._serving: asyncio.Future | None = None
        self._counts = ActivityCounts()
        self._outcomes: dict[str, int] = {}
        bindings = {name: make(tenant_id) for name, make in (sandbox.get("bindings") or {}).items()}
        if spec.binding_factory is not None:
            bindings["WORKFLOWS"] = spec.binding_factory(self._journal)
        self._sandboxes = _Sandboxes(
            tenant_id, version, spec.kind, spec.blob, spec.manifest_json,
            mode=sandbox.get("mode", "strict"),
            limits=SandboxLimits(**sandbox.get("limits", {})),
            policy=TenantPolicy(**sandbox.get("policy", {})),
            bindings=bindings, tracing_=self._tracing,
            max_crashes=sandbox.get("max_crashes", 5),
        )

    async def serve(self) -> HostReport:
        """Claim due instances of this code and activate them, up to the quota at once,
        until `stop`; then finish the activations in progress and return a last report.

        Claims are batched (all free slots in one claim), leases of the activations in
        progress are renewed together every third of the lease TTL, and all of it goes
        through the journal's group commit with the activations' own writes. A slot is
        free once its activation's last write is queued (`_free_slot`), so the next
        claim can share that write's commit.

        Serving runs once: a later call (a restarted scheduler adopting this host, its
        predecessor's call gone with it) waits for the same serving to end.
        """
        if self._serving is None:
            self._serving = asyncio.ensure_future(self._serve())
        return await asyncio.shield(self._serving)

    async def _serve(self) -> HostReport:
        self._wake = asyncio.Event()
        journal, (tenant_id, version) = self._journal.grouped, self.code
        renew_every = self._lease_ttl / 3
        next_renewal = time.monotonic() + renew_every
        while not (self._stopping and not self._running and not self._blocked and not self._ending):
            self._wake.clear()
            free = 0 if self._stopping else self._quota - len(self._running) - len(self._blocked)
            claims = []
            if time.monotonic() >= self._retry_at:
                try:
                    if self._blocked:
                        await self._release_blocked()
                        free = 0 if self._stopping else self._quota - len(self._running)
                    if free > 0:
                        claims = await journal.claim_and_load(
                            time.time(), free, self._owner, self._lease_ttl, tenant_id, version
                        )
                    self._faults = 0
                except JournalUnavailableError:
                    self._journal_fault()
                for state in claims:
                    pk, token = state.info.pk, state.info.lease_token
                    self._running[pk] = token
                    asyncio.ensure_future(self._activate_one(pk, token, state))
            if self._running and time.monotonic() >= next_renewal:
                try:
                    await journal.renew_leases(
                        list(self._running.items()), time.time(), self._lease_ttl
                    )
                except JournalUnavailableError:
                    pass  # its health says so; the activations find out on their next write
                except Exception:  # noqa: BLE001 - keep going through a DB hiccup
                    log.exception("lease renewal failed")
                next_renewal = time.monotonic() + renew_every
            if free > 0 and claims and len(claims) == free:
                continue  # every free slot taken: more may be due
            timeout = renew_every if self._running else self._poll
            if self._retry_at > time.monotonic():
                timeout = min(timeout, self._retry_at - time.monotonic())
            elif free > len(claims):
                if claims:  # let the new activations start before this read blocks the loop
                    await asyncio.sleep(0)
                try:
                    due = self._journal.next_wake_at(tenant_id, version)
                except JournalUnavailableError:
                    due = None
                if due is not None:
                    timeout = min(timeout, max(0.0, due - time.time()))
            if timeout > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
        return await self.report()

    async def set_quota(self, slots: int) -> None:
        """Run up to `slots` activations at once (fewer: those running finish)."""
        self._quota, self._said_short = slots, False
        if self._wake is not None:
            self._wake.set()

    def wake(self) -> bool:
        """Work of this code may be due: look now. False once stopped (it takes no
        more work). A wake that finds every slot of the quota taken tells the scheduler
        (once per quota), which shares capacity again at once when it could give more:
        a quota set while the version was quiet would otherwise hold until its next tick."""
        if self._wake is not None:
            self._wake.set()
        if (self._short_of_slots is not None and not self._said_short and not self._stopping
                and len(self._running) + len(self._blocked) >= self._quota > 0):
            self._said_short = True
            self._short_of_slots()
        return not self._stopping

    async def stop(self) -> None:
        """Take no more work; `serve` returns once the activations in progress end."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()

    async def report(self) -> HostReport:
        """What this host did since its last report."""
        counts, self._counts = self._counts, ActivityCounts()
        outcomes, self._outcomes = self._outcomes, {}
        return HostReport(
            outcomes, counts, len(self._running) + len(self._ending), self._journal.write_stats(),
            f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}",
            self._journal.health.snapshot(), len(self._blocked), dict(wakeup.STATS),
        )

    async def _activate_one(self, pk: int, token: int, state: ActivationState) -> None:
        self._activations += 1
        blocked = False
        try:
            outcome = await activate(
                self._journal, pk, token, self._sandboxes,
                lease_ttl=self._lease_ttl, tracing=self._tracing, capture_logs=True,
                keep_logs=self._keep_logs, counts=self._counts, warm=self._activations > 1,
                state=state, ending=lambda: self._free_slot(pk),
            )
            blocked = outcome == "journal_unavailable"
        except Exception:  # noqa: BLE001 - a fault of the platform, never the tenant's
            log.exception("activation of instance pk=%s failed", pk)
            outcome, blocked = "crashed", True
        finally:
            self._running.pop(pk, None)
            self._ending.discard(pk)
            if self._wake is not None:
                self._wake.set()
        if blocked:  # released after a backoff
            self._blocked[pk] = token
            self._journal_fault()
        self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1

    def _free_slot(self, pk: int) -> None:
        """The activation's run is over and its last write queued: its slot may serve
        the next claim, which can then share that write's commit."""
        if self._running.pop(pk, None) is not None:
            self._ending.add(pk)
            if self._wake is not None:
                self._wake.set()

    def _journal_fault(self) -> None:
        """The journal failed: try again after a backoff that grows with each fault."""
        self._faults += 1
        self._retry_at = time.monotonic() + backoff(self._faults)

    async def _release_blocked(self) -> None:
        """Give up the leases of activations a journal fault ended, so that their
        instances run again now (here or on another host). A lease lost meanwhile is
        someone else's business."""
        now = time.time()
        for pk, token in list(self._blocked.items()):
            await self._journal.grouped.release(pk, token, now, now)
            self._blocked.pop(pk, None)

    async def check(self, states: list[ActivationState]) -> list[str | None]:
        """Whether each instance's history replays on this host's code: None, or why not
        (a `ReplayDivergenceError`'s message). One at a time, each in a sandbox."""
        results: list[str | None] = []
        for state in states:
            try:
                await check_replay(state, self.code[1], self._sandboxes)
                results.append(None)
            except ReplayDivergenceError as exc:
                results.append(str(exc))
        return results

    async def drain(self, timeout_s: float = 5.0) -> None:
        """End the sandboxes and export pending spans (before the host is deactivated)."""
        self._sandboxes.close()
        if self._tracing is not None:
            await asyncio.to_thread(self._tracing.flush, timeout_s)

    async def sandboxes(self) -> dict[str, Any]:
        """This host's live sandboxes: {"host_pid" (of its process), "node_id", "tenant",
        "version", "template_pid", "started", "sandboxes": [...]}."""
        return {
            "host_pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
            "tenant": self.code[0], "version": self.code[1],
            "template_pid": self._sandboxes.template.pid, "started": self._sandboxes.started,
            "sandboxes": [dict(v) for v in self._sandboxes.live.values()],
        }
