"""Transactions, and database errors that mean the journal cannot be used: `_Tx` turns
them into `JournalUnavailableError` naming the cause (`unavailable`), and `retried`
tries a call again when the cause is transient (a lock, a serialization failure)."""

from __future__ import annotations

import functools
import random
import sqlite3
import time
from typing import Callable, ParamSpec, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine as SAEngine
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from ..errors import JournalUnavailableError
from ..health import JournalHealth
from .dialect import _WriterLock

P = ParamSpec("P")
R = TypeVar("R")


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


#: Causes that a moment's wait usually clears: another writer held the lock, the
#: database chose this transaction to abort, the pool had no connection free.
TRANSIENT = frozenset({"locked", "serialization failure", "busy"})


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, JournalUnavailableError) and exc.cause in TRANSIENT


#: The tries after the first: 3 more, 20 then 40 ms apart (doubling, at most 200 ms),
#: with jitter.
_AFTER_THE_FIRST = retry(
    retry=retry_if_exception(_transient),
    stop=stop_after_attempt(3),
    wait=wait_exponential_jitter(multiplier=0.02, max=0.2, jitter=0.01),
    reraise=True,
)


def retried(fn: Callable[P, R]) -> Callable[P, R]:
    """Retry a journal call that failed for a transient cause: 4 tries in all, about
    10, 20 and 40 ms apart (with jitter); then the error goes to the caller. Each try
    is a transaction of its own that rolled back, so trying again is safe.

    The first try is a plain call and only a failure goes to tenacity's policy: its
    bookkeeping (a copy of the policy, a call state, a future) cost the group-commit
    writer about a quarter of its time, paid on every commit."""
    again = _AFTER_THE_FIRST(fn)

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except JournalUnavailableError as exc:
            if not _transient(exc):
                raise
        time.sleep(0.01 + random.uniform(0, 0.01))
        return again(*args, **kwargs)

    return call
