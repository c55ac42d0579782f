"""SQL statements the hot paths run, built once (bind parameters are prefixed with b_),
and `Prepared`: the activation path's statements, compiled once for the journal's dialect."""

from __future__ import annotations

from typing import Any, Mapping

from ..types import InstanceStatus


from sqlalchemy import (
    Integer,
    bindparam,
    and_,
    case,
    exists,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Dialect

from .schema import (STEP_COMPLETE, TERMINATE_EVENT, I, S, E, L, T, X, InstanceInfo, StepRecord)


class Prepared:
    """A statement compiled once for a dialect, run on the driver's own connection.

    A step's write is a handful of small statements, each run thousands of times a
    second by one writer thread that holds the journal's write lock meanwhile. Through
    SQLAlchemy each execution paid for its events, its compiled-cache lookup and a
    result object: about 20 us of Python, five times what SQLite spent on the statement.
    `run` executes the compiled text on the connection's driver connection, inside the
    transaction the caller began (`_Tx`), and returns the driver's cursor. Values the
    statement holds (a status, a None) are converted for the driver once, here; the
    parameters given to `run` (the b_ ones, or an insert's columns) on each call, by the
    same type processors SQLAlchemy would use. A driver's error is what `faults.unavailable`
    already reads, as it reads SQLAlchemy's."""

    __slots__ = ("sql", "_names", "_fixed", "_process", "_dialect", "_types", "_convert")

    def __init__(self, stmt: Any, dialect: Dialect, column_keys: list[str] | None = None):
        compiled = stmt.compile(dialect=dialect, column_keys=column_keys)
        self._dialect = dialect
        self._types = [c.type.dialect_impl(dialect) for c in getattr(stmt, "exported_columns", ())]
        self._convert: list[tuple[int, Any]] | None = None
        if compiled.insert_prefetch or compiled.update_prefetch:  # SQLAlchemy would fill them
            raise ValueError(f"a column default is computed when {compiled.string!r} runs")
        self.sql = compiled.string
        self._names = compiled.positiontup  # SQLite's ? marks in order; None: named (psycopg)
        self._fixed: dict[str, Any] = {}
        self._process: dict[str, Any] = {}
        for bind, name in compiled.bind_names.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:
                if process is not None:
                    self._process[name] = process
            else:
                value = bind.effective_value
                self._fixed[name] = process(value) if process is not None else value

    def run(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        values = {**self._fixed, **params}
        for name, process in self._process.items():
            values[name] = process(values[name])
        args = values if self._names is None else [values[name] for name in self._names]
        return conn.connection.driver_connection.execute(self.sql, args)

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """`run`, then every row it returned, its values converted as SQLAlchemy would
        (SQLite gives a boolean as 0 or 1). The converters depend on the types the driver
        reports (PostgreSQL's numeric ones do), so they are chosen at the first run."""
        cursor = self.run(conn, params)
        rows = cursor.fetchall()
        if self._convert is None:
            found = [t.result_processor(self._dialect, d[1]) for t, d in zip(self._types, cursor.description)]
            self._convert = [(i, f) for i, f in enumerate(found) if f is not None]
        if not self._convert:
            return rows
        converted = []
        for row in rows:
            row = list(row)
            for i, convert in self._convert:
                row[i] = convert(row[i])
            converted.append(row)
        return converted


_INFO_COLS = [getattr(I.c, f) for f in InstanceInfo.__dataclass_fields__]
_STEP_COLS = [getattr(S.c, f) for f in StepRecord.__dataclass_fields__ if f != "instance_pk"]
_STEP_FIELDS = tuple(StepRecord.__dataclass_fields__)

# The step path runs these once per step: build them once (bind parameters are
# prefixed with b_ because UPDATE reserves the column names for its SET clause).
_HELD = (
    I.c.pk == bindparam("b_pk"), I.c.lease_token == bindparam("b_token"),
    I.c.lease_expires_at.is_not(None),  # held: not given up by a suspend or finish
)
# A step's write: the token must still be ours, read with the row locked until commit
# (FOR UPDATE on PostgreSQL; SQLite's writer holds the whole file). A read, not an update:
# the row and its indexes are written only when the lease must be extended (`_RENEW`,
# once less than half of it is left; the host renews its leases every third of it).
# `updated_at` tracks status changes, not steps.
_FENCE = (
    select(I.c.pause_requested, I.c.lease_expires_at)
    .where(*_HELD)
    .with_for_update()
)
# A fence that extends the lease (less than half of it left) and the host's periodic
# renewal of its activations' leases.
_RENEW = (
    update(I)
    .where(*_HELD)
    .values(lease_expires_at=bindparam("b_until"))
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
# The same, of one code version's instances (what its host waits for).
_OF_VERSION = (I.c.tenant_id == bindparam("b_tenant"), I.c.code_version == bindparam("b_version"))
_NEXT_TIMER_OF = _NEXT_TIMER.where(*_OF_VERSION)
_NEXT_LEASE_EXPIRY_OF = _NEXT_LEASE_EXPIRY.where(*_OF_VERSION)
_FENCED = and_(I.c.pk == bindparam("b_pk"), I.c.lease_token == bindparam("b_token"))


def _activation_extras(pk: Any) -> tuple:
    """What an activation starts from besides the instance's row: its count of
    activations that crashed in a row, and whether a termination is pending (`pk`: the
    instance's pk, a column or a bind). Read with the row, by `_LOAD_INSTANCE` and by
    the claim's RETURNING; `_starting` reads them back."""
    return (select(X.c.crashes).where(X.c.instance_pk == pk).scalar_subquery(),
            exists().where(E.c.instance_pk == pk, E.c.type == TERMINATE_EVENT))


def _starting(row: Any) -> tuple[InstanceInfo, int, bool]:
    """A row of `_INFO_COLS` then `_activation_extras`: the instance, its crash count,
    whether it is being terminated."""
    n = len(_INFO_COLS)
    return InstanceInfo(*row[:n]), row[n] or 0, bool(row[n + 1])


_LOAD_INSTANCE = select(*_INFO_COLS, *_activation_extras(bindparam("b_pk"))).where(
    I.c.pk == bindparam("b_pk"))
_LOAD_STEPS = select(*_STEP_COLS).where(S.c.instance_pk == bindparam("b_pk"))
# What `create` runs, in one transaction: the tenant's newest code, then the insert.
_LATEST_VERSION = select(T.c.latest_version).where(T.c.tenant_id == bindparam("b_tenant"))
_INSERT_INSTANCE = insert(I)
# A caller's reads and writes of one instance (status, send_event, pause, ...).
_ONE_INSTANCE = (I.c.tenant_id == bindparam("b_tenant"), I.c.instance_id == bindparam("b_instance"))
_GET_INSTANCE = select(*_INFO_COLS).where(*_ONE_INSTANCE)
# A caller's write to an instance starts by touching its row: on PostgreSQL that takes
# the row's lock for the transaction (it changes nothing); it returns the row.
_LOCK_INSTANCE = update(I).where(*_ONE_INSTANCE).values(updated_at=I.c.updated_at).returning(*_INFO_COLS)
_INSERT_EVENT = insert(E)
_LOAD_ROLLBACKS = (
    select(*_STEP_COLS).where(S.c.instance_pk == bindparam("b_pk"), S.c.kind == "rollback")
    .order_by(S.c.started_at)
)
_LAST_LINE = (
    select(L.c.message).where(L.c.instance_pk == bindparam("b_pk"), L.c.stream == bindparam("b_stream"))
    .order_by(L.c.pk.desc()).limit(1)
)


def _steps_of(n: int) -> Any:
    """The steps of the `n` instances a claim took (`b_pk0`, `b_pk1`, ...: their pks): a
    statement per count, so that each can be compiled once (`Prepared`)."""
    pks = [bindparam(f"b_pk{i}", type_=Integer) for i in range(n)]
    return select(S.c.instance_pk, *_STEP_COLS).where(S.c.instance_pk.in_(pks))


_CLEAR_WAIT = update(I).where(I.c.pk == bindparam("b_pk"), I.c.waiting_for.is_not(None)).values(
    waiting_for=None)
_SUSPEND = (
    update(I)
    .where(_FENCED)
    .values(
        status=case((I.c.pause_requested, InstanceStatus.paused), else_=InstanceStatus.waiting),
        wake_at=case((I.c.pause_requested, None), else_=bindparam("b_wake_at")),
        waiting_for=bindparam("b_waiting_for"),
        lease_expires_at=None, lease_owner=None, updated_at=bindparam("b_now"),
    )
)
# The oldest event of a type buffered for an instance, and what takes it into a wait.
_BUFFERED = (
    select(E.c.pk, E.c.payload_json, E.c.created_at)
    .where(
        E.c.instance_pk == bindparam("b_pk"), E.c.type == bindparam("b_type"),
        E.c.consumed.is_(False),
    )
    .order_by(E.c.pk)
    .limit(1)
)
_CONSUME = update(E).where(E.c.pk == bindparam("b_event")).values(consumed=True)
_ONE_STEP = (
    S.c.instance_pk == bindparam("b_pk"), S.c.name == bindparam("b_name"),
    S.c.seq == bindparam("b_seq"),
)
_RECEIVED = update(S).where(*_ONE_STEP).values(
    status=STEP_COMPLETE, result_json=bindparam("b_result"), finished_at=bindparam("b_now"))
_SLEPT = update(S).where(*_ONE_STEP).values(finished_at=bindparam("b_now"))
_WAKE_NOW = (
    update(I)
    .where(I.c.pk == bindparam("b_pk"), I.c.status == InstanceStatus.waiting)
    .values(wake_at=bindparam("b_now"))
)
_FINISHED = dict(
    wake_at=None, waiting_for=None, lease_expires_at=None, lease_owner=None,
    pause_requested=False, updated_at=bindparam("b_now"),
)
_COMPLETE = update(I).where(_FENCED).values(
    status=InstanceStatus.complete, output_json=bindparam("b_output"), **_FINISHED
)
_FAIL = update(I).where(_FENCED).values(
    status=InstanceStatus.errored, error_name=bindparam("b_error_name"),
    error_message=bindparam("b_error_message"), **_FINISHED
)
_PAUSE = update(I).where(_FENCED).values(status=InstanceStatus.paused, **_FINISHED)
_TERMINATE = update(I).where(_FENCED).values(status=InstanceStatus.terminated, **_FINISHED)


# The claimed row's pk inside a subquery of RETURNING, named with its table: SQLite's
# RETURNING names columns bare, and a bare `pk` there would be the events table's own.
_CLAIMED_PK = literal_column(f"{I.name}.pk")


def _claim_statement(by_tenant: bool, by_version: bool, skip_locked: bool):
    # `waiting_for` is left as it is: claim_and_load reads it to take the awaited event,
    # then clears it (`scheduling._clear_waits`), as claim_due does at once.
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
            status=case((I.c.pause_requested, InstanceStatus.waitingForPause), else_=InstanceStatus.running),
            activations=I.c.activations + 1,
            updated_at=now,
        )
        # Each claimed row as it is now, its crash count and whether it is being
        # terminated: what its activation starts from, without reading it again.
        .returning(*_INFO_COLS, *_activation_extras(_CLAIMED_PK))
    )
