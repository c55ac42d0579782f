"""The journal: every durable fact about tenants, code and instances. The only package that talks SQL.

`Journal` is one object (a connection pool and the queries), built from a part
per concern, each a module of its own:
- `code.py`: tenants, their code versions and code, telemetry, policies, retention;
- `instances.py`: instances as the platform sees them (create, read, send events,
  pause, resume, terminate, restart, move, delete, sweep);
- `scheduling.py`: claims, demand, timers, released leases, engine sessions, crashes;
- `writes.py`: what an activation writes, fenced by its lease;
- `log_lines.py`: what tenant code printed;
- `access.py`: who may use the HTTP API (tokens, stored as hashes) and tenants'
  webhook secrets;
- `group_commit.py`: concurrent activations' writes sharing commits;
- `node_writer.py`: on SQLite, one process committing those of every host process
  of the machine;
- `schema.py` (the tables and the records handed out), `statements.py` (SQL built
  once), `dialect.py` (the seam where SQLite and PostgreSQL differ), `faults.py`
  (transactions, and errors that mean the journal cannot be used).
Schema changes are Alembic revisions (`dynwf_ray/migrations/`).

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
- `api_tokens`: the HTTP API's bearer tokens: the SHA-256 of each secret (never
  the secret), its public id, name, tenant (NULL: admin) and when it was revoked.
- `webhook_secrets`: per tenant, the secret its webhooks are signed with.

Each instance also carries its trace identity (`trace_context`: its root
span's W3C traceparent; `trace_caller`: the span that created it), and each
tenant the platform's telemetry setting for it (`telemetry_json`).

Concurrency rule: every transaction that touches an instance starts with its
fence on that instance's row: it matches only while `lease_token` is the
caller's, extends the lease once less than half is left (a step record reads
the row, `SELECT ... FOR UPDATE` on PostgreSQL), and on PostgreSQL locks the
row so `send_event` and a suspending wait cannot miss each other. On SQLite
every write transaction is `BEGIN IMMEDIATE` in WAL mode with
`synchronous=FULL`: one fsync'd commit per group of writes (`group_commit`).

Faults: a database error that says the journal cannot be used now (disk full,
unreachable, read-only, a lock or serialization conflict) is raised as
`JournalUnavailableError` naming its cause, never as the driver's exception; a
transaction that fails leaves nothing written. Each journal's `health`
(`health.py`) follows its writes.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from .. import migrations
from ..errors import JournalSchemaError
from ..health import JournalHealth
from ..types import TERMINAL
from .access import Access, UnknownTokenError
from .code import CodeStore
from .dialect import _LOCK_STATS, connect, sqlite_url_path
from .faults import _Tx, unavailable
from . import node_writer
from .group_commit import ActivationWriteQueue, GroupCommit
from .instances import CREATED_COLUMNS, Instances
from .log_lines import LogLines
from .schema import (
    KEEP_ENDED_SESSIONS, STEP_COMPLETE, STEP_FAILED, STEP_RETRYING, STEP_WAITING,
    TERMINATE_EVENT, ActivationState, Claim, InstanceInfo, LeaseLostError, SessionInfo,
    StepRecord, TokenInfo, lease_owner_prefix,
)
from .schema import S
from .scheduling import Scheduling
from .statements import (
    _BUFFERED, _CLEAR_WAIT, _COMPLETE, _LATEST_VERSION, _CONSUME, _FAIL, _FENCE, _INSERT_EVENT, _INSERT_INSTANCE,
    _LOCK_INSTANCE, _PAUSE, _RECEIVED, _RENEW, _SLEPT, _STEP_FIELDS, _SUSPEND, _TERMINATE, _WAKE_NOW, Prepared,
)
from .writes import ActivationWrites

__all__ = [
    "KEEP_ENDED_SESSIONS", "STEP_COMPLETE", "STEP_FAILED", "STEP_RETRYING", "STEP_WAITING",
    "TERMINAL", "TERMINATE_EVENT", "ActivationState", "Claim", "GroupCommit", "InstanceInfo",
    "Journal", "LeaseLostError", "SessionInfo", "StepRecord", "TokenInfo", "UnknownTokenError",
    "lease_owner_prefix",
    "sqlite_url_path", "unavailable",
]

_TABLE_LOCK = threading.Lock()


class Journal(CodeStore, Instances, Scheduling, ActivationWrites, LogLines, Access):
    """Connection to the journal database plus every query the engine runs."""

    def __init__(self, url: str, *, create_tables: bool = True, synchronous: str = "FULL"):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.health = JournalHealth()
        self.engine, self._writers, dialect_insert = connect(url, synchronous)
        self._dialect_insert = dialect_insert
        self._group: GroupCommit | None = None
        self._node_client: node_writer.NodeWriterClient | None = None
        # Same pool; connections from it begin with BEGIN IMMEDIATE on SQLite.
        self._write_engine = self.engine.execution_options(dynwf_write=True)
        ins = dialect_insert(S)
        self._upsert_step = ins.on_conflict_do_update(
            index_elements=["instance_pk", "name", "seq"],
            set_={
                f: ins.excluded[f] for f in _STEP_FIELDS if f not in ("name", "seq", "started_at")
            },
        )
        # The step path's statements, run on the driver's connection (`Prepared`).
        dialect = self.engine.dialect
        # By statement; statements built per shape (a claim's filters, how many instances
        # it took) are added by key when first run (`_prepare`).
        self._prepared: dict[Any, Prepared] = {
            stmt: Prepared(stmt, dialect)
            for stmt in (_FENCE, _RENEW, _SUSPEND, _COMPLETE, _FAIL, _PAUSE, _TERMINATE,
                         _SLEPT, _CLEAR_WAIT, _BUFFERED, _CONSUME, _RECEIVED, _WAKE_NOW,
                         _LOCK_INSTANCE, _LATEST_VERSION)
        }
        self._prepared_upsert_step = Prepared(self._upsert_step, dialect, ["instance_pk", *_STEP_FIELDS])
        self._prepared_create = Prepared(_INSERT_INSTANCE, dialect, list(CREATED_COLUMNS))
        self._prepared_event = Prepared(
            _INSERT_EVENT, dialect, ["instance_pk", "type", "payload_json", "created_at", "consumed"])
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

    def _prepare(self, key: Any, build: Callable[[], Any]) -> Prepared:
        """The compiled statement kept under `key`, built and compiled at its first use."""
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = Prepared(build(), self.engine.dialect)
        return prepared

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

    # -- group commit ----------------------------------------------------------

    @property
    def grouped(self) -> "ActivationWriteQueue":
        """The same writes, awaitable, group-committed with those of concurrent
        activations: of this process (see `GroupCommit`), or of every process of this
        machine once `write_through_node_writer` found the machine's writer."""
        return self._node_client or self._own_group_commit()

    def _own_group_commit(self) -> GroupCommit:
        if self._group is None:
            with _TABLE_LOCK:
                if self._group is None:
                    self._group = GroupCommit(self)
        return self._group

    def write_through_node_writer(self) -> bool:
        """Send `grouped` writes to this machine's writer for the SQLite file
        (`node_writer`), when there is one; False for a journal that has none."""
        path = node_writer.address(self.url, create=True)
        if path is None:
            return False
        self._node_client = node_writer.NodeWriterClient(self, path)
        return True

    def write_stats(self) -> dict[str, float]:
        """Commits and lock waits of this process (group commit, SQLite's write lock)."""
        group = self._group.stats() if self._group is not None else {}
        if self._node_client is not None:
            group.update(self._node_client.stats())
        return {**group, **{f"sqlite_{k}": v for k, v in _LOCK_STATS.items()}}
