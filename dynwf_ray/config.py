"""`EngineConfig`: every knob of an engine, validated, with production defaults.

Values come from `Engine.start(**kwargs)`; the journal falls back to the
environment (`DYNWF_DATABASE_URL`, else a SQLite file under `$DYNWF_HOME`,
default `~/.dynwf/`). With no `ray_address`, `ray.init()` decides: it honours
`RAY_ADDRESS` and otherwise starts (or joins) a local Ray. Telemetry settings
default to the OTEL_* variables of the process that starts the engine.
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .sandbox.policy import SandboxLimits
from .tracing import otel_environ
from .types import Retention, validate_id


def default_database_url() -> str:
    url = os.environ.get("DYNWF_DATABASE_URL")
    if url:
        return url
    home = Path(os.environ.get("DYNWF_HOME", Path.home() / ".dynwf"))
    return f"sqlite:///{home / 'journal.db'}"


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: SQLAlchemy URL of the journal: sqlite:///path or postgresql+psycopg://...
    database_url: str = Field(default_factory=default_database_url)
    #: Upgrade the journal's schema at start (Alembic revisions, `dynwf_ray/migrations/`)
    #: when it is older than this code's. False: the platform runs `dynwf db upgrade`
    #: itself, and an engine refuses (JournalSchemaError) a journal not at this code's.
    migrate: bool = True
    #: Ray address to join ("auto", "ray://..."); None starts or reuses a local Ray.
    ray_address: str | None = None
    #: Name of this engine; its actors are "dynwf-scheduler-<name>" and "dynwf-loader-<name>".
    name: str = "default"
    #: Ray namespace the engine's named actors live in.
    namespace: str = "dynwf"
    #: Admission: about this many activations at once, shared fairly between tenants
    #: (`pool.py`). None: 8 per CPU of the Ray cluster (more only adds latency: the
    #: host processes are busy already, see docs/benchmarks.md).
    max_activations: int | None = Field(default=None, ge=1)
    #: Hosts alive at most (one or more per active code version, each with its sandbox
    #: template and sandboxes). None: 16 per CPU of the cluster, at most one per 256 MiB
    #: of its memory, at least 4.
    max_hosts: int | None = Field(default=None, ge=1)
    #: Activations one host runs at once at most (each in a sandbox of its own).
    host_concurrency: int = Field(default=32, ge=1)
    #: Host processes per node for code without pip packages (hosts of every tenant
    #: share them, and each shares one journal writer). None: a quarter of the node's
    #: CPUs on SQLite (2 to 4), one per CPU of the node on PostgreSQL (2 to 16);
    #: one on a node with one CPU.
    host_processes: int | None = Field(default=None, ge=1)
    #: Who commits the host processes' writes on SQLite. "machine": one writer for the
    #: machine (served by the loader; `journal.node_writer`) commits those of every
    #: host process, so a commit carries all of them; "process": each host process
    #: commits its own and they take turns on the file. None: "machine" where the
    #: machine runs 4 host processes or more, else "process" (a message each way per
    #: batch costs more than it saves with fewer: docs/benchmarks.md). PostgreSQL: each
    #: process, always.
    journal_writer: Literal["machine", "process"] | None = None
    #: Seconds a host whose code has had no work is kept warm before it is deactivated
    #: (its template and sandboxes ended).
    hibernate_after: float = Field(default=60.0, ge=0)
    #: Entries the loader's get(id, load) cache holds (least recently used evicted).
    loader_cache_size: int = Field(default=1024, ge=1)
    #: Lease length in seconds; the instances of a holder that stopped renewing are
    #: reclaimed after this (at once when its whole engine session is known to be gone:
    #: a crashed platform on this machine, see sessions.py).
    lease_ttl: float = Field(default=30.0, gt=0)
    #: Longest the scheduler and an idle host sleep between journal polls (they pick up
    #: work created by other processes, and timers).
    poll_interval: float = Field(default=1.0, gt=0)
    #: Consecutive activation crashes after which an instance is marked errored.
    max_activation_failures: int = Field(default=5, ge=1)
    #: Keep the scheduler alive after the driver exits (cluster deployments).
    detached: bool = False
    #: Ray custom resources the scheduler and the loader ask for (each), e.g.
    #: {"dynwf-control": 0.01}: they then run, and are restarted, only on nodes started
    #: with that resource (`ray start --resources`). Empty: any node.
    control_resources: dict[str, float] = Field(default_factory=dict)
    #: The platform's OpenTelemetry settings (standard OTEL_* variables) for every
    #: process that runs steps; tenants' own settings are layered on top (tracing.py).
    #: Tracing is off unless an exporter or OTLP endpoint is set.
    telemetry_env: dict[str, str] = Field(default_factory=otel_environ)
    #: How long finished instances are kept, by final status (complete, errored,
    #: terminated): seconds or a duration such as "7 days"; None keeps them for good
    #: (the default). Expired ones are deleted with their steps, events and logs by
    #: the scheduler's sweeper. A tenant may have its own (`Engine.set_retention`).
    retention: Retention = Field(default_factory=Retention)
    #: Log lines kept per instance (the newest); each line is at most 4096 characters.
    log_lines_per_instance: int = Field(default=1000, ge=1)
    #: Port of the scheduler's Prometheus endpoint (/metrics); 0 picks a free one,
    #: None serves none.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: Address the Prometheus endpoint listens on.
    metrics_host: str = "127.0.0.1"
    #: How tenant code is confined (docs/security.md). "strict": a jailed sandbox process
    #: (namespaces, Landlock, seccomp, cgroups, rlimits, no capabilities); the engine
    #: refuses to start where a mechanism is missing, and says which. "process": a
    #: separate process with a clean environment and rlimits only (e.g. macOS, old
    #: kernels); a warning says so at start.
    sandbox: Literal["strict", "process"] = "strict"
    #: Default resource limits of every tenant's sandboxes (a tenant's policy may
    #: override them: `Engine.set_tenant_policy`).
    sandbox_limits: SandboxLimits = Field(default_factory=SandboxLimits)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_id(v, "engine name")

    @property
    def scheduler_name(self) -> str:
        return f"dynwf-scheduler-{self.name}"

    @property
    def loader_name(self) -> str:
        return f"dynwf-loader-{self.name}"
