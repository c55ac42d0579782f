"""The journal's tables (SQLModel), their aliases for queries, and the records the journal hands out."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    Index,
    LargeBinary,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator
from sqlmodel import AutoString, Column, Field, SQLModel


class TenantText(TypeDecorator):
    """Text that tenant code can make (error messages, log lines). A lone surrogate (how
    Python keeps bytes that did not decode, e.g. from `os.fsdecode`) cannot be written as
    UTF-8: the write failed, and an instance whose error held one was retried without
    end. It is stored escaped (`\\udcff`), the rest of the text as it is."""

    impl = AutoString
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return value.encode("utf-8", "backslashreplace").decode()
        return value



# Step row statuses.
STEP_COMPLETE = "complete"  # result_json holds the result (a sleep stores its wake time)
STEP_FAILED = "failed"  # retries used up / non-retryable: replay raises the error again
STEP_RETRYING = "retrying"  # attempts failed so far; next attempt at next_attempt_at
STEP_WAITING = "waiting"  # wait_for_event reached; result_json holds the deadline


#: Row ids (`instances.pk`, `logs.pk`) are 32-bit on PostgreSQL: a cursor beyond them
#: (`before_pk`, `after`) is clamped, meaning "beyond every row", instead of failing.
MAX_ROW_ID = 2**31 - 1

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
        Index("ix_instances_tenant_pk", "tenant_id", "pk"),  # a tenant's newest, paged
        # SQLite: a deleted instance's pk is never given to a new one (an activation of
        # the deleted one, still running, would match the new one's row and lease)
        {"sqlite_autoincrement": True},
    )
    pk: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(max_length=100)
    instance_id: str = Field(max_length=100)
    code_version: str
    metadata_json: str
    params_json: str
    status: str
    output_json: str | None = None
    error_name: str | None = Field(default=None, sa_type=TenantText)
    error_message: str | None = Field(default=None, sa_type=TenantText)
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
    kind: str = "do"  # do | sleep | wait | rollback
    status: str
    result_json: str | None = None
    error_name: str | None = Field(default=None, sa_type=TenantText)
    error_message: str | None = Field(default=None, sa_type=TenantText)
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
    message: str = Field(sa_type=TenantText)


class ApiTokenRow(SQLModel, table=True):
    """A bearer token of the HTTP API (`access.py`): only the SHA-256 of its secret is
    stored. `tenant_id` NULL: an admin token."""

    __tablename__ = "api_tokens"
    __table_args__ = (Index("ix_api_tokens_hash", "token_hash", unique=True),)
    token_id: str = Field(primary_key=True, max_length=12)  # public, short
    token_hash: str = Field(max_length=64)  # hex SHA-256 of the secret
    tenant_id: str | None = Field(default=None, max_length=100)
    name: str = Field(max_length=100)
    created_at: float
    revoked_at: float | None = None


class WebhookSecretRow(SQLModel, table=True):
    """The secret a tenant's webhooks are signed with (HMAC-SHA256): stored as it is,
    since checking a signature needs it."""

    __tablename__ = "webhook_secrets"
    tenant_id: str = Field(primary_key=True, max_length=100)
    secret: str
    updated_at: float = 0.0


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
A = ApiTokenRow.__table__
W = WebhookSecretRow.__table__

#: Ended sessions are kept this long (seconds) for people to read, then deleted.
KEEP_ENDED_SESSIONS = 7 * 86400


def lease_owner_prefix(epoch: int) -> str:
    """Every lease taken in session `epoch` is owned by an id that starts with this."""
    return f"e{epoch}/"


class LeaseLostError(Exception):
    """The caller's fencing token is no longer the instance's: stop writing."""


@dataclass(frozen=True)
class Claim:
    """An instance leased for one activation (by a host; by the scheduler only to end
    instances whose code cannot load)."""

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
class TokenInfo:
    """An API token as the journal hands it out: never its secret nor the secret's hash.
    `tenant_id` None: an admin token."""

    token_id: str
    tenant_id: str | None
    name: str
    created_at: float
    revoked_at: float | None


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
    # The claim took the event its wait expected into that wait's step (now in `steps`):
    # (step name, count, event type, when the wait began, when the event was taken).
    event_taken: tuple[str, int, str, float, float] | None = None
    # Sleeps the claim found over and recorded so (their steps in `steps` say so):
    # (step name, count, when the sleep began, when the claim ended it).
    sleeps_ended: tuple[tuple[str, int, float, float], ...] = ()


#: The inbox entry `terminate(rollback=True)` leaves for the instance's next activation
#: (a type tenants cannot send: event types have no dots).
TERMINATE_EVENT = "dynwf.terminate"
