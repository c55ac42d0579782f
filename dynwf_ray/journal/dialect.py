"""What differs between SQLite and PostgreSQL, in one place: how the engine connects
(`connect`), SQLite's writer lock on its file and its pragmas (WAL, `BEGIN
IMMEDIATE`), and each dialect's INSERT (for `ON CONFLICT`). The queries themselves
are the same on both; `FOR UPDATE SKIP LOCKED` in claims is PostgreSQL's
(`statements._claim_statement`)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ..errors import InvalidInputError


def sqlite_url_path(url: str) -> str | None:
    prefix = "sqlite:///"
    return url[len(prefix):] if url.startswith(prefix) else None


def connect(url: str, synchronous: str) -> tuple[SAEngine, "_WriterLock", Any]:
    """The engine for a journal URL, the lock its writers take turns on (none for
    PostgreSQL, whose server orders them), and its dialect's `insert`. A URL that is not
    SQLAlchemy's, or names another database, raises InvalidInputError."""
    try:
        backend = make_url(url).get_backend_name() if isinstance(url, str) else None
    except ArgumentError:
        backend = None
    if backend not in ("sqlite", "postgresql"):
        raise InvalidInputError(
            f"database URL {shown_url(url)!r} is not a SQLite or PostgreSQL URL "
            "(sqlite:///path/to/journal.db or postgresql+psycopg://user:password@host/db)")
    if url.startswith("sqlite"):
        from sqlalchemy.dialects.sqlite import insert

        path = sqlite_url_path(url)
        on_disk = path if path and path != ":memory:" else None
        if on_disk:
            os.makedirs(os.path.dirname(os.path.abspath(on_disk)), exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})
        _install_sqlite_pragmas(engine, synchronous)
        return engine, _WriterLock(on_disk), insert
    from sqlalchemy.dialects.postgresql import insert

    engine = create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8)
    return engine, _WriterLock(None), insert


def shown_url(url: Any) -> str:
    """A journal URL as a message may show it: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: say what it was, cut short
        return str(url)[:80]


#: Writers of this process: transactions begun, how many waited for their turn
#: (`_WriterLock`) and for how long, how long they held it and the CPU their threads
#: used meanwhile; and retries of `BEGIN IMMEDIATE` (a writer that does not take the
#: writer lock, e.g. another program, held SQLite's own lock).
_LOCK_STATS = {"lock_begins": 0, "lock_waits": 0, "lock_wait_s": 0.0, "busy_retries": 0,
               "lock_held_s": 0.0, "lock_held_cpu_s": 0.0}


class _WriterLock:
    """Writers of one SQLite file queue here, in the kernel, for their turn.

    SQLite lets one transaction write at a time; a writer that finds the lock taken
    could only retry after a sleep, leaving the file idle meanwhile. Every journal
    writer on this machine (the file cannot be shared beyond it) first takes an
    exclusive `flock` on `<journal>.writers`: waiters sleep without polling and the
    next one starts as soon as the last commits. With group commit each turn carries
    the writes of every activation of its process that queued meanwhile, those queued
    during the wait included (`group_commit.commit_batch`). `_LOCK_STATS` counts the waits,
    how long turns were held and how much of that was the holder's own CPU.
    None (PostgreSQL, an in-memory database): no lock; the database orders writers.
    """

    def __init__(self, path: str | None):
        self._fd = os.open(f"{path}.writers", os.O_RDWR | os.O_CREAT, 0o600) if path else None
        self._threads = threading.Lock()  # flock is per open file, not per thread
        self._held = (0.0, 0.0)  # when the turn was taken, and the thread's CPU then

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
            self._held = (time.monotonic(), time.thread_time())

    def release(self) -> None:
        if self._fd is not None:
            wall, cpu = self._held
            _LOCK_STATS["lock_held_s"] += time.monotonic() - wall
            _LOCK_STATS["lock_held_cpu_s"] += time.thread_time() - cpu
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._threads.release()


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
