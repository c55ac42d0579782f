"""Schema migrations (`dynwf_ray/migrations/`): a journal made by the first schema dynwf-ray
shipped, with instances in flight as that code wrote them, is upgraded in place when today's
`Journal` opens it, and its instances finish under today's code. Also: every revision's
schema, journals made before revisions existed (by `create_all`), a journal at the head left
alone, a newer one refused, concurrent upgraders, and `dynwf db`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from ray import cloudpickle
from sqlmodel import SQLModel

from dynwf_ray import JournalSchemaError, WorkflowEntrypoint
from dynwf_ray import migrations
from dynwf_ray.cli import main
from dynwf_ray.journal import _LOCK_STATS, Journal

from .conftest import wait_status
from .driver import Driver
from .workflows import Approval, Hello

HEAD = migrations.HEAD

# The first schema dynwf-ray shipped: what `SQLModel.metadata.create_all` emitted for the
# models of commit 7e6a8fc ("Engine core"), frozen here (made with `git show
# 7e6a8fc:dynwf_ray/journal.py`), so that these tests build an old journal without git and
# without the baseline revision they check.
FIRST_SCHEMA = {
    "sqlite": """
CREATE TABLE code_versions (
	tenant_id VARCHAR(100) NOT NULL,
	version VARCHAR(80) NOT NULL,
	kind VARCHAR NOT NULL,
	blob BLOB NOT NULL,
	created_at FLOAT NOT NULL,
	PRIMARY KEY (tenant_id, version)
);
CREATE TABLE events (
	pk INTEGER NOT NULL,
	instance_pk INTEGER NOT NULL,
	type VARCHAR(100) NOT NULL,
	payload_json VARCHAR NOT NULL,
	created_at FLOAT NOT NULL,
	consumed BOOLEAN NOT NULL,
	PRIMARY KEY (pk)
);
CREATE INDEX ix_events_inbox ON events (instance_pk, type, consumed, pk);
CREATE TABLE instances (
	pk INTEGER NOT NULL,
	tenant_id VARCHAR(100) NOT NULL,
	instance_id VARCHAR(100) NOT NULL,
	code_version VARCHAR NOT NULL,
	metadata_json VARCHAR NOT NULL,
	params_json VARCHAR NOT NULL,
	status VARCHAR NOT NULL,
	output_json VARCHAR,
	error_name VARCHAR,
	error_message VARCHAR,
	created_at FLOAT NOT NULL,
	updated_at FLOAT NOT NULL,
	wake_at FLOAT,
	waiting_for VARCHAR,
	pause_requested BOOLEAN NOT NULL,
	lease_token INTEGER NOT NULL,
	lease_owner VARCHAR,
	lease_expires_at FLOAT,
	activations INTEGER NOT NULL,
	PRIMARY KEY (pk),
	CONSTRAINT uq_instances_tenant_instance UNIQUE (tenant_id, instance_id)
);
CREATE INDEX ix_instances_status ON instances (status);
CREATE INDEX ix_instances_wake_at ON instances (wake_at);
CREATE TABLE steps (
	instance_pk INTEGER NOT NULL,
	name VARCHAR(256) NOT NULL,
	seq INTEGER NOT NULL,
	status VARCHAR NOT NULL,
	result_json VARCHAR,
	error_name VARCHAR,
	error_message VARCHAR,
	attempts INTEGER NOT NULL,
	next_attempt_at FLOAT,
	started_at FLOAT NOT NULL,
	finished_at FLOAT,
	PRIMARY KEY (instance_pk, name, seq)
);
CREATE TABLE tenants (
	tenant_id VARCHAR(100) NOT NULL,
	latest_version VARCHAR,
	updated_at FLOAT NOT NULL,
	PRIMARY KEY (tenant_id)
);
""",
    "postgresql": """
CREATE TABLE code_versions (
	tenant_id VARCHAR(100) NOT NULL,
	version VARCHAR(80) NOT NULL,
	kind VARCHAR NOT NULL,
	blob BYTEA NOT NULL,
	created_at FLOAT NOT NULL,
	PRIMARY KEY (tenant_id, version)
);
CREATE TABLE events (
	pk SERIAL NOT NULL,
	instance_pk INTEGER NOT NULL,
	type VARCHAR(100) NOT NULL,
	payload_json VARCHAR NOT NULL,
	created_at FLOAT NOT NULL,
	consumed BOOLEAN NOT NULL,
	PRIMARY KEY (pk)
);
CREATE INDEX ix_events_inbox ON events (instance_pk, type, consumed, pk);
CREATE TABLE instances (
	pk SERIAL NOT NULL,
	tenant_id VARCHAR(100) NOT NULL,
	instance_id VARCHAR(100) NOT NULL,
	code_version VARCHAR NOT NULL,
	metadata_json VARCHAR NOT NULL,
	params_json VARCHAR NOT NULL,
	status VARCHAR NOT NULL,
	output_json VARCHAR,
	error_name VARCHAR,
	error_message VARCHAR,
	created_at FLOAT NOT NULL,
	updated_at FLOAT NOT NULL,
	wake_at FLOAT,
	waiting_for VARCHAR,
	pause_requested BOOLEAN NOT NULL,
	lease_token INTEGER NOT NULL,
	lease_owner VARCHAR,
	lease_expires_at FLOAT,
	activations INTEGER NOT NULL,
	PRIMARY KEY (pk),
	CONSTRAINT uq_instances_tenant_instance UNIQUE (tenant_id, instance_id)
);
CREATE INDEX ix_instances_status ON instances (status);
CREATE INDEX ix_instances_wake_at ON instances (wake_at);
CREATE TABLE steps (
	instance_pk INTEGER NOT NULL,
	name VARCHAR(256) NOT NULL,
	seq INTEGER NOT NULL,
	status VARCHAR NOT NULL,
	result_json VARCHAR,
	error_name VARCHAR,
	error_message VARCHAR,
	attempts INTEGER NOT NULL,
	next_attempt_at FLOAT,
	started_at FLOAT NOT NULL,
	finished_at FLOAT,
	PRIMARY KEY (instance_pk, name, seq)
);
CREATE TABLE tenants (
	tenant_id VARCHAR(100) NOT NULL,
	latest_version VARCHAR,
	updated_at FLOAT NOT NULL,
	PRIMARY KEY (tenant_id)
);
""",
}


def _engine_for(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


@contextmanager
def _connect(url: str):
    engine = _engine_for(url)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def first_schema_journal(url: str, backend: str) -> None:
    """An empty journal as the first dynwf-ray made it."""
    with _connect(url) as conn:
        for statement in FIRST_SCHEMA[backend].split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)


def schema(url: str) -> dict:
    """Tables, columns (name, type, nullable, default), indexes, keys: to compare schemas."""
    engine = _engine_for(url)
    try:
        inspector = sa.inspect(engine)
        tables = {}
        for name in inspector.get_table_names():
            if name == migrations.VERSION_TABLE:
                continue
            columns = sorted(
                (c["name"], str(c["type"]), c["nullable"],
                 None if "nextval" in str(c.get("default")) else c.get("default"))
                for c in inspector.get_columns(name)
            )
            indexes = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                             for i in inspector.get_indexes(name))
            uniques = sorted((u["name"], tuple(u["column_names"]))
                             for u in inspector.get_unique_constraints(name))
            primary = tuple(inspector.get_pk_constraint(name)["constrained_columns"])
            tables[name] = (columns, indexes, uniques, primary)
        return tables
    finally:
        engine.dispose()


def differences(url: str) -> list:
    """What Alembic's autogenerate finds between the journal and the models (none: equal)."""
    engine = _engine_for(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()


def state(url: str) -> migrations.SchemaState:
    engine = _engine_for(url)
    try:
        with engine.connect() as conn:
            return migrations.read_state(conn)
    finally:
        engine.dispose()


def upgrade_to(url: str, revision: str) -> None:
    """Run the revisions up to `revision` on an empty database (no detection, no lock)."""
    with _connect(url) as conn:
        command.upgrade(migrations.alembic_config(conn), revision)


@contextmanager
def statements():
    """Every SQL statement any engine of this process sends meanwhile."""
    seen: list[str] = []

    def record(conn, cursor, statement, params, context, executemany):  # noqa: ANN001
        seen.append(" ".join(statement.split()))

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)


def _ddl(seen: list[str]) -> list[str]:
    return [s for s in seen if s.split()[0].upper() in ("CREATE", "ALTER", "DROP", "INSERT",
                                                        "UPDATE", "DELETE")]


# -- the revisions -----------------------------------------------------------------


def test_the_revisions_are_listed_oldest_first_ending_at_the_head():
    script = ScriptDirectory(migrations.SCRIPT_LOCATION)
    walked = [s.revision for s in script.walk_revisions("base", "heads")][::-1]
    assert walked == list(migrations.KNOWN)
    assert script.get_heads() == [HEAD]
    assert all(len(rev) <= 32 for rev in walked)  # alembic_version.version_num is VARCHAR(32)


def test_the_baseline_revision_is_the_first_shipped_schema(make_database_url, backend):
    made_by_revision, made_by_old_code = make_database_url(), make_database_url()
    upgrade_to(made_by_revision, "0001_baseline")
    first_schema_journal(made_by_old_code, backend)
    assert schema(made_by_revision) == schema(made_by_old_code)
    assert state(made_by_old_code) == migrations.SchemaState(None, "0001_baseline")


def test_a_new_journal_gets_every_revision_and_matches_the_models(make_database_url):
    url = make_database_url()
    assert state(url).empty
    with statements() as seen:
        Journal(url).close()
    assert state(url) == migrations.SchemaState(HEAD)
    assert differences(url) == []
    ran = [s for s in seen if s.upper().startswith("UPDATE ALEMBIC_VERSION")]
    assert len(ran) == len(migrations.KNOWN) - 1  # one per revision after the first


@pytest.mark.parametrize("revision", migrations.KNOWN)
def test_a_journal_made_before_revisions_is_stamped_at_the_revision_it_has(
    make_database_url, backend, revision
):
    """As `create_all` of the code of each revision made it: recognised, stamped, upgraded,
    its rows kept. (A data revision is never recognised: such a journal always runs it.)"""
    schema_revisions = [rev for rev, present in migrations.REVISIONS if present is not None]
    expected = [rev for rev in schema_revisions if rev <= revision][-1]
    if backend == "postgresql" and expected == "0012_api_access":
        expected = "0013_instances_autoincrement"  # it changes nothing there: had with 0012
    url = make_database_url()
    upgrade_to(url, revision)
    with _connect(url) as conn:
        conn.exec_driver_sql(f"DROP TABLE {migrations.VERSION_TABLE}")
        conn.exec_driver_sql("INSERT INTO tenants (tenant_id, latest_version, updated_at) "
                             "VALUES ('kept', 'v-1', 1.0)")
    before = schema(url)
    assert state(url) == migrations.SchemaState(None, expected)
    with statements() as seen:
        Journal(url).close()
    assert state(url).at_head and differences(url) == []
    with _connect(url) as conn:
        assert conn.exec_driver_sql("SELECT latest_version FROM tenants").scalar() == "v-1"
    if expected == schema_revisions[-1]:  # stamped, nothing else
        assert schema(url) == before
        assert all("alembic_version" in s for s in _ddl(seen)), _ddl(seen)


def test_a_journal_at_an_older_revision_is_upgraded_in_place(make_database_url, capsys):
    url = make_database_url()
    upgrade_to(url, "0006_tracing")
    with _connect(url) as conn:
        conn.exec_driver_sql("INSERT INTO tenants (tenant_id, latest_version, updated_at) "
                             "VALUES ('kept', 'v-1', 1.0)")
    assert state(url) == migrations.SchemaState("0006_tracing")
    assert main(["db", "current", "--database-url", url]) == 0
    assert capsys.readouterr().out == f"0006_tracing (head is {HEAD}: `dynwf db upgrade` upgrades it)\n"
    Journal(url).close()
    assert state(url).at_head and differences(url) == []
    with _connect(url) as conn:
        assert conn.exec_driver_sql("SELECT latest_version FROM tenants").scalar() == "v-1"


def test_todays_journals_made_by_create_all_are_stamped_not_recreated(make_database_url):
    url = make_database_url()
    engine = _engine_for(url)
    SQLModel.metadata.create_all(engine)  # what Journal(url) did before revisions
    engine.dispose()
    assert state(url) == migrations.SchemaState(None, HEAD)  # 0011 (data) passed over: see REVISIONS
    with statements() as seen:
        Journal(url).close()
    assert all("alembic_version" in s for s in _ddl(seen)), _ddl(seen)
    assert state(url).at_head and differences(url) == []


def test_a_first_schema_journal_the_previous_release_refused_is_upgraded(make_database_url, backend):
    """The previous release's create_all made its newer tables, then refused the journal for
    its old columns (and never made its indexes): the revisions skip what exists."""
    url = make_database_url()
    first_schema_journal(url, backend)
    engine = _engine_for(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    assert state(url) == migrations.SchemaState(None, "0001_baseline")
    Journal(url).close()
    assert state(url).at_head and differences(url) == []


# -- instances in flight under the first schema ------------------------------------------


T0 = 1_000_000.0  # the Driver's clock


class Order(WorkflowEntrypoint):
    """The workflow the old instances below were running."""

    async def run(self, event, step):
        a = await step.do("a", lambda: "new a")
        charged = await step.do(
            "charge", lambda ctx: f"charged on attempt {ctx.attempt}",
            retries={"limit": 3, "delay": "5 seconds", "backoff": "constant"},
        )
        await step.sleep("nap", "60 seconds")
        got = await step.wait_for_event("approval", type="approval", timeout="1 hour")
        return {"a": a, "charged": charged, "by": got.payload["by"], "id": event.instance_id}


def _old_instance(conn, tenant: str, iid: str, status: str, *, wake_at, waiting_for=None,
                  lease=(0, None, None), activations=0, output=None, params="{}",
                  version="v-0123456789abcdef", t0=T0) -> int:
    """An `instances` row as the first code wrote it (its columns only)."""
    token, owner, expires = lease
    conn.execute(sa.text(
        "INSERT INTO instances (tenant_id, instance_id, code_version, metadata_json, params_json,"
        " status, output_json, error_name, error_message, created_at, updated_at, wake_at,"
        " waiting_for, pause_requested, lease_token, lease_owner, lease_expires_at, activations)"
        " VALUES (:t, :i, :version, :meta, :params, :status, :output, NULL, NULL,"
        " :created, :updated, :wake, :waiting, :paused, :token, :owner, :expires, :activations)"
    ), dict(t=tenant, i=iid, version=version, params=params, status=status, output=output,
            wake=wake_at, waiting=waiting_for,
            meta=json.dumps({"tenant_id": tenant, "code_version": version}),
            created=t0 - 300, updated=t0 - 60, paused=False, token=token, owner=owner,
            expires=expires, activations=activations))
    return conn.execute(sa.text("SELECT pk FROM instances WHERE instance_id = :i"), {"i": iid}).scalar()


def _old_step(conn, pk: int, name: str, status: str, attempts: int, result=None, *, error=None,
              next_attempt_at=None, finished=True, t0=T0) -> None:
    """A `steps` row as the first code wrote it (no kind: a sleep or wait has 0 attempts)."""
    conn.execute(sa.text(
        "INSERT INTO steps (instance_pk, name, seq, status, result_json, error_name, error_message,"
        " attempts, next_attempt_at, started_at, finished_at)"
        " VALUES (:pk, :name, 1, :status, :result, :ename, :emsg, :attempts, :next, :started, :finished)"
    ), dict(pk=pk, name=name, status=status, result=None if result is None else json.dumps(result),
            ename=error and "RuntimeError", emsg=error, attempts=attempts, next=next_attempt_at,
            started=t0 - 200, finished=t0 - 199 if finished else None))


def _old_code(conn, tenant: str, cls: type, now: float) -> str:
    """A class registered as the first code stored it: cloudpickled, v-<16 hex digits>."""
    blob = cloudpickle.dumps(cls)
    version = "v-" + hashlib.sha256(blob).hexdigest()[:16]
    conn.execute(sa.text(
        "INSERT INTO code_versions (tenant_id, version, kind, blob, created_at)"
        " VALUES (:t, :v, 'pickled-class', :blob, :now)"
    ), dict(t=tenant, v=version, blob=blob, now=now))
    conn.execute(sa.text("DELETE FROM tenants WHERE tenant_id = :t"), dict(t=tenant))
    conn.execute(sa.text("INSERT INTO tenants (tenant_id, latest_version, updated_at)"
                         " VALUES (:t, :v, :now)"), dict(t=tenant, v=version, now=now))
    return version


def _old_event(conn, pk: int, by: str, consumed: bool, at: float) -> None:
    conn.execute(sa.text(
        "INSERT INTO events (instance_pk, type, payload_json, created_at, consumed)"
        " VALUES (:pk, 'approval', :payload, :at, :consumed)"
    ), dict(pk=pk, payload=json.dumps({"by": by}), at=at, consumed=consumed))


def old_orders(url: str, backend: str, tenant: str) -> None:
    """A first-schema journal with instances of `Order` at every kind of point in flight."""
    first_schema_journal(url, backend)
    with _connect(url) as conn:
        conn.execute(sa.text(
            "INSERT INTO code_versions (tenant_id, version, kind, blob, created_at)"
            " VALUES (:t, 'v-0123456789abcdef', 'pickled-class', :blob, :now)"
        ), dict(t=tenant, blob=cloudpickle.dumps(Order), now=T0 - 400))
        conn.execute(sa.text("INSERT INTO tenants (tenant_id, latest_version, updated_at)"
                             " VALUES (:t, 'v-0123456789abcdef', :now)"), dict(t=tenant, now=T0 - 400))
        _old_instance(conn, tenant, "queued", "queued", wake_at=T0 - 1)
        # mid-way: its activation's process died holding the lease, which has expired since
        pk = _old_instance(conn, tenant, "midway", "running", wake_at=T0 - 40,
                           lease=(1, "scheduler", T0 - 5), activations=1)
        _old_step(conn, pk, "a", "complete", 1, "old a")
        # a failed attempt, the next one due in 5 s
        pk = _old_instance(conn, tenant, "retrying", "waiting", wake_at=T0 + 5, activations=1)
        _old_step(conn, pk, "a", "complete", 1, "old a")
        _old_step(conn, pk, "charge", "retrying", 1, error="card declined",
                  next_attempt_at=T0 + 5, finished=False)
        # sleeping for another 60 s
        pk = _old_instance(conn, tenant, "sleeping", "waiting", wake_at=T0 + 60, activations=1)
        _old_step(conn, pk, "a", "complete", 1, "old a")
        _old_step(conn, pk, "charge", "complete", 1, "old charge")
        _old_step(conn, pk, "nap", "complete", 0, T0 + 60)
        # waiting for an event; and one whose event came before the upgrade
        for iid in ("waiting", "event-sent"):
            pk = _old_instance(conn, tenant, iid, "waiting", wake_at=T0 if iid == "event-sent" else T0 + 3500,
                               waiting_for="approval", activations=2)
            _old_step(conn, pk, "a", "complete", 1, "old a")
            _old_step(conn, pk, "charge", "complete", 1, "old charge")
            _old_step(conn, pk, "nap", "complete", 0, T0 - 100)
            _old_step(conn, pk, "approval", "waiting", 0, T0 + 3500, finished=False)
        _old_event(conn, pk, "old code", False, T0 - 10)
        # finished: its wait received an event, another timed out
        pk = _old_instance(conn, tenant, "done", "complete", wake_at=None, activations=3,
                           output=json.dumps({"done": True}))
        _old_step(conn, pk, "a", "complete", 1, "old a")
        _old_step(conn, pk, "nap", "complete", 0, T0 - 150)
        _old_step(conn, pk, "approval", "complete", 0,
                  {"type": "approval", "payload": {"by": "x"}, "timestamp": T0 - 120})
        _old_step(conn, pk, "late", "failed", 0, error="no 'late' event within 60 s")
        _old_event(conn, pk, "x", True, T0 - 120)


def test_instances_in_flight_under_the_first_schema_finish_after_the_upgrade(
    make_database_url, backend, tenant
):
    url = make_database_url()
    old_orders(url, backend, tenant)
    assert state(url) == migrations.SchemaState(None, "0001_baseline")

    journal = Journal(url)  # upgrades
    try:
        assert journal.check_schema() == HEAD
        assert differences(url) == []
        # the code moved to code_blobs, with the modules its sandbox imports; the old steps
        # have the kinds they had
        assert journal.get_code(tenant, "v-0123456789abcdef") == (
            "pickled-class", cloudpickle.dumps(Order), '{"modules": ["tests"]}')
        assert [v for v, _, _ in journal.list_versions(tenant)] == ["v-0123456789abcdef"]
        done = {s.name: s.kind for s in journal.list_steps(journal.get_instance(tenant, "done").pk)}
        assert done == {"a": "do", "nap": "sleep", "approval": "wait", "late": "wait"}
        retrying = journal.list_steps(journal.get_instance(tenant, "retrying").pk)
        assert [s.kind for s in retrying] == ["do", "do"]

        d = Driver(journal, tenant, Order)
        d.now = T0
        status = lambda iid: d.info(iid).status  # noqa: E731
        d.tick()  # queued, mid-way (its lease expired) and event-sent are due
        assert status("event-sent") == "complete"
        assert status("queued") == status("midway") == "waiting"
        assert status("retrying") == status("sleeping") == status("waiting") == "waiting"
        for iid in ("queued", "midway", "retrying", "sleeping", "waiting"):
            d.binding.get(iid).send_event("approval", {"by": "new code"})
        for _ in range(6):
            d.tick()
            d.now += 61
        outputs = {i.instance_id: json.loads(i.output_json or "null")
                   for i in journal.list_instances(tenant)}
        statuses = {i.instance_id: i.status for i in journal.list_instances(tenant)}
    finally:
        journal.close()
    assert set(statuses.values()) == {"complete"}, statuses
    new = lambda iid, a, charged, by: {"a": a, "charged": charged, "by": by, "id": iid}  # noqa: E731
    assert outputs == {
        "queued": new("queued", "new a", "charged on attempt 1", "new code"),
        "midway": new("midway", "old a", "charged on attempt 1", "new code"),  # a not run again
        "retrying": new("retrying", "old a", "charged on attempt 2", "new code"),
        "sleeping": new("sleeping", "old a", "old charge", "new code"),
        "waiting": new("waiting", "old a", "old charge", "new code"),
        "event-sent": new("event-sent", "old a", "old charge", "old code"),
        "done": {"done": True},
    }


def test_an_engine_finishes_instances_of_a_first_schema_journal(make_database_url, make_engine,
                                                                backend, tenant):
    url = make_database_url()
    first_schema_journal(url, backend)
    now = time.time()
    with _connect(url) as conn:
        hello = _old_code(conn, tenant, Hello, now - 60)
        _old_instance(conn, tenant, "hello", "queued", wake_at=now - 1, version=hello,
                      params='{"name": "old"}', t0=now)
        approval = _old_code(conn, tenant, Approval, now - 60)
        pk = _old_instance(conn, tenant, "approval", "waiting", wake_at=now + 3500,
                           waiting_for="approval", activations=1, version=approval, t0=now)
        _old_step(conn, pk, "pid before", "complete", 1, "the old engine", t0=now)
        _old_step(conn, pk, "approval", "waiting", 0, now + 3500, finished=False, t0=now)

    engine = make_engine(database_url=url)  # upgrades
    assert state(url).at_head
    wf = engine.binding(tenant)
    assert wait_status(wf.get("hello"), "complete")["output"] == {"hello": "Hello, old!",
                                                                   "instance": "hello"}
    wf.get("approval").send_event("approval", {"by": "bob"})
    done = wait_status(wf.get("approval"), "complete")
    assert done["version"] == approval
    assert done["output"]["by"] == "bob"
    assert done["output"]["before"] == "the old engine"  # replayed from the old step, not run again


# -- at the head, newer, refused, concurrent --------------------------------------------


def test_a_journal_at_the_head_is_left_alone(make_database_url, backend):
    url = make_database_url()
    Journal(url).close()
    before = schema(url)
    begins = _LOCK_STATS["lock_begins"]
    with statements() as seen:
        journal = Journal(url)
        journal.close()
    assert _ddl(seen) == [] and not any("advisory" in s for s in seen), seen
    assert _LOCK_STATS["lock_begins"] == begins  # no write transaction either (SQLite)
    assert schema(url) == before


def test_host_processes_do_no_ddl_and_can_check_the_revision(make_database_url):
    url = make_database_url()
    host = Journal(url, create_tables=False)
    try:
        assert state(url).empty
        with pytest.raises(JournalSchemaError, match=f"none \\(no tables\\).*needs {HEAD}.*dynwf db upgrade"):
            host.check_schema()
        Journal(url).close()
        assert host.check_schema() == HEAD
    finally:
        host.close()


def test_a_journal_from_a_newer_dynwf_is_refused_naming_both_revisions(make_database_url, capsys):
    url = make_database_url()
    Journal(url).close()
    with _connect(url) as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    before = schema(url)
    with pytest.raises(JournalSchemaError, match=f"'0099_from_the_future'.*newest is '{HEAD}'"):
        Journal(url)
    assert main(["db", "upgrade", "--database-url", url]) == 2
    assert "0099_from_the_future" in capsys.readouterr().err
    assert main(["db", "current", "--database-url", url]) == 0
    assert capsys.readouterr().out.startswith("0099_from_the_future (unknown to this dynwf-ray")
    assert schema(url) == before


def test_an_engine_told_not_to_migrate_refuses_an_old_journal_until_it_is_upgraded(
    make_database_url, make_engine, backend, capsys
):
    from dynwf_ray import Engine
    from dynwf_ray.cli import main

    url = make_database_url()
    first_schema_journal(url, backend)
    with pytest.raises(JournalSchemaError, match="dynwf db upgrade"):
        Engine.start(database_url=url, migrate=False, name="e-no-migrate")
    assert state(url) == migrations.SchemaState(None, "0001_baseline")  # untouched
    assert main(["db", "upgrade", "--database-url", url]) == 0
    capsys.readouterr()
    engine = make_engine(database_url=url, migrate=False)
    assert engine.health()["journal"]["ok"]


def test_a_journal_no_schema_matches_is_refused_and_a_failed_upgrade_changes_nothing(
    make_database_url, backend
):
    url = make_database_url()
    with _connect(url) as conn:
        conn.exec_driver_sql("CREATE TABLE instances (pk INTEGER PRIMARY KEY, tenant_id VARCHAR)")
    with pytest.raises(JournalSchemaError, match="match no schema.*'instances' lacks instance_id"):
        Journal(url)

    url = make_database_url()
    first_schema_journal(url, backend)
    with _connect(url) as conn:  # altered by hand: a column a later revision adds
        conn.exec_driver_sql("ALTER TABLE tenants ADD COLUMN telemetry_json VARCHAR")
    before = schema(url)
    with pytest.raises(JournalSchemaError,
                       match="from 0001_baseline to .* failed, and nothing was changed"):
        Journal(url)
    assert schema(url) == before and state(url) == migrations.SchemaState(None, "0001_baseline")


UPGRADER = """
import sys, time
from pathlib import Path
from dynwf_ray.journal import Journal
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.005)
Journal(sys.argv[1]).close()
"""


def test_concurrent_starts_upgrade_the_journal_once(make_database_url, backend, tmp_path):
    url = make_database_url()
    old_orders(url, backend, "t")
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", UPGRADER, url, str(tmp_path / f"ready{i}"), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
        for i in range(4)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [rc for _, _, rc in results] == [0, 0, 0, 0], results
    upgraded = [err for _, err, _ in results if "upgraded the journal" in err]
    assert len(upgraded) == 1, results
    assert state(url).at_head and differences(url) == []
    with _connect(url) as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM code_blobs").scalar() == 1


# -- dynwf db ------------------------------------------------------------------------


def test_dynwf_db_current_and_upgrade(make_database_url, backend, capsys, caplog):
    url = make_database_url()
    first_schema_journal(url, backend)
    args = ["--database-url", url]
    assert main(["db", "current", *args]) == 0
    assert capsys.readouterr().out.startswith(
        "none: made before schema revisions, with the tables of 0001_baseline")
    with caplog.at_level(logging.WARNING, logger="dynwf_ray.migrations"):
        assert main(["db", "upgrade", *args]) == 0
    assert capsys.readouterr().out.endswith(f": upgraded from 0001_baseline to {HEAD}\n")
    password = sa.make_url(url).password  # PostgreSQL's: the log names the journal without it
    assert "upgraded the journal" in caplog.text and (password is None or f":{password}@" not in caplog.text)
    assert main(["db", "current", *args]) == 0
    assert capsys.readouterr().out == f"{HEAD} (head)\n"
    assert main([*args, "db", "upgrade"]) == 0
    assert capsys.readouterr().out.endswith(f"at {HEAD} (head), nothing to do\n")
    assert differences(url) == []

    fresh = make_database_url()
    assert main(["db", "current", "--database-url", fresh]) == 0
    assert capsys.readouterr().out.startswith("none: no journal tables yet")
    assert main(["db", "upgrade", "--database-url", fresh]) == 0
    assert capsys.readouterr().out.endswith(f"created the journal's tables at {HEAD}\n")
