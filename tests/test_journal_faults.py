"""Journal faults without Ray: how database errors are named, how health follows them, and
that a write the journal refuses never becomes the tenant's failure.

The journal is made to refuse writes the way an operator would meet it: read-only
(SQLite's `query_only`; PostgreSQL's `default_transaction_read_only` on the
database) and, on SQLite, full (`max_page_count` at the file's size).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from contextlib import contextmanager

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from dynwf_ray import JournalUnavailableError, WorkflowEntrypoint
from dynwf_ray.activation import activate
from dynwf_ray.health import JournalHealth, backoff, merge
from dynwf_ray.journal import Journal, unavailable

from .conftest import PG_URL
from .driver import Driver

CALLS: dict[str, int] = {}
CAUGHT: list[str] = []
FAULT: list = []  # what the step "a" callback does to the journal (a context manager)


def _wrapped(orig: Exception, kind=sa.exc.OperationalError) -> Exception:
    return kind("INSERT ...", {}, orig)


@pytest.mark.parametrize("error, cause, retryable", [
    (_wrapped(sqlite3.OperationalError("database or disk is full")), "disk full", True),
    (sqlite3.OperationalError("attempt to write a readonly database"), "read-only", True),
    (_wrapped(psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only "
                                                    "transaction"), sa.exc.InternalError),
     "read-only", True),
    (_wrapped(psycopg.OperationalError('connection failed: connection to server at "127.0.0.1", '
                                       "port 1 failed: Connection refused")), "unreachable", True),
    (_wrapped(psycopg.errors.SerializationFailure("could not serialize access")),
     "serialization failure", True),
    (_wrapped(psycopg.errors.DiskFull("could not extend file")), "disk full", True),
    (_wrapped(sqlite3.OperationalError("database is locked")), "locked", True),
    (_wrapped(sqlite3.DatabaseError("database disk image is malformed"), sa.exc.DatabaseError),
     "corrupt", False),
])
def test_database_errors_are_named_by_their_cause(error, cause, retryable):
    named = unavailable(error)
    assert isinstance(named, JournalUnavailableError)
    assert (named.cause, named.retryable) == (cause, retryable)
    assert cause in str(named) and ("may help" in str(named)) == retryable


@pytest.mark.parametrize("error", [
    _wrapped(sqlite3.IntegrityError("UNIQUE constraint failed"), sa.exc.IntegrityError),
    _wrapped(sqlite3.OperationalError("no such table: instances")),  # a bug, not the journal's state
    ValueError("not a database error"),
])
def test_errors_of_the_call_itself_are_not_called_unavailability(error):
    assert unavailable(error) is None


def test_health_logs_each_transition_once_and_counts_every_failure(caplog):
    now = [100.0]
    health = JournalHealth("the journal", level=logging.WARNING, clock=lambda: now[0])
    full = JournalUnavailableError("disk full", "database or disk is full")
    with caplog.at_level(logging.WARNING, logger="dynwf_ray.journal"):
        health.succeeded()
        for _ in range(5):
            now[0] += 1
            health.failed(full)
        assert health.condition() == "journal unavailable: disk full (database or disk is full)"
        now[0] += 10
        health.succeeded()
        health.succeeded()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "failing: disk full" in lines[0] and "work again, after 14.0 s of disk full" in lines[1]
    assert health.snapshot()["failures"] == {"disk full": 5} and health.condition() is None


def test_merged_health_fails_while_any_process_fails():
    ok = {"ok": True, "cause": None, "detail": None, "since": 5.0, "failures": {"locked": 1}}
    full = {"ok": False, "cause": "disk full", "detail": "d", "since": 3.0, "failures": {"disk full": 2}}
    ro = {"ok": False, "cause": "read-only", "detail": "r", "since": 4.0, "failures": {"read-only": 1}}
    merged = merge([ok, ro, full])
    assert (merged["ok"], merged["cause"], merged["since"]) == (False, "disk full", 3.0)
    assert merged["failures"] == {"locked": 1, "disk full": 2, "read-only": 1}
    assert merge([ok])["ok"] is True


def test_retry_backoff_grows_and_is_bounded():
    waits = [backoff(n) for n in range(1, 12)]
    assert 0.5 <= waits[0] <= 1.0 and waits[3] > waits[0] and max(waits) <= 10.5


# -- a journal that refuses writes ------------------------------------------------


@pytest.fixture
def own_journal(make_database_url, backend):
    """A journal of its own (the faults below must not reach other tests' journals)."""
    url = make_database_url()
    journal = Journal(url)
    yield journal
    journal.close()
    if backend == "postgresql":
        _pg_read_only(url, False)


def _pg_read_only(url: str, on: bool) -> None:
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = sa.make_url(url).database
    with admin.connect() as conn:
        setting = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
        conn.execute(sa.text(f'ALTER DATABASE "{name}" {setting}'))
    admin.dispose()


@contextmanager
def _sqlite_pragma(journal: Journal, pragma: str):
    """Every connection of the journal runs `pragma` until the block ends."""
    def on_connect(dbapi_conn, _record):
        dbapi_conn.execute(pragma)

    journal.engine.dispose()  # connections made from now on run it
    event.listen(journal.engine, "connect", on_connect)
    try:
        yield
    finally:
        event.remove(journal.engine, "connect", on_connect)
        journal.engine.dispose()


@contextmanager
def read_only(journal: Journal):
    """The journal refuses every write until the block ends."""
    if journal.is_sqlite:
        with _sqlite_pragma(journal, "PRAGMA query_only=1"):
            yield
        return
    _pg_read_only(journal.url, True)
    journal.engine.dispose()  # new connections begin read-only
    try:
        yield
    finally:
        _pg_read_only(journal.url, False)
        journal.engine.dispose()


def full(journal: Journal):
    """SQLite only: the file may not grow (its page count is capped at its size)."""
    with journal.engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
    return _sqlite_pragma(journal, f"PRAGMA max_page_count={pages}")


class Careful(WorkflowEntrypoint):
    """Catches everything around its steps: a journal fault must still never reach it."""

    async def run(self, event, step):
        def a():
            CALLS["a"] = CALLS.get("a", 0) + 1
            if FAULT:
                FAULT.pop().__enter__()  # the journal fails while this step runs
            return "x" * 20_000  # a result that needs new pages

        def b():
            CALLS["b"] = CALLS.get("b", 0) + 1
            return "b"

        try:
            first = await step.do("a", a)
            second = await step.do("b", b)
        except Exception as exc:  # noqa: BLE001 - what a careless tenant writes
            CAUGHT.append(repr(exc))
            return "swallowed"
        return [len(first), second]


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear(), CAUGHT.clear(), FAULT.clear()
    yield
    FAULT.clear()


@pytest.mark.parametrize("fault", ["read-only", "disk full"])
def test_a_refused_write_abandons_the_activation_never_failing_the_instance(own_journal, tenant, fault):
    journal = own_journal
    if fault == "disk full" and not journal.is_sqlite:
        pytest.skip("a full PostgreSQL is covered by its read-only journal; the file cap is SQLite's")
    d = Driver(journal, tenant, Careful)
    d.binding.create(id="c")
    (claim,) = journal.claim_due(d.now, 1, "host", 30, tenant)
    broken = read_only(journal) if fault == "read-only" else full(journal)
    FAULT.append(broken)
    outcome = asyncio.run(activate(journal, claim.pk, claim.token, Careful, clock=d.clock))
    try:
        assert outcome == "journal_unavailable"
        assert CAUGHT == []  # the tenant's code never saw the journal's error
        info = d.info("c")
        assert info.status == "running" and info.error_name is None  # not errored
        assert d.steps("c") == {}  # nothing of the abandoned attempt was written
        assert journal.health.cause == fault
        assert d.binding.get("c").status()["condition"].startswith(f"journal unavailable: {fault}")
    finally:
        broken.__exit__(None, None, None)
    # The journal works again: the platform releases the instance and it resumes.
    assert journal.release(claim.pk, claim.token, d.now, d.now)
    assert d.tick() == ["complete"]
    assert json.loads(d.info("c").output_json) == [20000, "b"]
    assert (CALLS["a"], CALLS["b"]) == (2, 1)  # the step in flight ran again; nothing else did
    assert sorted(d.steps("c")) == [("a", 1), ("b", 1)]
    assert journal.health.ok and d.binding.get("c").status()["condition"] is None


def test_platform_callers_get_a_named_error_and_nothing_half_written(own_journal, tenant):
    journal = own_journal
    d = Driver(journal, tenant, Careful)
    handle = d.binding.create(id="first")
    before = journal.count_by_status(tenant)
    with read_only(journal):
        with pytest.raises(JournalUnavailableError, match="read-only") as raised:
            d.binding.create(id="second")
        assert raised.value.cause == "read-only" and raised.value.retryable
        with pytest.raises(JournalUnavailableError, match="read-only"):
            d.binding.create_batch([{"id": f"b{i}"} for i in range(5)])
        with pytest.raises(JournalUnavailableError, match="read-only"):
            handle.send_event("go", {"n": 1})
        with pytest.raises(JournalUnavailableError):
            journal.save_code(tenant, "v2", "test", b"", d.now)
        assert handle.status()["condition"].startswith("journal unavailable: read-only")
        assert journal.count_by_status(tenant) == before  # reads still work; nothing was added
    assert d.binding.create(id="second").id == "second"
    assert handle.status()["condition"] is None


def test_an_unreachable_journal_is_named_at_once():
    with pytest.raises(JournalUnavailableError, match="unreachable") as raised:
        Journal("postgresql+psycopg://nobody:x@127.0.0.1:1/none")
    assert raised.value.retryable


def test_the_cli_says_whether_the_journal_can_be_written(own_journal, tenant, monkeypatch, capsys):
    from dynwf_ray import cli

    journal = own_journal
    monkeypatch.setattr(cli, "Journal", lambda url: journal)  # the CLI uses this journal object
    d = Driver(journal, tenant, Careful)
    d.binding.create(id="waits")
    args = ["--database-url", journal.url]
    assert cli.main(["health", *args]) == 1  # writable, but no engine heartbeats
    assert json.loads(capsys.readouterr().out)["journal"] == "ok"
    journal.open_session("eng", "node", "m", [], None, time.time())
    assert cli.main(["health", *args]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ready"] and doc["engines"][0]["engine"] == "eng"
    with read_only(journal):
        assert cli.main(["health", *args]) == 1
        assert json.loads(capsys.readouterr().out)["journal"].startswith("journal unavailable: read-only")
        assert cli.main(["status", "waits", "--tenant", tenant, *args]) == 0
        assert json.loads(capsys.readouterr().out)["condition"].startswith("journal unavailable: read-only")
        assert cli.main(["send-event", "waits", "go", "{}", "--tenant", tenant, *args]) == 2
        assert "the journal is unavailable: read-only" in capsys.readouterr().err
    assert cli.main(["status", "waits", "--tenant", tenant, *args]) == 0
    assert json.loads(capsys.readouterr().out)["condition"] is None


def test_status_is_unknown_while_the_journal_cannot_be_read(tmp_path, tenant):
    home = tmp_path / "journal"
    journal = Journal(f"sqlite:///{home / 'journal.db'}")
    try:
        d = Driver(journal, tenant, Careful)
        handle = d.binding.create(id="u")
        journal.engine.dispose()
        home.rename(tmp_path / "gone")  # the file is not where the journal looks any more
        status = handle.status()
        assert status["status"] == "unknown" and status["version"] is None
        assert status["condition"].startswith("journal unavailable: unreachable (unable to open")
        (tmp_path / "gone").rename(home)
        assert handle.status()["status"] == "queued"
    finally:
        journal.close()


def test_transient_faults_are_tried_again_and_others_are_not():
    from dynwf_ray.journal.faults import retried

    calls = {"locked": 0, "full": 0}

    @retried
    def locked_twice():
        calls["locked"] += 1
        if calls["locked"] <= 2:
            raise JournalUnavailableError("locked", "database is locked")
        return "written"

    @retried
    def full():
        calls["full"] += 1
        raise JournalUnavailableError("disk full", "database or disk is full")

    @retried
    def always_locked():
        calls["always"] = calls.get("always", 0) + 1
        raise JournalUnavailableError("locked", "database is locked")

    assert locked_twice() == "written" and calls["locked"] == 3
    with pytest.raises(JournalUnavailableError, match="locked"):
        always_locked()
    assert calls["always"] == 4  # then the caller hears
    with pytest.raises(JournalUnavailableError, match="disk full"):
        full()
    assert calls["full"] == 1  # not transient: the caller hears at once


def test_a_group_commit_that_meets_a_transient_fault_commits_on_the_next_try(journal, tenant):
    tries = []

    def flaky(conn):
        tries.append(1)
        if len(tries) == 1:
            raise JournalUnavailableError("serialization failure", "could not serialize access")
        return "ok"

    async def submit():
        return await journal.grouped._enqueue(flaky, ())

    assert asyncio.run(submit()) == "ok" and len(tries) == 2
