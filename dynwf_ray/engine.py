"""`Engine`: what a platform starts: the journal, Ray, the loader and the scheduler actors.

```python
engine = Engine.start()                                  # local Ray + SQLite file
engine = Engine.start(database_url="postgresql+psycopg://...", ray_address="auto")
engine.push_tenant("acme", "tenants/acme")               # or engine.register("acme", cls)
inst = engine.binding("acme").create(params={...})
```
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import ray
from pydantic import ValidationError

from .binding import WorkflowBinding
from .config import EngineConfig
from .errors import (
    InstanceNotFoundError,
    InvalidInputError,
    InvalidStateError,
    JournalUnavailableError,
    ReplayDivergenceError,
    SandboxUnavailableError,
    invalid,
)
from .health import merge
from .journal import Journal
from .loader import Loader
from .package import package_class, pickled_modules, push
from .sandbox.policy import SandboxLimits, TenantPolicy
from .notify import Notifier, Router
from .scheduler import Scheduler
from .tracing import tenant_telemetry
from .types import Retention, validate_id

log = logging.getLogger("dynwf_ray.engine")


class Engine:
    """A running engine. Create it with `Engine.start(...)`, end it with `stop()`."""

    def __init__(
        self, config: EngineConfig, journal: Journal, loader: Any, scheduler: Any, owns_ray: bool
    ):
        self.config = config
        self.journal = journal
        self._loader = loader
        self._scheduler = scheduler
        self._owns_ray = owns_ray
        self._clock: Callable[[], float] = time.time
        self._notify = Notifier(Router(lambda: self._scheduler))
        self._health: tuple[float, dict] = (float("-inf"), {})  # (when fetched, health())

    @classmethod
    def start(cls, *, bindings: Mapping[str, Callable[[str], Any]] | None = None, **kwargs: Any) -> "Engine":
        """Start (or join) Ray, open the journal, start the scheduler. See `EngineConfig`.

        `bindings` are the platform's own objects tenant code may call, by name
        (`self.env["KV"].get("k")`): each value is a picklable factory called with a
        tenant id in the trusted host process, whose result's public methods the
        tenant's sandbox calls with JSON arguments (docs/security.md)."""
        try:
            config = EngineConfig(**kwargs)
        except ValidationError as exc:
            raise invalid("invalid engine configuration", exc) from None
        _check_sandbox(config.sandbox)
        # JournalUnavailableError / JournalSchemaError before Ray starts
        journal = Journal(config.database_url, create_tables=config.migrate)
        if not config.migrate:
            try:
                journal.check_schema()
            except Exception:
                journal.close()
                raise
        owns_ray = False
        if not ray.is_initialized():
            ray.init(
                address=config.ray_address,
                namespace=config.namespace,
                logging_level=logging.WARNING,
                include_dashboard=False if config.ray_address is None else None,
            )
            owns_ray = True
        lifetime: dict[str, Any] = {"lifetime": "detached"} if config.detached else {}
        if config.control_resources:
            lifetime["resources"] = dict(config.control_resources)
        loader = Loader.options(
            name=config.loader_name, namespace=config.namespace, get_if_exists=True, **lifetime
        ).remote(config.model_dump(), dict(bindings or {}))
        scheduler = Scheduler.options(
            name=config.scheduler_name, namespace=config.namespace, get_if_exists=True, **lifetime
        ).remote(config.model_dump())
        running = ray.get(scheduler.ping.remote())["config"]
        if running != config.model_dump():
            differs = sorted(k for k, v in config.model_dump().items() if running.get(k) != v)
            hint = ("; telemetry_env defaults to this process's OTEL_* variables: give every "
                    "process the same ones, or pass telemetry_env explicitly and identically"
                    if "telemetry_env" in differs else "")
            raise InvalidInputError(
                f"an engine named {config.name!r} already runs with a different "
                f"configuration ({', '.join(differs)}){hint}; start this one with the running "
                "engine's settings to join it, or with another name for an engine of its own"
            )
        return cls(config, journal, loader, scheduler, owns_ray)

    def register(self, tenant_id: str, workflow_cls: type) -> str:
        """Register a workflow class for a tenant directly; returns its code version."""
        validate_id(tenant_id, "tenant id")
        version, kind, blob = package_class(workflow_cls)
        self.journal.save_code(
            tenant_id, version, kind, blob, self._clock(),
            json.dumps({"modules": pickled_modules(blob)}),  # what its sandbox must import
        )
        return version

    def push_tenant(self, tenant_id: str, path: str) -> str:
        """Package a tenant's code directory, validate it in its runtime env, store it.

        Returns the code version (content-addressed: same content, same version);
        new instances of the tenant use it. Raises InvalidInputError, storing
        nothing, when the code does not import or has no WorkflowEntrypoint.
        """
        validate_id(tenant_id, "tenant id")
        return push(self.journal, tenant_id, path, self._clock(), self.config.sandbox)

    def versions(self, tenant_id: str) -> list[dict]:
        """The tenant's stored code versions, oldest first, and which one is the latest."""
        latest = self.journal.latest_version(tenant_id)
        return [
            {"version": v, "kind": kind, "created_at": at, "latest": v == latest}
            for v, kind, at in self.journal.list_versions(tenant_id)
        ]

    def binding(self, tenant_id: str, metadata: Mapping[str, Any] | None = None) -> WorkflowBinding:
        """The tenant's WORKFLOWS binding: it reaches only that tenant's instances."""
        return WorkflowBinding(
            self.journal, tenant_id, notify=self._notify, clock=self._clock, metadata=metadata,
            otel_env=self.config.telemetry_env, condition=self._condition,
            replay_check=self._replay_check,
        )

    def set_tenant_telemetry(
        self,
        tenant_id: str,
        *,
        endpoint: str | None = None,
        headers: Mapping[str, str] | None = None,
        service_name: str | None = None,
        resource_attributes: Mapping[str, str] | None = None,
        enabled: bool = True,
    ) -> None:
        """Route a tenant's spans: to its own OTLP/HTTP `endpoint` (with `headers`) under
        its own `service_name` (and `resource_attributes`), or nowhere (`enabled=False`). It overrides the platform's
        and the tenant's own settings; the tenant's hosts are replaced so that new ones
        use it (running activations finish first). See docs/observability.md."""
        validate_id(tenant_id, "tenant id")
        setting = tenant_telemetry(
            endpoint=endpoint, headers=dict(headers or {}), service_name=service_name,
            resource_attributes=dict(resource_attributes or {}), enabled=enabled,
        )
        self.journal.set_tenant_telemetry(tenant_id, setting.model_dump_json(), self._clock())
        ray.get(self._scheduler.retire.remote(tenant_id))

    def clear_tenant_telemetry(self, tenant_id: str) -> None:
        """Remove the platform's setting for a tenant (its own and the platform's apply)."""
        validate_id(tenant_id, "tenant id")
        self.journal.set_tenant_telemetry(tenant_id, None, self._clock())
        ray.get(self._scheduler.retire.remote(tenant_id))

    def set_tenant_policy(
        self,
        tenant_id: str,
        *,
        egress: Sequence[str] | None = None,
        limits: SandboxLimits | Mapping[str, Any] | None = None,
        paths: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        pip: bool = False,
        max_concurrency: int | None = None,
    ) -> TenantPolicy:
        """Grant a tenant's sandboxes more than nothing: outbound connections to
        `egress` ("host:port", through the egress proxy), resource `limits` other than
        the engine's defaults, extra filesystem `paths` ({path: "ro" | "rw"}), `pip`
        packages in its `dynwf.toml` (binary wheels from the package index), plain
        `env` values and `secrets` (both read as `self.env[name]`; secrets are redacted
        from logs, spans and errors), and at most `max_concurrency` of its activations
        at once (None: its fair share of `max_activations`). Replaces the tenant's
        previous policy; its hosts are replaced (those running finish first) so their
        next activations use it. Returns the policy with secrets masked. See
        docs/security.md."""
        validate_id(tenant_id, "tenant id")
        try:
            policy = TenantPolicy(
                egress=tuple(egress or ()), limits=limits, paths=dict(paths or {}),
                env=dict(env or {}), secrets=dict(secrets or {}), pip=pip,
                max_concurrency=max_concurrency,
            )
        except ValidationError as exc:
            raise invalid(f"tenant {tenant_id!r} policy", exc) from None
        self.journal.set_tenant_policy(tenant_id, policy.model_dump_json(), self._clock())
        ray.get(self._scheduler.retire.remote(tenant_id))
        return policy.masked()

    def set_retention(self, tenant_id: str, **rules: Any) -> Retention:
        """Keep a tenant's finished instances for its own time, per final status:
        `complete=`, `errored=`, `terminated=` (seconds, "30 days", a timedelta; None
        keeps them for good). Statuses not named follow the engine's `retention`.
        Returns the tenant's retention as it now applies."""
        validate_id(tenant_id, "tenant id")
        try:
            own = Retention(**rules)
        except ValidationError as exc:
            raise invalid(f"tenant {tenant_id!r} retention", exc) from None
        self.journal.set_retention(tenant_id, own.model_dump_json(exclude_unset=True), self._clock())
        return self.retention(tenant_id)

    def clear_retention(self, tenant_id: str) -> None:
        """The engine's retention applies to the tenant again."""
        validate_id(tenant_id, "tenant id")
        self.journal.set_retention(tenant_id, None, self._clock())

    def retention(self, tenant_id: str) -> Retention:
        """How long the tenant's finished instances are kept (its own rules over the engine's)."""
        validate_id(tenant_id, "tenant id")
        own = json.loads(self.journal.retention_rules().get(tenant_id, "{}"))
        return Retention(**{**self.config.retention.model_dump(), **own})

    def tenant_policy(self, tenant_id: str) -> TenantPolicy:
        """The tenant's policy, secrets masked (the defaults when the platform set none)."""
        validate_id(tenant_id, "tenant id")
        stored = self.journal.tenant_policy(tenant_id)
        return (TenantPolicy.model_validate_json(stored) if stored else TenantPolicy()).masked()

    def sandboxes(self) -> list[dict]:
        """Live hosts and their sandboxes: host pid, node id, tenant, version, and per sandbox its
        pid (as seen from the host's node), the instance it runs and its activations."""
        return ray.get(self._loader.sandboxes.remote())

    def stats(self) -> dict:
        """Live hosts and host processes, activations (cold/warm), instance counts by status, and the
        Prometheus endpoint's URL (`metrics_url`, None unless `metrics_port` is set)."""
        return {
            **ray.get(self._loader.stats.remote()),
            **ray.get(self._scheduler.stats.remote()),
            "instances": self.journal.count_by_status(),
        }

    def migrate(self, tenant_id: str, to: str, dry_run: bool = True) -> dict:
        """Replay-check every in-flight instance of the tenant that runs another version
        against version `to` (in a sandbox of `to`, running no step), and report
        {"version", "dry_run", "checked", "clean": [ids], "diverged": {id: why},
        "moved": [ids]}; without `dry_run`, move the clean ones (`moved`: those still
        in flight when moved)."""
        validate_id(tenant_id, "tenant id")
        if to not in {v for v, _, _ in self.journal.list_versions(tenant_id)}:
            raise InvalidStateError(f"tenant {tenant_id!r} has no code version {to!r}")
        infos = [i for i in self.journal.in_flight(tenant_id) if i.code_version != to]
        states = [self.journal.history(tenant_id, i.instance_id) for i in infos]
        results = ray.get(self._loader.check_replay.remote(tenant_id, to, states)) if states else []
        clean = [i.instance_id for i, why in zip(infos, results) if why is None]
        moved = []
        for instance_id in [] if dry_run else clean:
            try:
                self.journal.set_version(tenant_id, instance_id, to, self._clock())
                moved.append(instance_id)
            except (InvalidStateError, InstanceNotFoundError):
                pass  # it ended (or was deleted) since the check
        return {"version": to, "dry_run": dry_run, "checked": len(infos), "clean": clean,
                "diverged": {i.instance_id: why for i, why in zip(infos, results) if why},
                "moved": moved}

    def _replay_check(self, tenant_id: str, instance_id: str, version: str) -> None:
        state = self.journal.history(tenant_id, instance_id)
        (why,) = ray.get(self._loader.check_replay.remote(tenant_id, version, [state]))
        if why is not None:
            raise ReplayDivergenceError(why)

    def health(self) -> dict:
        """Whether the engine can make progress: {"ready": bool, "journal": {"ok", "cause",
        "detail", "since", "failures": {cause: count}}, "session": its epoch}. The journal
        part merges what every process of the engine saw of its journal writes (this one,
        the scheduler's heartbeat, the hosts'); "ready" is False while they fail or the
        scheduler does not answer (then "scheduler" says why)."""
        if not self.journal.health.ok:  # it failed here last: does it still?
            try:
                self.journal.probe()
            except JournalUnavailableError:
                pass
        own = self.journal.health.snapshot()
        try:
            engine = ray.get(self._scheduler.health.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - not answering is the answer
            return {"ready": False, "journal": own, "session": None,
                    "scheduler": f"not answering: {type(exc).__name__}: {exc}"}
        journal = merge([own, engine["journal"]])
        self._health = (time.monotonic(), journal)
        return {**engine, "ready": engine["ready"] and journal["ok"], "journal": journal}

    def _condition(self) -> str | None:
        """What keeps instances from going on (`status()["condition"]`), from `health()`
        at most a second old."""
        at, journal = self._health
        if time.monotonic() - at > 1.0:
            journal = self.health()["journal"]
        if journal["ok"]:
            return None
        return f"journal unavailable: {journal['cause']} ({journal['detail']})"

    def stop(self) -> None:
        """Stop the scheduler, the loader and its hosts; instances resume on the next start."""
        try:
            ray.get(self._scheduler.stop.remote(), timeout=60)
        finally:
            ray.kill(self._scheduler, no_restart=True)
            ray.kill(self._loader, no_restart=True)
            self.journal.close()
            if self._owns_ray:
                ray.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _check_sandbox(mode: str) -> None:
    """Strict sandboxing needs every kernel mechanism: refuse to start without one."""
    from .sandbox import jail

    missing = {k: v for k, v in jail.probe().items() if v is not None and k in jail.REQUIRED}
    if mode == "strict" and missing:
        raise SandboxUnavailableError(
            "tenant code cannot be sandboxed here; missing: "
            + "; ".join(f"{k}: {v}" for k, v in missing.items())
            + '. Start the engine with sandbox="process" to run tenant code in plain '
            "processes (no kernel isolation between tenants)"
        )
    if mode == "process":
        log.warning(
            "sandbox=\"process\": tenant code runs in separate processes with a clean "
            "environment and rlimits, but without kernel isolation (see docs/security.md)"
        )
