"""The journal: every durable fact about tenants, code and instances. The only module that talks SQL.

Tables (SQLModel):
- `tenants`: one row per tenant with its latest code version.
- `code_blobs`: tenant code, content-addressed (version = hash), stored once.
- `code_versions`: which tenant has which version (a tenant runs only its own).
- `instances`: one row per workflow instance. It holds the envelope
  (`metadata_json` for routing, `params_json` for the tenant), the status the
  API reports, the output or error, and the scheduling state: `wake_at` is the
  instance's one timer (when it must be activated next: now for queued work, a
  sleep's end, a wait's deadline; NULL when nothing is due), `waiting_for` the
  event type a suspended wait expects, and the lease (`lease_token`, a fencing
  token bumped on every claim, and `lease_expires_at`).
- `steps`: one row per (instance, step name, occurrence count) with status,
  JSON result or error, attempts and timings. Replay reads these.
- `events`: the inbox, buffered per (instance, type), consumed FIFO.
- `logs`: what tenant code printed or logged, per instance and step, with
  trace and span ids; only the newest lines of each instance are kept.
- `tenant_retention`: a tenant's own rules for how long its finished instances
  are kept (the engine's `retention` applies otherwise); `sweep` deletes expired
  instances with their steps, events and logs, a bounded batch per transaction.
- `engine_sessions`: one row per scheduler incarnation, numbered by its `epoch`,
  with its heartbeat and the processes it ran in. Leases are owned by
  `e<epoch>/<holder>`, so a session found gone (`sessions.py`) gives up its
  leases at once (`end_session`) instead of letting them expire.

Each instance also carries its trace identity (`trace_context`: its root
span's W3C traceparent; `trace_caller`: the span that created it), and each
tenant the platform's telemetry setting for it (`telemetry_json`).

Concurrency rule: every transaction that touches an instance starts by
updating that instance's row. That single statement does the fencing (it only
matches while `lease_token` is the caller's), renews the lease, and on
PostgreSQL locks the row so `send_event` and a suspending wait cannot miss each
other. On SQLite every write transaction is `BEGIN IMMEDIATE` in WAL mode with
`synchronous=FULL`: one fsync'd commit per step.

Faults: a database error that says the journal cannot be used now (disk full,
unreachable, read-only, a lock or serialization conflict) is raised as
`JournalUnavailableError` naming its cause, never as the driver's exception; a
transaction that fails leaves nothing written. Each journal's `health`
(`health.py`) follows its writes.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from sqlalchemy import (
    Index,
    Integer,
    bindparam,
    LargeBinary,
    UniqueConstraint,
    and_,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine as SAEngine
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import IntegrityError
from sqlmodel import Column, Field, SQLModel

from .errors import (
    DuplicateInstanceError,
    InstanceNotFoundError,
    InvalidInputError,
    InvalidStateError,
    JournalSchemaError,
    JournalUnavailableError,
)
from . import migrations
from .health import JournalHealth
from .types import LogLine

TERMINAL = ("complete", "errored", "terminated")

# Step row statuses.
STEP_COMPLETE = "complete"  # result_json holds the result (a sleep stores its wake time)
STEP_FAILED = "failed"  # retries used up / non-retryable: replay raises the error again
STEP_RETRYING = "retrying"  # attempts failed so far; next attempt at next_attempt_at
STEP_WAITING = "waiting"  # wait_for_event reached; result_json holds the deadline


class TenantRow(SQLModel, table=True):
    __tablename__ = "tenants"
    tenant_id: str = Field(primary_key=True, max_length=100)
    latest_version: str | None = None
    telemetry_json: str | None = None  # the platform's TenantTelemetry for this tenant
    updated_at: float = 0.0


class TenantPolicyRow(SQLModel, table=True):
    """What the platform grants a tenant's sandboxes (`TenantPolicy` as JSON). A table of
    its own, so journals from before it existed need no new column."""

    __tablename__ = "tenant_policies"
    tenant_id: str = Field(primary_key=True, max_length=100)
    policy_json: str
    updated_at: float = 0.0


class RetentionRow(SQLModel, table=True):
    """A tenant's own retention rules (`Retention` as JSON, only the statuses it sets)."""

    __tablename__ = "tenant_retention"
    tenant_id: str = Field(primary_key=True, max_length=100)
    retention_json: str
    updated_at: float = 0.0


class CodeBlobRow(SQLModel, table=True):
    """Tenant code, stored once per content (version = hash of the content)."""

    __tablename__ = "code_blobs"
    version: str = Field(primary_key=True, max_length=80)
    kind: str
    blob: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    manifest_json: str = "{}"
    created_at: float


class CodeVersionRow(SQLModel, table=True):
    """Which tenant may run which code version (a tenant runs only versions it pushed)."""

    __tablename__ = "code_versions"
    tenant_id: str = Field(primary_key=True, max_length=100)
    version: str = Field(primary_key=True, max_length=80)
    created_at: float


class InstanceRow(SQLModel, table=True):
    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("tenant_id", "instance_id", name="uq_instances_tenant_instance"),
        Index("ix_instances_wake_at", "wake_at"),
        Index("ix_instances_lease_wake", "lease_expires_at", "wake_at"),  # next_wake_at
        Index("ix_instances_status_updated", "status", "updated_at"),  # counts; the sweeper
        # a host claims only its own code's due instances (claim_due by tenant and version)
        Index("ix_instances_code_wake", "tenant_id", "code_version", "wake_at"),
    )
    pk: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(max_length=100)
    instance_id: str = Field(max_length=100)
    code_version: str
    metadata_json: str
    params_json: str
    status: str
    output_json: str | None = None
    error_name: str | None = None
    error_message: str | None = None
    created_at: float
    updated_at: float
    wake_at: float | None = None
    waiting_for: str | None = None
    pause_requested: bool = False
    lease_token: int = 0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    activations: int = 0
    trace_context: str | None = Field(default=None, max_length=55)
    trace_caller: str | None = Field(default=None, max_length=55)


class CrashRow(SQLModel, table=True):
    """Consecutive crashed activations of an instance (its host or sandbox died), so the
    count survives a scheduler restart. A table of its own: rows exist only while an
    instance is crashing, and journals from before it existed need no new column."""

    __tablename__ = "activation_crashes"
    instance_pk: int = Field(primary_key=True)
    crashes: int = 0


class StepRow(SQLModel, table=True):
    __tablename__ = "steps"
    instance_pk: int = Field(primary_key=True)
    name: str = Field(primary_key=True, max_length=256)
    seq: int = Field(primary_key=True)
    kind: str = "do"  # do | sleep | wait
    status: str
    result_json: str | None = None
    error_name: str | None = None
    error_message: str | None = None
    attempts: int = 0
    next_attempt_at: float | None = None
    started_at: float
    finished_at: float | None = None


class EventRow(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_inbox", "instance_pk", "type", "consumed", "pk"),)
    pk: int | None = Field(default=None, primary_key=True)
    instance_pk: int
    type: str = Field(max_length=100)
    payload_json: str
    created_at: float
    consumed: bool = False


class LogRow(SQLModel, table=True):
    """One line tenant code printed or logged during an activation."""

    __tablename__ = "logs"
    __table_args__ = (Index("ix_logs_instance", "instance_pk", "pk"),)
    pk: int | None = Field(default=None, primary_key=True)
    instance_pk: int
    at: float
    stream: str = Field(max_length=16)  # stdout | stderr | a logging level name
    step: str | None = Field(default=None, max_length=256)
    count: int | None = None
    attempt: int | None = None
    trace_id: str | None = Field(default=None, max_length=32)
    span_id: str | None = Field(default=None, max_length=16)
    message: str


class EngineSessionRow(SQLModel, table=True):
    """One engine session: a scheduler incarnation, numbered by `epoch` (see sessions.py).
    A table of its own, so journals from before it existed need no new column."""

    __tablename__ = "engine_sessions"
    epoch: int | None = Field(default=None, primary_key=True)
    engine_name: str = Field(max_length=100)
    node: str = Field(max_length=255)  # host name, for people
    machine: str = Field(max_length=255)  # boot id and pid namespace: where pids mean something
    processes_json: str = "[]"  # [[pid, start time], ...] whose end ends the session
    loader_id: str | None = Field(default=None, max_length=64)  # its hosts' loader actor
    started_at: float
    heartbeat_at: float
    ended_at: float | None = None
    ended_reason: str | None = None


I = InstanceRow.__table__
S = StepRow.__table__
E = EventRow.__table__
T = TenantRow.__table__
C = CodeVersionRow.__table__
B = CodeBlobRow.__table__
L = LogRow.__table__
P = TenantPolicyRow.__table__
X = CrashRow.__table__
N = EngineSessionRow.__table__
R = RetentionRow.__table__

#: Ended sessions are kept this long (seconds) for people to read, then deleted.
KEEP_ENDED_SESSIONS = 7 * 86400


def lease_owner_prefix(epoch: int) -> str:
    """Every lease taken in session `epoch` is owned by an id that starts with this."""
    return f"e{epoch}/"


class LeaseLostError(Exception):
    """The caller's fencing token is no longer the instance's: stop writing."""


@dataclass(frozen=True)
class Claim:
    """An instance the scheduler leased for one activation."""

    pk: int
    token: int
    tenant_id: str
    instance_id: str
    code_version: str


@dataclass(frozen=True)
class SessionInfo:
    """An engine session as the journal holds it (`EngineSessionRow`)."""

    epoch: int
    engine_name: str
    node: str
    machine: str
    processes: tuple[tuple[int, int], ...]
    loader_id: str | None
    started_at: float
    heartbeat_at: float


@dataclass(frozen=True)
class InstanceInfo:
    pk: int
    tenant_id: str
    instance_id: str
    code_version: str
    status: str
    metadata_json: str
    params_json: str
    output_json: str | None
    error_name: str | None
    error_message: str | None
    created_at: float
    updated_at: float
    wake_at: float | None
    waiting_for: str | None
    pause_requested: bool
    lease_token: int
    lease_expires_at: float | None
    activations: int
    trace_context: str | None
    trace_caller: str | None


@dataclass(frozen=True)
class StepRecord:
    name: str
    seq: int
    kind: str
    status: str
    result_json: str | None
    error_name: str | None
    error_message: str | None
    attempts: int
    next_attempt_at: float | None
    started_at: float
    finished_at: float | None

    @property
    def settled(self) -> bool:
        """Replay answers it without waiting: a step's outcome, a sleep that has ended, an
        event received or a wait that timed out."""
        if self.kind == "sleep":
            return self.finished_at is not None
        return self.status in (STEP_COMPLETE, STEP_FAILED)


@dataclass(frozen=True)
class ActivationState:
    info: InstanceInfo
    steps: list[StepRecord]
    crashes: int = 0  # consecutive crashed activations before this one
    terminating: bool = False  # terminate(rollback=True) asked: roll back, then end


#: The inbox entry `terminate(rollback=True)` leaves for the instance's next activation
#: (a type tenants cannot send: event types have no dots).
TERMINATE_EVENT = "dynwf.terminate"


_INFO_COLS = [getattr(I.c, f) for f in InstanceInfo.__dataclass_fields__]
_STEP_COLS = [getattr(S.c, f) for f in StepRecord.__dataclass_fields__ if f != "instance_pk"]
_STEP_FIELDS = tuple(StepRecord.__dataclass_fields__)

# The step path runs these once per step: build them once (bind parameters are
# prefixed with b_ because UPDATE reserves the column names for its SET clause).
_FENCE = (
    update(I)
    .where(
        I.c.pk == bindparam("b_pk"), I.c.lease_token == bindparam("b_token"),
        I.c.lease_expires_at.is_not(None),  # held: not given up by a suspend or finish
    )
    .values(lease_expires_at=bindparam("b_until"), updated_at=bindparam("b_now"))
    .returning(I.c.pause_requested)
)
_NEXT_TIMER = (
    select(I.c.wake_at)
    .where(I.c.wake_at.is_not(None), I.c.lease_expires_at.is_(None))
    .order_by(I.c.wake_at)
    .limit(1)
)
_NEXT_LEASE_EXPIRY = (
    select(I.c.lease_expires_at)
    .where(I.c.lease_expires_at.is_not(None))
    .order_by(I.c.lease_expires_at)
    .limit(1)
)
_FENCED = and_(I.c.pk == bindparam("b_pk"), I.c.lease_token == bindparam("b_token"))
_LOAD_INSTANCE = select(*_INFO_COLS).where(I.c.pk == bindparam("b_pk"))
_LOAD_STEPS = select(*_STEP_COLS).where(S.c.instance_pk == bindparam("b_pk"))
_LOAD_CRASHES = select(X.c.crashes).where(X.c.instance_pk == bindparam("b_pk"))
_SUSPEND = (
    update(I)
    .where(_FENCED)
    .values(
        status=case((I.c.pause_requested, "paused"), else_="waiting"),
        wake_at=case((I.c.pause_requested, None), else_=bindparam("b_wake_at")),
        waiting_for=bindparam("b_waiting_for"),
        lease_expires_at=None, lease_owner=None, updated_at=bindparam("b_now"),
    )
)
_BUFFERED = (
    select(E.c.pk)
    .where(
        E.c.instance_pk == bindparam("b_pk"), E.c.type == bindparam("b_type"),
        E.c.consumed.is_(False),
    )
    .limit(1)
)
_WAKE_NOW = (
    update(I)
    .where(I.c.pk == bindparam("b_pk"), I.c.status == "waiting")
    .values(wake_at=bindparam("b_now"))
)
_FINISHED = dict(
    wake_at=None, waiting_for=None, lease_expires_at=None, lease_owner=None,
    pause_requested=False, updated_at=bindparam("b_now"),
)
_COMPLETE = update(I).where(_FENCED).values(
    status="complete", output_json=bindparam("b_output"), **_FINISHED
)
_FAIL = update(I).where(_FENCED).values(
    status="errored", error_name=bindparam("b_error_name"),
    error_message=bindparam("b_error_message"), **_FINISHED
)
_PAUSE = update(I).where(_FENCED).values(status="paused", **_FINISHED)
_TERMINATE = update(I).where(_FENCED).values(status="terminated", **_FINISHED)


def _claim_statement(by_tenant: bool, by_version: bool, skip_locked: bool):
    now = bindparam("b_now")
    due = (
        select(I.c.pk)
        .where(I.c.wake_at <= now, or_(I.c.lease_expires_at.is_(None), I.c.lease_expires_at < now))
        .order_by(I.c.wake_at)
        .limit(bindparam("b_limit", type_=Integer))
    )
    if by_tenant:
        due = due.where(I.c.tenant_id == bindparam("b_tenant"))
    if by_version:
        due = due.where(I.c.code_version == bindparam("b_version"))
    if skip_locked:
        due = due.with_for_update(skip_locked=True)
    return (
        update(I)
        .where(I.c.pk.in_(due.scalar_subquery()))
        .values(
            lease_token=I.c.lease_token + 1,
            lease_owner=bindparam("b_owner"),
            lease_expires_at=bindparam("b_until"),
            status=case((I.c.pause_requested, "waitingForPause"), else_="running"),
            waiting_for=None,
            activations=I.c.activations + 1,
            updated_at=now,
        )
        .returning(I.c.pk, I.c.lease_token, I.c.tenant_id, I.c.instance_id, I.c.code_version)
    )


def sqlite_url_path(url: str) -> str | None:
    prefix = "sqlite:///"
    return url[len(prefix):] if url.startswith(prefix) else None


class Journal:
    """Connection to the journal database plus every query the engine runs."""

    def __init__(self, url: str, *, create_tables: bool = True, synchronous: str = "FULL"):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.health = JournalHealth()
        if self.is_sqlite:
            path = sqlite_url_path(url)
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.engine: SAEngine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 60}
            )
            _install_sqlite_pragmas(self.engine, synchronous)
            self._writers = _WriterLock(path if path and path != ":memory:" else None)
        else:
            self._writers = _WriterLock(None)
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8)
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        self._dialect_insert = dialect_insert
        self._claims: dict[tuple[bool, bool], Any] = {}
        self._group: GroupCommit | None = None
        # Same pool; connections from it begin with BEGIN IMMEDIATE on SQLite.
        self._write_engine = self.engine.execution_options(dynwf_write=True)
        ins = dialect_insert(S)
        self._upsert_step = ins.on_conflict_do_update(
            index_elements=["instance_pk", "name", "seq"],
            set_={
                f: ins.excluded[f] for f in _STEP_FIELDS if f not in ("name", "seq", "started_at")
            },
        )
        if create_tables:  # upgrade the schema to this code's (migrations/); hosts do not
            where = self.engine.url.render_as_string(hide_password=True)
            try:
                with _TABLE_LOCK:
                    with self._read() as conn:
                        state = migrations.read_state(conn)
                    if not state.at_head:
                        migrations.refuse_unknown(state, where)
                        with self._write() as conn:  # one transaction; writers take turns
                            migrations.upgrade(conn, where)
            except Exception as exc:
                self.engine.dispose()
                error = unavailable(exc)
                if error is None:
                    raise
                raise error from exc

    def check_schema(self) -> str:
        """The journal's schema revision; JournalSchemaError unless it is this code's
        (`migrations.HEAD`). Reads only: for a process that must not upgrade the journal."""
        where = self.engine.url.render_as_string(hide_password=True)
        with self._read() as conn:
            state = migrations.read_state(conn)
        migrations.refuse_unknown(state, where)
        if not state.at_head:
            raise JournalSchemaError(
                f"the journal at {where} is at schema revision "
                f"{state.revision or state.detected or 'none (no tables)'}, and this dynwf-ray "
                f"needs {migrations.HEAD}: run `dynwf db upgrade`, or start an engine that "
                "upgrades it"
            )
        return migrations.HEAD

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
        self.engine.dispose()

    # -- transactions ------------------------------------------------------

    def _write(self) -> "_Tx":
        return _Tx(self._write_engine, self._writers, self.health)

    def _read(self) -> "_Tx":
        return _Tx(self.engine, None, self.health)

    # -- tenants and code --------------------------------------------------

    def save_code(
        self, tenant_id: str, version: str, kind: str, blob: bytes, now: float,
        manifest_json: str = "{}",
    ) -> None:
        """Store a code version for a tenant (content once, however many tenants push it)
        and make it the tenant's latest. Idempotent."""
        with self._write() as conn:
            if conn.execute(select(B.c.version).where(B.c.version == version)).first() is None:
                conn.execute(
                    insert(B).values(
                        version=version, kind=kind, blob=blob, manifest_json=manifest_json,
                        created_at=now,
                    )
                )
            owned = conn.execute(
                select(C.c.version).where(C.c.tenant_id == tenant_id, C.c.version == version)
            ).first()
            if owned is None:
                conn.execute(insert(C).values(tenant_id=tenant_id, version=version, created_at=now))
            stmt = self._dialect_insert(T).values(
                tenant_id=tenant_id, latest_version=version, updated_at=now
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["tenant_id"],
                    set_={"latest_version": version, "updated_at": now},
                )
            )

    def code_manifest(self, version: str) -> str | None:
        """The manifest JSON of a stored code version (without its blob)."""
        with self._read() as conn:
            return conn.execute(select(B.c.manifest_json).where(B.c.version == version)).scalar()

    def set_tenant_telemetry(self, tenant_id: str, telemetry_json: str | None, now: float) -> None:
        """Store the platform's telemetry setting for a tenant (None removes it)."""
        stmt = self._dialect_insert(T).values(
            tenant_id=tenant_id, telemetry_json=telemetry_json, updated_at=now
        )
        with self._write() as conn:
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["tenant_id"],
                    set_={"telemetry_json": telemetry_json, "updated_at": now},
                )
            )

    def tenant_telemetry(self, tenant_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(
                select(T.c.telemetry_json).where(T.c.tenant_id == tenant_id)
            ).scalar()

    def set_tenant_policy(self, tenant_id: str, policy_json: str | None, now: float) -> None:
        """Store the platform's sandbox policy for a tenant (None: back to the defaults)."""
        with self._write() as conn:
            conn.execute(delete(P).where(P.c.tenant_id == tenant_id))
            if policy_json is not None:
                conn.execute(insert(P).values(tenant_id=tenant_id, policy_json=policy_json, updated_at=now))

    def tenant_policies(self) -> dict[str, str]:
        """Every tenant's policy (JSON) the platform set."""
        with self._read() as conn:
            return {t: text for t, text in conn.execute(select(P.c.tenant_id, P.c.policy_json)).all()}

    def set_retention(self, tenant_id: str, retention_json: str | None, now: float) -> None:
        """Store a tenant's own retention rules (None: the engine's apply)."""
        with self._write() as conn:
            conn.execute(delete(R).where(R.c.tenant_id == tenant_id))
            if retention_json is not None:
                conn.execute(insert(R).values(tenant_id=tenant_id, retention_json=retention_json,
                                              updated_at=now))

    def retention_rules(self) -> dict[str, str]:
        """Every tenant's own retention rules (JSON)."""
        with self._read() as conn:
            return {t: text for t, text in conn.execute(select(R.c.tenant_id, R.c.retention_json)).all()}

    def tenant_policy(self, tenant_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(select(P.c.policy_json).where(P.c.tenant_id == tenant_id)).scalar()

    def latest_version(self, tenant_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(
                select(T.c.latest_version).where(T.c.tenant_id == tenant_id)
            ).scalar()

    def get_code(self, tenant_id: str, version: str) -> tuple[str, bytes, str] | None:
        """(kind, blob, manifest_json) of a code version the tenant has, else None."""
        with self._read() as conn:
            row = conn.execute(
                select(B.c.kind, B.c.blob, B.c.manifest_json)
                .join(C, C.c.version == B.c.version)
                .where(C.c.tenant_id == tenant_id, C.c.version == version)
            ).first()
        return (row.kind, bytes(row.blob), row.manifest_json) if row else None

    def find_code(self, version: str) -> tuple[str, bytes, str] | None:
        """(kind, blob, manifest_json) of stored content, whichever tenant pushed it."""
        with self._read() as conn:
            row = conn.execute(
                select(B.c.kind, B.c.blob, B.c.manifest_json).where(B.c.version == version)
            ).first()
        return (row.kind, bytes(row.blob), row.manifest_json) if row else None

    def list_versions(self, tenant_id: str) -> list[tuple[str, str, float]]:
        """(version, kind, created_at) of every code version of a tenant, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                select(C.c.version, B.c.kind, C.c.created_at)
                .join(B, B.c.version == C.c.version)
                .where(C.c.tenant_id == tenant_id)
                .order_by(C.c.created_at)
            ).all()
        return [tuple(r) for r in rows]

    # -- creating and reading instances ------------------------------------

    def create_instances(
        self,
        tenant_id: str,
        code_version: str,
        items: Sequence[tuple[str, str, str, str | None, str | None]],
        now: float,
        *,
        skip_existing: bool,
    ) -> list[str]:
        """Insert (instance_id, params_json, metadata_json, trace_context, trace_caller)
        rows, queued and due now.

        With skip_existing, ids the tenant already has are left alone (create_batch);
        otherwise an existing id raises DuplicateInstanceError. Returns the ids inserted.
        """
        rows = [
            dict(
                tenant_id=tenant_id, instance_id=iid, code_version=code_version,
                params_json=params, metadata_json=meta, status="queued",
                created_at=now, updated_at=now, wake_at=now, pause_requested=False,
                lease_token=0, activations=0, trace_context=trace_context,
                trace_caller=trace_caller,
            )
            for iid, params, meta, trace_context, trace_caller in items
        ]
        if not rows:
            return []
        with self._write() as conn:
            if skip_existing:
                existing = set(
                    conn.execute(
                        select(I.c.instance_id).where(
                            I.c.tenant_id == tenant_id,
                            I.c.instance_id.in_([r["instance_id"] for r in rows]),
                        )
                    ).scalars()
                )
                seen: set[str] = set()
                fresh = []
                for r in rows:
                    if r["instance_id"] not in existing and r["instance_id"] not in seen:
                        seen.add(r["instance_id"])
                        fresh.append(r)
                rows = fresh
                if rows:
                    conn.execute(insert(I), rows)
            else:
                try:
                    conn.execute(insert(I), rows)
                except IntegrityError:
                    raise DuplicateInstanceError(
                        f"tenant {tenant_id!r} already has an instance with id "
                        f"{rows[0]['instance_id']!r}"
                    ) from None
        return [r["instance_id"] for r in rows]

    def get_instance(self, tenant_id: str, instance_id: str) -> InstanceInfo | None:
        with self._read() as conn:
            row = conn.execute(
                select(*_INFO_COLS).where(
                    I.c.tenant_id == tenant_id, I.c.instance_id == instance_id
                )
            ).first()
        return InstanceInfo(*row) if row else None

    def require_instance(self, tenant_id: str, instance_id: str) -> InstanceInfo:
        info = self.get_instance(tenant_id, instance_id)
        if info is None:
            raise InstanceNotFoundError(
                f"no instance {instance_id!r} for tenant {tenant_id!r}"
            )
        return info

    def find_instances(self, instance_id: str) -> list[InstanceInfo]:
        """Every tenant's instance with this id (operator tools only)."""
        with self._read() as conn:
            rows = conn.execute(select(*_INFO_COLS).where(I.c.instance_id == instance_id)).all()
        return [InstanceInfo(*r) for r in rows]

    def list_instances(
        self, tenant_id: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[InstanceInfo]:
        stmt = select(*_INFO_COLS).order_by(I.c.pk.desc()).limit(limit)
        if tenant_id is not None:
            stmt = stmt.where(I.c.tenant_id == tenant_id)
        if status is not None:
            stmt = stmt.where(I.c.status == status)
        with self._read() as conn:
            return [InstanceInfo(*r) for r in conn.execute(stmt).all()]

    def last_line(self, pk: int, stream: str) -> str | None:
        """The newest log line of the instance in `stream`, if any."""
        with self._read() as conn:
            return conn.execute(
                select(L.c.message).where(L.c.instance_pk == pk, L.c.stream == stream)
                .order_by(L.c.pk.desc()).limit(1)
            ).scalar()

    def rollback_steps(self, pk: int) -> list[StepRecord]:
        """The instance's compensations recorded so far (steps of kind "rollback")."""
        with self._read() as conn:
            rows = conn.execute(
                select(*_STEP_COLS).where(S.c.instance_pk == pk, S.c.kind == "rollback")
                .order_by(S.c.started_at)
            ).all()
        return [StepRecord(*row) for row in rows]

    def list_steps(self, pk: int) -> list[StepRecord]:
        with self._read() as conn:
            rows = conn.execute(
                select(*_STEP_COLS).where(S.c.instance_pk == pk).order_by(S.c.started_at)
            ).all()
        return [StepRecord(*r) for r in rows]

    def count_by_tenant_status(self) -> dict[tuple[str, str], int]:
        """Instances per (tenant, status), for the metrics gauges."""
        stmt = select(I.c.tenant_id, I.c.status, func.count()).group_by(I.c.tenant_id, I.c.status)
        with self._read() as conn:
            return {(t, s): n for t, s, n in conn.execute(stmt).all()}

    def count_by_status(self, tenant_id: str | None = None) -> dict[str, int]:
        stmt = select(I.c.status, func.count()).group_by(I.c.status)
        if tenant_id is not None:
            stmt = stmt.where(I.c.tenant_id == tenant_id)
        with self._read() as conn:
            return {status: n for status, n in conn.execute(stmt).all()}

    # -- scheduling --------------------------------------------------------

    def claim_due(
        self, now: float, limit: int, owner: str, lease_ttl: float,
        tenant_id: str | None = None, code_version: str | None = None,
    ) -> list[Claim]:
        """Lease up to `limit` instances that are due and not leased, oldest wake first.

        `tenant_id` / `code_version` restrict the claim (a host takes only
        instances of the code it has loaded).
        """
        with self._write() as conn:
            return self._claim_due(conn, now, limit, owner, lease_ttl, tenant_id, code_version)

    def _claim_due(
        self, conn: Connection, now: float, limit: int, owner: str, lease_ttl: float,
        tenant_id: str | None = None, code_version: str | None = None,
    ) -> list[Claim]:
        if limit <= 0:
            return []
        key = (tenant_id is not None, code_version is not None)
        stmt = self._claims.get(key)
        if stmt is None:
            stmt = self._claims[key] = _claim_statement(*key, skip_locked=not self.is_sqlite)
        params = {
            "b_now": now, "b_limit": limit, "b_owner": owner, "b_until": now + lease_ttl,
            "b_tenant": tenant_id, "b_version": code_version,
        }
        return [Claim(*row) for row in conn.execute(stmt, params).all()]

    def _claim_and_load(
        self, conn: Connection, now: float, limit: int, owner: str, lease_ttl: float,
        tenant_id: str | None = None, code_version: str | None = None,
    ) -> list[ActivationState]:
        """`claim_due`, and what each claimed activation starts from, in one transaction."""
        claims = self._claim_due(conn, now, limit, owner, lease_ttl, tenant_id, code_version)
        if not claims:
            return []
        pks = [c.pk for c in claims]
        infos = {row.pk: InstanceInfo(*row) for row in conn.execute(
            select(*_INFO_COLS).where(I.c.pk.in_(pks)))}
        steps: dict[int, list[StepRecord]] = {pk: [] for pk in pks}
        for row in conn.execute(select(S.c.instance_pk, *_STEP_COLS).where(S.c.instance_pk.in_(pks))):
            steps[row[0]].append(StepRecord(*row[1:]))
        crashes = dict(conn.execute(
            select(X.c.instance_pk, X.c.crashes).where(X.c.instance_pk.in_(pks))).all())
        terminating = set(conn.execute(
            select(E.c.instance_pk).where(E.c.instance_pk.in_(pks), E.c.type == TERMINATE_EVENT)
        ).scalars())
        return [ActivationState(infos[pk], steps[pk], crashes.get(pk, 0), pk in terminating)
                for pk in pks]

    def demand(self, now: float) -> dict[tuple[str, str], tuple[int, int]]:
        """Per (tenant, code version) with work: (instances due and not leased, instances
        leased, i.e. being activated). What the scheduler sizes hosts by."""
        due = and_(
            I.c.wake_at <= now, or_(I.c.lease_expires_at.is_(None), I.c.lease_expires_at < now)
        )
        leased = I.c.lease_expires_at >= now
        stmt = (
            select(
                I.c.tenant_id, I.c.code_version,
                func.sum(case((due, 1), else_=0)), func.sum(case((leased, 1), else_=0)),
            )
            .where(or_(I.c.wake_at <= now, I.c.lease_expires_at.is_not(None)))
            .group_by(I.c.tenant_id, I.c.code_version)
        )
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return {
            (t, v): (int(d or 0), int(held or 0))
            for t, v, d, held in rows if d or held
        }

    def next_wake_at(
        self, tenant_id: str | None = None, code_version: str | None = None
    ) -> float | None:
        """When the next instance becomes claimable: its timer, or its lease's expiry
        (of one code version's instances, when both are given).

        Ordered index walks that stop at the first row (a MIN with a filter, or over
        a CASE expression, scans every instance: 25 ms at 100,000 of them).
        """
        timer_q, lease_q = _NEXT_TIMER, _NEXT_LEASE_EXPIRY
        if tenant_id is not None and code_version is not None:
            same = and_(I.c.tenant_id == tenant_id, I.c.code_version == code_version)
            timer_q, lease_q = timer_q.where(same), lease_q.where(same)
        with self._read() as conn:
            timer = conn.execute(timer_q).scalar()
            lease = conn.execute(lease_q).scalar()
        return min((t for t in (timer, lease) if t is not None), default=None)

    def release(self, pk: int, token: int, wake_at: float, now: float) -> bool:
        """Give up a lease (its holder died or is shutting down): due again at wake_at."""
        with self._write() as conn:
            return self._release(conn, pk, token, wake_at, now)

    def _release(self, conn: Connection, pk: int, token: int, wake_at: float, now: float) -> bool:
        return bool(self._release_where(conn, and_(I.c.pk == pk, I.c.lease_token == token), wake_at, now))

    @staticmethod
    def _release_where(conn: Connection, which: Any, wake_at: float, now: float) -> list[int]:
        result = conn.execute(
            update(I)
            # Only a lease still held: an activation that already suspended or
            # finished released it itself, and its new state must stand.
            .where(which, I.c.lease_expires_at.is_not(None), I.c.status.not_in(TERMINAL))
            .values(
                lease_expires_at=None, lease_owner=None, updated_at=now,
                status=case((I.c.pause_requested, "paused"), else_="queued"),
                wake_at=case((I.c.pause_requested, None), else_=wake_at),
            )
            .returning(I.c.pk)
        )
        return [row[0] for row in result.all()]

    def held_by(self, owner: str) -> list[Claim]:
        """The leases `owner` holds (the instances a host that died was activating)."""
        with self._read() as conn:
            rows = conn.execute(
                select(I.c.pk, I.c.lease_token, I.c.tenant_id, I.c.instance_id, I.c.code_version)
                .where(I.c.lease_owner == owner, I.c.lease_expires_at.is_not(None),
                       I.c.status.not_in(TERMINAL))
            ).all()
        return [Claim(*row) for row in rows]

    # -- engine sessions (sessions.py decides when one is gone) ----------------

    def open_session(
        self, engine_name: str, node: str, machine: str, processes: Sequence[tuple[int, int]],
        loader_id: str | None, now: float,
    ) -> int:
        """Begin a session; returns its epoch (greater than every earlier one's). Sessions
        that ended more than `KEEP_ENDED_SESSIONS` ago are deleted meanwhile."""
        with self._write() as conn:
            conn.execute(delete(N).where(N.c.ended_at < now - KEEP_ENDED_SESSIONS))
            return int(conn.execute(
                insert(N).values(
                    engine_name=engine_name, node=node[:255], machine=machine[:255],
                    processes_json=json.dumps([list(p) for p in processes]),
                    loader_id=loader_id, started_at=now, heartbeat_at=now,
                ).returning(N.c.epoch)
            ).scalar_one())

    def heartbeat(self, epoch: int, now: float) -> bool:
        """Say session `epoch` is alive; False if another engine has ended it meanwhile."""
        with self._write() as conn:
            return conn.execute(
                update(N).where(N.c.epoch == epoch, N.c.ended_at.is_(None)).values(heartbeat_at=now)
            ).rowcount == 1

    def probe(self) -> None:
        """Whether the journal can be written now: a write that changes nothing (the newest
        session's heartbeat is rewritten with its own value). Raises
        JournalUnavailableError; either way `health` learns the answer."""
        newest = select(func.max(N.c.epoch)).scalar_subquery()
        with self._write() as conn:
            conn.execute(update(N).where(N.c.epoch == newest).values(heartbeat_at=N.c.heartbeat_at))

    def live_sessions(self) -> list[SessionInfo]:
        """Sessions not ended (some may be gone without having said so)."""
        with self._read() as conn:
            rows = conn.execute(
                select(N.c.epoch, N.c.engine_name, N.c.node, N.c.machine, N.c.processes_json,
                       N.c.loader_id, N.c.started_at, N.c.heartbeat_at)
                .where(N.c.ended_at.is_(None)).order_by(N.c.epoch)
            ).all()
        return [
            SessionInfo(r.epoch, r.engine_name, r.node, r.machine,
                        tuple(tuple(p) for p in json.loads(r.processes_json)), r.loader_id,
                        r.started_at, r.heartbeat_at)
            for r in rows
        ]

    def end_session(self, epoch: int, reason: str, now: float) -> list[int]:
        """End session `epoch` and give up every lease taken in it, in one transaction:
        its instances are due again at once. Returns their pks."""
        with self._write() as conn:
            conn.execute(
                update(N).where(N.c.epoch == epoch, N.c.ended_at.is_(None))
                .values(ended_at=now, ended_reason=reason[:1000])
            )
            which = I.c.lease_owner.startswith(lease_owner_prefix(epoch), autoescape=True)
            return self._release_where(conn, which, now, now)

    # -- crashed activations --------------------------------------------------

    def count_crash(self, pk: int) -> int:
        """One more crashed activation of this instance in a row; returns how many now."""
        with self._write() as conn:
            return self._count_crash(conn, pk)

    def _count_crash(self, conn: Connection, pk: int) -> int:
        ins = self._dialect_insert(X).values(instance_pk=pk, crashes=1)
        stmt = ins.on_conflict_do_update(
            index_elements=["instance_pk"], set_={"crashes": X.c.crashes + 1}
        ).returning(X.c.crashes)
        return int(conn.execute(stmt).scalar_one())

    @staticmethod
    def _clear_crashes(conn: Connection, pk: int) -> None:
        conn.execute(delete(X).where(X.c.instance_pk == pk))

    # -- what an activation writes (all fenced by the lease token) ---------

    def _fence(self, conn: Connection, pk: int, token: int, now: float, lease_ttl: float) -> bool:
        """Renew the lease if the token is still ours; returns pause_requested."""
        row = conn.execute(
            _FENCE, {"b_pk": pk, "b_token": token, "b_until": now + lease_ttl, "b_now": now}
        ).first()
        if row is None:
            raise LeaseLostError(f"instance pk={pk}: lease token {token} is no longer current")
        return bool(row[0])

    def check_movable(self, tenant_id: str, instance_id: str, version: str) -> InstanceInfo:
        """Raise InvalidStateError unless the instance could move to `version` now."""
        info = self.require_instance(tenant_id, instance_id)
        with self._read() as conn:
            self._movable(conn, info, version)
        return info

    @staticmethod
    def _movable(conn: Connection, info: InstanceInfo, version: str) -> None:
        if info.status in TERMINAL:
            raise InvalidStateError(
                f"instance {info.instance_id!r} is {info.status}; restart it before moving it"
            )
        known = conn.execute(
            select(C.c.version).where(C.c.tenant_id == info.tenant_id, C.c.version == version)
        ).first()
        if known is None:
            raise InvalidStateError(f"tenant {info.tenant_id!r} has no code version {version!r}")

    def history(self, tenant_id: str, instance_id: str) -> ActivationState:
        """An instance as an activation would start from it, without a lease: what a
        replay check replays (`replay_check.py`)."""
        info = self.require_instance(tenant_id, instance_id)
        with self._read() as conn:
            steps = conn.execute(_LOAD_STEPS, {"b_pk": info.pk}).all()
        return ActivationState(info, [StepRecord(*s) for s in steps])

    def in_flight(self, tenant_id: str) -> list[InstanceInfo]:
        """The tenant's instances that have not ended, oldest first."""
        with self._read() as conn:
            return [InstanceInfo(*r) for r in conn.execute(
                select(*_INFO_COLS).where(I.c.tenant_id == tenant_id, I.c.status.not_in(TERMINAL))
                .order_by(I.c.pk)
            ).all()]

    def load_activation(self, pk: int, token: int) -> ActivationState:
        with self._read() as conn:
            row = conn.execute(_LOAD_INSTANCE, {"b_pk": pk}).first()
            if row is None or row.lease_token != token:
                raise LeaseLostError(f"instance pk={pk}: lease token {token} is not current")
            steps = conn.execute(_LOAD_STEPS, {"b_pk": pk}).all()
            crashes = conn.execute(_LOAD_CRASHES, {"b_pk": pk}).scalar() or 0
            terminating = conn.execute(
                select(E.c.pk).where(E.c.instance_pk == pk, E.c.type == TERMINATE_EVENT).limit(1)
            ).first() is not None
        return ActivationState(InstanceInfo(*row), [StepRecord(*s) for s in steps], crashes,
                               terminating)

    def renew_leases(self, leases: Sequence[tuple[int, int]], now: float, lease_ttl: float) -> None:
        """Extend several held leases at once (those lost or given up are left alone)."""
        with self._write() as conn:
            self._renew_leases(conn, leases, now, lease_ttl)

    @staticmethod
    def _renew_leases(
        conn: Connection, leases: Sequence[tuple[int, int]], now: float, lease_ttl: float
    ) -> None:
        for pk, token in leases:
            conn.execute(_FENCE, {"b_pk": pk, "b_token": token, "b_until": now + lease_ttl, "b_now": now})

    def set_version(self, tenant_id: str, instance_id: str, version: str, now: float) -> None:
        """Move an instance to another stored code version (used from its next activation)."""
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            self._movable(conn, info, version)
            metadata = {**json.loads(info.metadata_json), "code_version": version}
            conn.execute(
                update(I).where(I.c.pk == info.pk).values(
                    code_version=version, metadata_json=json.dumps(metadata), updated_at=now
                )
            )

    def renew_lease(self, pk: int, token: int, now: float, lease_ttl: float) -> bool:
        """Heartbeat for long steps. Returns pause_requested; raises LeaseLostError."""
        with self._write() as conn:
            return self._fence(conn, pk, token, now, lease_ttl)

    def record_step(
        self, pk: int, token: int, step: StepRecord, now: float, lease_ttl: float,
        logs: Sequence[LogLine] = (), keep_logs: int = 0,
    ) -> bool:
        """Durably record a step's state (fenced), with the log lines printed since the
        last write, in the same commit. Returns pause_requested."""
        with self._write() as conn:
            return self._record_step(conn, pk, token, step, now, lease_ttl, logs, keep_logs)

    def _record_step(
        self, conn: Connection, pk: int, token: int, step: StepRecord, now: float,
        lease_ttl: float, logs: Sequence[LogLine] = (), keep_logs: int = 0,
    ) -> bool:
        values = {f: getattr(step, f) for f in _STEP_FIELDS}
        values["instance_pk"] = pk
        pause = self._fence(conn, pk, token, now, lease_ttl)
        conn.execute(self._upsert_step, values)
        if logs:
            self._insert_logs(conn, pk, logs, keep_logs)
        return pause

    # -- logs ----------------------------------------------------------------

    def append_logs(self, pk: int, logs: Sequence[LogLine], keep: int) -> None:
        """Store log lines of an instance, keeping only its newest `keep` lines."""
        if logs:
            with self._write() as conn:
                self._insert_logs(conn, pk, logs, keep)

    @staticmethod
    def _insert_logs(conn: Connection, pk: int, logs: Sequence[LogLine], keep: int) -> None:
        if not logs:
            return
        conn.execute(
            insert(L),
            [{**line.model_dump(exclude={"id"}), "instance_pk": pk} for line in logs],
        )
        oldest_kept = (
            select(L.c.pk).where(L.c.instance_pk == pk).order_by(L.c.pk.desc())
            .offset(max(keep - 1, 0)).limit(1).scalar_subquery()
        )
        conn.execute(delete(L).where(L.c.instance_pk == pk, L.c.pk < oldest_kept))

    def read_logs(self, pk: int, after: int = 0, limit: int = 1000) -> list[LogLine]:
        """An instance's log lines with id > `after`, oldest first."""
        cols = [L.c.pk.label("id")] + [getattr(L.c, f) for f in LogLine.model_fields if f != "id"]
        with self._read() as conn:
            rows = conn.execute(
                select(*cols).where(L.c.instance_pk == pk, L.c.pk > after)
                .order_by(L.c.pk).limit(limit)
            ).all()
        return [LogLine(**row._mapping) for row in rows]

    def take_event(
        self, pk: int, token: int, step: StepRecord, event_type: str, now: float, lease_ttl: float
    ) -> tuple[str, str, float] | None:
        """Consume the oldest buffered event of this type into the waiting step.

        Returns (type, payload_json, created_at), or None when nothing is buffered.
        """
        with self._write() as conn:
            return self._take_event(conn, pk, token, step, event_type, now, lease_ttl)

    def _take_event(
        self, conn: Connection, pk: int, token: int, step: StepRecord, event_type: str,
        now: float, lease_ttl: float,
    ) -> tuple[str, str, float] | None:
        self._fence(conn, pk, token, now, lease_ttl)
        row = conn.execute(
            select(E.c.pk, E.c.payload_json, E.c.created_at)
            .where(E.c.instance_pk == pk, E.c.type == event_type, E.c.consumed.is_(False))
            .order_by(E.c.pk)
            .limit(1)
        ).first()
        if row is None:
            return None
        conn.execute(update(E).where(E.c.pk == row.pk).values(consumed=True))
        result = (
            f'{{"type":{json.dumps(event_type)},"payload":{row.payload_json},'
            f'"timestamp":{json.dumps(row.created_at)}}}'
        )
        conn.execute(
            update(S)
            .where(S.c.instance_pk == pk, S.c.name == step.name, S.c.seq == step.seq)
            .values(status=STEP_COMPLETE, result_json=result, finished_at=now)
        )
        return event_type, row.payload_json, row.created_at

    def suspend(
        self, pk: int, token: int, wake_at: float | None, waiting_for: str | None, now: float
    ) -> None:
        """Release the lease with a timer (sleep end / wait deadline / retry time).

        If a pause was requested the instance becomes `paused` instead. If it waits
        for an event that is already buffered, it is due at once (no lost wake-up).
        """
        with self._write() as conn:
            self._suspend(conn, pk, token, wake_at, waiting_for, now)

    @staticmethod
    def _suspend(
        conn: Connection, pk: int, token: int, wake_at: float | None, waiting_for: str | None,
        now: float,
    ) -> None:
        params = {
            "b_pk": pk, "b_token": token, "b_wake_at": wake_at,
            "b_waiting_for": waiting_for, "b_now": now,
        }
        if not conn.execute(_SUSPEND, params).rowcount:
            raise LeaseLostError(f"instance pk={pk}: lease lost before suspending")
        if waiting_for is not None:
            if conn.execute(_BUFFERED, {"b_pk": pk, "b_type": waiting_for}).first():
                conn.execute(_WAKE_NOW, {"b_pk": pk, "b_now": now})

    def pause_now(self, pk: int, token: int, now: float) -> None:
        """The activation stopped at a step boundary because a pause was requested."""
        with self._write() as conn:
            self._finish(conn, _PAUSE, pk, token, now)

    def complete(self, pk: int, token: int, output_json: str, now: float) -> None:
        with self._write() as conn:
            self._finish(conn, _COMPLETE, pk, token, now, b_output=output_json)

    def fail(self, pk: int, token: int, error_name: str, message: str, now: float) -> None:
        with self._write() as conn:
            self._finish(conn, _FAIL, pk, token, now, b_error_name=error_name, b_error_message=message)

    @staticmethod
    def _finish(conn: Connection, stmt: Any, pk: int, token: int, now: float, **params: Any) -> None:
        if not conn.execute(stmt, {"b_pk": pk, "b_token": token, "b_now": now, **params}).rowcount:
            raise LeaseLostError(f"instance pk={pk}: lease lost before finishing")

    def _end_activation(
        self, conn: Connection, outcome: tuple, pk: int, logs: Sequence[LogLine], keep_logs: int,
        crashed: bool, had_crashes: bool,
    ) -> None:
        """What ends an activation, in one commit: its outcome (("complete", token, output,
        now), ("fail", token, name, message, now), ("suspend", token, wake_at, waiting_for,
        now), ("pause", token, now), ("release", token, wake_at, now) or ("terminate", token,
        now)), its last log
        lines, and its count of crashes in a row (one more, or none after one that did
        not crash)."""
        kind, token, *args = outcome
        if kind == "complete":
            self._finish(conn, _COMPLETE, pk, token, args[1], b_output=args[0])
        elif kind == "fail":
            self._finish(conn, _FAIL, pk, token, args[2], b_error_name=args[0], b_error_message=args[1])
        elif kind == "suspend":
            self._suspend(conn, pk, token, args[0], args[1], args[2])
        elif kind == "pause":
            self._finish(conn, _PAUSE, pk, token, args[0])
        elif kind == "release":
            self._release(conn, pk, token, args[0], args[1])
        elif kind == "terminate":  # its rollback is done
            self._finish(conn, _TERMINATE, pk, token, args[0])
            conn.execute(delete(E).where(E.c.instance_pk == pk, E.c.type == TERMINATE_EVENT))
        self._insert_logs(conn, pk, logs, keep_logs)
        if crashed:
            self._count_crash(conn, pk)
        elif had_crashes:
            self._clear_crashes(conn, pk)

    # -- group commit ----------------------------------------------------------

    @property
    def grouped(self) -> "GroupCommit":
        """The same writes, awaitable, group-committed with those of concurrent
        activations in this process (see `GroupCommit`)."""
        if self._group is None:
            with _TABLE_LOCK:
                if self._group is None:
                    self._group = GroupCommit(self)
        return self._group

    def write_stats(self) -> dict[str, float]:
        """Commits and lock waits of this process (group commit, SQLite's write lock)."""
        group = self._group.stats() if self._group is not None else {}
        return {**group, **{f"sqlite_{k}": v for k, v in _LOCK_STATS.items()}}

    # -- what the platform does to an instance ------------------------------

    def send_event(
        self, tenant_id: str, instance_id: str, event_type: str, payload_json: str, now: float
    ) -> InstanceInfo:
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            if info.status in TERMINAL:
                raise InvalidStateError(
                    f"instance {instance_id!r} is {info.status}; it accepts no more events"
                )
            conn.execute(
                insert(E).values(
                    instance_pk=info.pk, type=event_type, payload_json=payload_json,
                    created_at=now, consumed=False,
                )
            )
            if info.waiting_for == event_type and info.status == "waiting":
                conn.execute(update(I).where(I.c.pk == info.pk).values(wake_at=now))
            return info

    def pause(self, tenant_id: str, instance_id: str, now: float) -> str:
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            if info.status in TERMINAL:
                raise InvalidStateError(f"instance {instance_id!r} is {info.status}; cannot pause")
            if info.status == "paused":
                return "paused"
            leased = info.lease_expires_at is not None and info.lease_expires_at >= now
            status = "waitingForPause" if leased else "paused"
            values: dict[str, Any] = dict(pause_requested=True, status=status, updated_at=now)
            if not leased:
                values.update(wake_at=None, lease_expires_at=None)
            conn.execute(update(I).where(I.c.pk == info.pk).values(**values))
            return status

    def resume(self, tenant_id: str, instance_id: str, now: float) -> str:
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            if info.status == "paused":
                conn.execute(
                    update(I).where(I.c.pk == info.pk).values(
                        pause_requested=False, status="queued", wake_at=now, updated_at=now
                    )
                )
                return "queued"
            if info.status == "waitingForPause":
                conn.execute(
                    update(I).where(I.c.pk == info.pk).values(
                        pause_requested=False, status="running", updated_at=now
                    )
                )
                return "running"
            if info.status in TERMINAL:
                raise InvalidStateError(f"instance {instance_id!r} is {info.status}; cannot resume")
            return info.status

    def terminate(
        self, tenant_id: str, instance_id: str, now: float, rollback: bool = False
    ) -> InstanceInfo:
        """End the instance now, a running activation fenced. With `rollback`, it is
        instead due at once with a `TERMINATE_EVENT` in its inbox: its next activation
        runs the compensations of its completed steps, then ends it terminated."""
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            if info.status in TERMINAL:
                raise InvalidStateError(
                    f"instance {instance_id!r} is already {info.status}; cannot terminate"
                )
            if rollback:
                conn.execute(delete(E).where(E.c.instance_pk == info.pk, E.c.type == TERMINATE_EVENT))
                conn.execute(insert(E).values(instance_pk=info.pk, type=TERMINATE_EVENT,
                                              payload_json="null", created_at=now))
                conn.execute(update(I).where(I.c.pk == info.pk).values(
                    wake_at=now, waiting_for=None, pause_requested=False,
                    lease_token=I.c.lease_token + 1, lease_expires_at=None, lease_owner=None,
                    updated_at=now,
                ))
                return info
            conn.execute(
                update(I).where(I.c.pk == info.pk).values(
                    status="terminated", wake_at=None, waiting_for=None,
                    lease_token=I.c.lease_token + 1, lease_expires_at=None, lease_owner=None,
                    pause_requested=False, updated_at=now,
                )
            )
            return info

    def restart(
        self, tenant_id: str, instance_id: str, now: float,
        trace: tuple[str | None, str | None] = (None, None),
        from_step: tuple[str, int] | None = None,
    ) -> InstanceInfo:
        """Run the instance again, in a new trace, running holders fenced. From the start:
        its steps, inbox and logs are discarded. `from_step` (name, count): that step and
        every step that began after it are discarded, with the events their waits
        consumed and the log lines they printed; the steps before it keep their results.
        Returns the instance as it was before."""
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            if from_step is None:
                conn.execute(delete(S).where(S.c.instance_pk == info.pk))
                conn.execute(delete(E).where(E.c.instance_pk == info.pk))
                conn.execute(delete(L).where(L.c.instance_pk == info.pk))
            else:
                self._discard_from(conn, info, *from_step)
            self._clear_crashes(conn, info.pk)
            conn.execute(
                update(I).where(I.c.pk == info.pk).values(
                    status="queued", wake_at=now, waiting_for=None, output_json=None,
                    error_name=None, error_message=None, pause_requested=False,
                    lease_token=I.c.lease_token + 1, lease_expires_at=None, lease_owner=None,
                    updated_at=now, trace_context=trace[0], trace_caller=trace[1],
                )
            )
            return info

    @staticmethod
    def _discard_from(conn: Connection, info: InstanceInfo, name: str, seq: int) -> None:
        mine = S.c.instance_pk == info.pk
        started = conn.execute(select(S.c.started_at).where(mine, S.c.name == name, S.c.seq == seq)).scalar()
        if started is None:
            raise InvalidInputError(
                f"instance {info.instance_id!r} has no recorded step {name!r} (count {seq}) "
                "to restart from"
            )
        later = conn.execute(
            select(S.c.name, S.c.seq, S.c.kind, S.c.status, S.c.result_json)
            .where(mine, S.c.started_at >= started)
        ).all()
        for step in later:
            if step.kind == "wait" and step.status == STEP_COMPLETE:  # it consumed an event
                got = json.loads(step.result_json)
                conn.execute(delete(E).where(
                    E.c.instance_pk == info.pk, E.c.consumed.is_(True), E.c.type == got["type"],
                    E.c.created_at == got["timestamp"],
                ))
            conn.execute(delete(L).where(L.c.instance_pk == info.pk, L.c.step == step.name,
                                         L.c.count == step.seq))
        conn.execute(delete(S).where(mine, S.c.started_at >= started))

    # -- deletion ----------------------------------------------------------------

    def delete_instance(self, tenant_id: str, instance_id: str, now: float, force: bool = False) -> InstanceInfo:
        """Delete an instance with its steps, events and logs; refused (InvalidStateError)
        while an activation holds it, unless `force` (that activation is fenced out).
        Returns the instance as it was."""
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            held = info.lease_expires_at is not None and info.lease_expires_at >= now
            if held and not force:
                raise InvalidStateError(
                    f"instance {instance_id!r} is running; pause or terminate it first, or "
                    "delete it with force=True"
                )
            self._delete(conn, [info.pk])
            return info

    def sweep(
        self, now: float, keep: dict[str, float | None],
        tenants: dict[str, dict[str, float | None]], limit: int = 200,
    ) -> int:
        """Delete up to `limit` finished instances kept longer than their status allows:
        `keep` {status: seconds | None (for good)} for every tenant not in `tenants`,
        which has its own. One transaction; returns how many (fewer than `limit`: none
        left to delete now)."""
        expired = []
        for status in TERMINAL:
            if keep.get(status) is not None:
                expired.append(and_(I.c.status == status, I.c.updated_at < now - keep[status],
                                    I.c.tenant_id.not_in(list(tenants))))
            for tenant, rules in tenants.items():
                if rules.get(status) is not None:
                    expired.append(and_(I.c.status == status, I.c.tenant_id == tenant,
                                        I.c.updated_at < now - rules[status]))
        if not expired:
            return 0
        with self._write() as conn:
            pks = list(conn.execute(select(I.c.pk).where(or_(*expired)).limit(limit)).scalars())
            if pks:
                self._delete(conn, pks)
            return len(pks)

    @staticmethod
    def _delete(conn: Connection, pks: list[int]) -> None:
        for table in (S, E, L, X):
            conn.execute(delete(table).where(table.c.instance_pk.in_(pks)))
        conn.execute(delete(I).where(I.c.pk.in_(pks)))

    def _lock_instance(self, conn: Connection, tenant_id: str, instance_id: str) -> InstanceInfo:
        # Touch the row first: on PostgreSQL this takes the row lock (see module docstring).
        touched = conn.execute(
            update(I)
            .where(I.c.tenant_id == tenant_id, I.c.instance_id == instance_id)
            .values(updated_at=I.c.updated_at)
        )
        if not touched.rowcount:
            raise InstanceNotFoundError(f"no instance {instance_id!r} for tenant {tenant_id!r}")
        row = conn.execute(
            select(*_INFO_COLS).where(I.c.tenant_id == tenant_id, I.c.instance_id == instance_id)
        ).first()
        return InstanceInfo(*row)


_TABLE_LOCK = threading.Lock()


class GroupCommit:
    """Group commit: the writes of concurrent activations in one process share commits.

    Each awaitable method queues its write and returns when the transaction that holds
    it has committed, so a step is durable before `step.do` returns, as with the
    journal's plain methods. One writer thread takes every write queued meanwhile, runs
    them in one transaction and commits them together: while it commits, the next
    writes queue up. A write that fails raises to its own caller only (`_commit`). Its
    numbers (`stats`) say how well it groups.
    """

    def __init__(self, journal: "Journal"):
        self._journal = journal
        self._queue: list[tuple[Any, tuple, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stats = {"group_commits": 0, "group_writes": 0, "group_max": 0}
        threading.Thread(target=self._run, name="dynwf-group-commit", daemon=True).start()

    # The writes: each is the journal's method of the same name, awaitable.

    async def claim_due(self, *args: Any) -> list[Claim]:
        return await self._submit(self._journal._claim_due, args)

    async def claim_and_load(self, *args: Any) -> list[ActivationState]:
        return await self._submit(self._journal._claim_and_load, args)

    async def renew_leases(self, *args: Any) -> None:
        return await self._submit(self._journal._renew_leases, args)

    async def record_step(self, *args: Any) -> bool:
        return await self._submit(self._journal._record_step, args)

    async def take_event(self, *args: Any) -> tuple[str, str, float] | None:
        return await self._submit(self._journal._take_event, args)

    async def count_crash(self, pk: int) -> int:
        return await self._submit(self._journal._count_crash, (pk,))

    async def end_activation(self, *args: Any) -> None:
        return await self._submit(self._journal._end_activation, args)

    async def release(self, *args: Any) -> bool:
        return await self._submit(self._journal._release, args)

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _submit(self, fn: Any, args: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the journal is closed")
            self._queue.append((fn, args, loop, future))
            self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                batch, self._queue = self._queue, []
            results = self._commit(batch)
            for (_, _, loop, future), result in zip(batch, results):
                try:
                    loop.call_soon_threadsafe(_settle, future, result)
                except RuntimeError:  # that caller's loop is closed: nobody waits
                    pass

    def _commit(self, batch: list) -> list[tuple[bool, Any]]:
        """Run a batch in one transaction. A write that finds its lease lost raises before
        it writes anything (the fence is its first statement), so it fails alone; any
        other error rolls the whole batch back and runs each write in a transaction of
        its own, so that one bad write cannot fail the others; an unavailable journal
        fails them all (it is nothing one write did)."""
        results: list[tuple[bool, Any]] = []
        try:
            with self._journal._write() as conn:
                for fn, args, _, _ in batch:
                    try:
                        results.append((True, fn(conn, *args)))
                    except LeaseLostError as exc:
                        results.append((False, exc))
        except JournalUnavailableError as exc:
            return [(False, exc)] * len(batch)
        except Exception:  # noqa: BLE001 - one by one, below
            if len(batch) == 1:
                return self._alone(batch[0])
            return [self._alone(item) for item in batch]
        self._stats["group_commits"] += 1
        self._stats["group_writes"] += len(batch)
        self._stats["group_max"] = max(self._stats["group_max"], len(batch))
        return results

    def _alone(self, item: tuple) -> tuple[bool, Any]:
        fn, args, _, _ = item
        try:
            with self._journal._write() as conn:
                return True, fn(conn, *args)
        except Exception as exc:  # noqa: BLE001 - raised to its own caller
            return False, exc


def _settle(future: asyncio.Future, result: tuple[bool, Any]) -> None:
    if future.done():
        return
    ok, value = result
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


#: Writers of this process: transactions begun, how many waited for their turn
#: (`_WriterLock`) and for how long; and retries of `BEGIN IMMEDIATE` (a writer that
#: does not take the writer lock, e.g. another program, held SQLite's own lock).
_LOCK_STATS = {"lock_begins": 0, "lock_waits": 0, "lock_wait_s": 0.0, "busy_retries": 0}


class _WriterLock:
    """Writers of one SQLite file queue here, in the kernel, for their turn.

    SQLite lets one transaction write at a time; a writer that finds the lock taken
    could only retry after a sleep, leaving the file idle meanwhile. Every journal
    writer on this machine (the file cannot be shared beyond it) first takes an
    exclusive `flock` on `<journal>.writers`: waiters sleep without polling and the
    next one starts as soon as the last commits. With group commit each turn carries
    the writes of every activation of its process that queued meanwhile.
    None (PostgreSQL, an in-memory database): no lock; the database orders writers.
    """

    def __init__(self, path: str | None):
        self._fd = os.open(f"{path}.writers", os.O_RDWR | os.O_CREAT, 0o600) if path else None
        self._threads = threading.Lock()  # flock is per open file, not per thread

    def acquire(self) -> None:
        if self._fd is not None:
            self._threads.acquire()
            began = time.monotonic()
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                _LOCK_STATS["lock_waits"] += 1
                _LOCK_STATS["lock_wait_s"] += time.monotonic() - began
            except BaseException:
                self._threads.release()
                raise

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._threads.release()


class _Tx:
    """One transaction on a pooled connection, committed on success, rolled back on error
    (a write transaction takes the journal's writer lock around it). A database error
    that says the journal cannot be used now leaves as `JournalUnavailableError`; the
    journal's health learns how each write went."""

    __slots__ = ("_engine", "_lock", "_health", "_conn", "_tx")

    def __init__(self, engine: SAEngine, lock: _WriterLock | None, health: JournalHealth):
        self._engine = engine
        self._lock = lock
        self._health = health

    def __enter__(self) -> Connection:
        if self._lock is not None:
            self._lock.acquire()
        try:
            self._conn = self._engine.connect()
            self._tx = self._conn.begin()
        except BaseException as exc:
            if self._lock is not None:
                self._lock.release()
            self._raise_unavailable(exc)
            raise
        return self._conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self._tx.commit()
                except BaseException as failed:
                    self._raise_unavailable(failed)
                    raise
                if self._lock is not None:
                    self._health.succeeded()
            else:
                try:
                    self._tx.rollback()
                except Exception:  # noqa: BLE001 - the connection is gone: nothing was written
                    pass
                self._raise_unavailable(exc)
        finally:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            if self._lock is not None:
                self._lock.release()

    def _raise_unavailable(self, exc: BaseException) -> None:
        error = unavailable(exc)
        if error is not None:
            self._health.failed(error)
            if error is not exc:
                raise error from exc


#: Causes of `JournalUnavailableError`: (cause, retryable, SQLSTATEs, phrases of drivers'
#: messages). The first that matches names the cause.
_CAUSES = (
    ("disk full", True, ("53100",), ("database or disk is full", "no space left on device")),
    ("read-only", True, ("25006",), ("readonly database", "read-only transaction")),
    ("serialization failure", True, ("40001", "40P01"), ("could not serialize", "deadlock detected")),
    ("locked", True, ("55P03",), ("database is locked", "database table is locked")),
    ("disk I/O error", True, ("58030",), ("disk i/o error",)),
    ("corrupt", False, ("XX001", "XX002"), ("malformed", "file is not a database")),
    ("unreachable", True, ("08000", "08001", "08003", "08004", "08006", "57P01", "57P02", "57P03",
                           "53300"),
     ("connection refused", "could not connect", "connection failed", "server closed the connection",
      "terminating connection", "unable to open database file", "connection is closed",
      "connection is lost", "too many clients")),
)


def unavailable(exc: BaseException) -> JournalUnavailableError | None:
    """The `JournalUnavailableError` for a database error that says the journal cannot be
    used now; None for every other error (a constraint, bad SQL: the call was wrong)."""
    if isinstance(exc, JournalUnavailableError):
        return exc
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.ProgrammingError, sa_exc.DataError)):
        return None
    orig = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's exception
    if not isinstance(exc, (sa_exc.DBAPIError, sa_exc.DisconnectionError, sa_exc.TimeoutError,
                            sqlite3.Error)) and type(orig).__module__.split(".")[0] != "psycopg":
        return None
    text = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    code = getattr(orig, "sqlstate", None)
    lowered = text.lower()
    for cause, retryable, codes, phrases in _CAUSES:
        if code in codes or any(p in lowered for p in phrases):
            return JournalUnavailableError(cause, text, retryable)
    if isinstance(exc, sa_exc.TimeoutError):  # the connection pool had no connection to give
        return JournalUnavailableError("busy", text)
    if code is None and isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)) \
            and not isinstance(orig, sqlite3.Error):
        return JournalUnavailableError("unreachable", text)  # psycopg: no server answered
    if code is not None and code[:2] in ("08", "53", "57", "58", "XX"):
        return JournalUnavailableError("database error", text)  # other PostgreSQL conditions
    return None


def _install_sqlite_pragmas(engine: SAEngine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        if conn.get_execution_options().get("dynwf_write"):
            _begin_immediate(conn.connection.driver_connection)
        else:
            conn.exec_driver_sql("BEGIN DEFERRED")


def _begin_immediate(dbapi_conn: Any) -> None:
    """Take SQLite's write lock, retrying with short sleeps.

    SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries, which
    under many concurrent writers costs more than the commits themselves; we
    retry from 50 us instead (for the BEGIN only; other statements keep the
    60 s busy timeout).
    """
    dbapi_conn.execute("PRAGMA busy_timeout=0")
    began = None
    try:
        delay, deadline = 0.00005, time.monotonic() + 60
        while True:
            try:
                dbapi_conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                if began is None:
                    began = time.monotonic()
                time.sleep(delay)
                delay = min(delay * 2, 0.002)
    finally:
        _LOCK_STATS["lock_begins"] += 1
        if began is not None:
            _LOCK_STATS["busy_retries"] += 1
        dbapi_conn.execute("PRAGMA busy_timeout=60000")
