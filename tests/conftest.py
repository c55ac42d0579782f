"""Shared fixtures: one Ray session for the whole run, journals and engines per backend.

Every journal- or engine-using test runs on SQLite and on PostgreSQL. The
PostgreSQL URL comes from DYNWF_TEST_POSTGRES_URL (`./dev test` starts a
private server and sets it). Without it the PostgreSQL half is skipped,
unless DYNWF_REQUIRE_POSTGRES=1 (set by `./dev test`), where it fails.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Callable, Iterator

import pytest
import ray
import sqlalchemy as sa

from dynwf_ray import Engine
from dynwf_ray.journal import Journal

from .workflows import CALLS

BACKENDS = ["sqlite", "postgresql"]
TERMINAL = {"complete", "errored", "terminated"}
PG_URL = os.environ.get("DYNWF_TEST_POSTGRES_URL")


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def wait_status(handle, statuses, timeout: float = 60.0) -> dict:
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)
    box: dict = {}

    def check():
        box["s"] = handle.status()
        status = box["s"]["status"]
        if status in TERMINAL and status not in statuses:
            raise AssertionError(f"{handle!r} ended {status}, not {sorted(statuses)}: {box['s']}")
        return status in statuses

    try:
        wait_until(check, timeout, f"{handle!r} to reach {sorted(statuses)}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {box.get('s')}") from None
    return box["s"]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, namespace="dynwf", logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request) -> str:
    if request.param == "postgresql" and not PG_URL:
        if os.environ.get("DYNWF_REQUIRE_POSTGRES") == "1":
            pytest.fail("DYNWF_REQUIRE_POSTGRES=1 but DYNWF_TEST_POSTGRES_URL is not set")
        pytest.skip("PostgreSQL not configured: set DYNWF_TEST_POSTGRES_URL (./dev test does)")
    return request.param


@pytest.fixture(scope="session")
def make_database_url(backend, tmp_path_factory) -> Iterator[Callable[[], str]]:
    """Returns a function that makes a fresh, empty journal database URL."""
    created: list[str] = []
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT") if backend == "postgresql" else None

    def make() -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path_factory.mktemp('journal') / 'journal.db'}"
        name = f"dynwf_t_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)

    yield make
    if admin is not None:
        with admin.connect() as conn:
            for name in created:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards, for a journal that processes
    other than this one (a cluster's nodes) open; PostgreSQL only."""
    if not PG_URL:
        if os.environ.get("DYNWF_REQUIRE_POSTGRES") == "1":
            pytest.fail("DYNWF_REQUIRE_POSTGRES=1 but DYNWF_TEST_POSTGRES_URL is not set")
        pytest.skip("PostgreSQL not configured: set DYNWF_TEST_POSTGRES_URL (./dev test does)")
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"dynwf_c_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def shared_journal_url(make_database_url) -> str:
    return make_database_url()


@pytest.fixture
def journal(shared_journal_url) -> Iterator[Journal]:
    j = Journal(shared_journal_url)
    yield j
    j.close()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    """Each test counts its step callbacks' calls (`workflows.count`) from zero."""
    CALLS.clear()


@pytest.fixture
def tenant() -> str:
    """A fresh tenant id per test, so tests sharing a journal never see each other."""
    return f"t{uuid.uuid4().hex[:12]}"


ENGINE_DEFAULTS = dict(max_hosts=3, hibernate_after=1.5, lease_ttl=3.0, poll_interval=0.5)


@pytest.fixture(scope="session")
def make_engine(ray_session, make_database_url) -> Iterator[Callable[..., Engine]]:
    """Start extra engines, each on a fresh journal unless given one; stopped at the end."""
    engines: list[Engine] = []

    def make(**kwargs) -> Engine:
        options = {**ENGINE_DEFAULTS, **kwargs}
        options.setdefault("database_url", make_database_url())
        options.setdefault("name", f"e{uuid.uuid4().hex[:8]}")
        engine = Engine.start(**options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        try:
            engine.stop()
        except Exception:  # noqa: BLE001 - already stopped by the test
            pass


@pytest.fixture(scope="session")
def engine(make_engine) -> Engine:
    """The engine most tests share (per backend); tests isolate by tenant."""
    return make_engine()
