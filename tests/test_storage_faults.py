"""Storage faults on a running engine: the SQLite journal's filesystem fills up, the
PostgreSQL journal turns read-only, and then the journal works again.

While the journal refuses writes, no instance may end errored and tenant code (which
catches everything) must never see the journal's error; platform callers get
`JournalUnavailableError` naming the cause; `status()` and `engine.health()` say what
blocks the instances. Once the journal works, every instance completes, and only
the steps that were in flight at the fault ran again.

The full disk is a small tmpfs mounted for the test (root only; CI runs as root),
unmounted at the end by its path.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from dynwf_ray import JournalUnavailableError

from .conftest import PG_URL, TERMINAL, wait_status, wait_until
from .test_engine import lend, lines
from .workflows import Heavy

INSTANCES, STEPS = 12, 4


@pytest.fixture
def small_fs(tmp_path, backend):
    if backend != "sqlite":
        pytest.skip("a full filesystem is the SQLite journal's fault; PostgreSQL's is read-only below")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True)
    yield mount
    if subprocess.run(["umount", str(mount)]).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(directory: Path) -> Path:
    """Write a file until the filesystem has no byte left; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _start(engine, tenant, work: Path):
    engine.register(tenant, Heavy)
    lend(engine, tenant, work)
    wf = engine.binding(tenant)
    handles = [wf.create(id=f"h{i}", params={"dir": str(work), "steps": STEPS}) for i in range(INSTANCES)]
    # All of them in step s1 (waiting for "go"), s0 recorded: the fault hits them there.
    def recorded() -> bool:
        infos = [engine.journal.get_instance(tenant, h.id) for h in handles]
        return all(("s0", 1) in {(s.name, s.seq) for s in engine.journal.list_steps(i.pk)}
                   for i in infos)

    wait_until(recorded, what="every instance to record its first step")
    return wf, handles


def _blocked(engine, handles, cause: str) -> None:
    """While the journal fails: the engine and the instances say why, none errored."""
    def failing():
        health = engine.health()
        return not health["ready"] and health["journal"]["cause"] == cause and health
    health = wait_until(failing, what=f"the engine to report the journal {cause}")
    assert health["journal"]["failures"].get(cause, 0) >= 1
    conditions = [h.status() for h in handles]
    assert not [s for s in conditions if s["status"] in ("errored", "terminated")]
    blocked = [s for s in conditions if s["status"] not in TERMINAL]
    assert blocked and all(s["condition"].startswith(f"journal unavailable: {cause}") for s in blocked)
    print(f"\n[{cause}] engine.health(): {health}\n[{cause}] {len(blocked)} instances blocked, "
          f"e.g. status(): {blocked[0]}")


def _finished(handles, work: Path) -> None:
    reruns = 0
    for h in handles:
        assert wait_status(h, "complete", timeout=120)["output"] == [20_000] * STEPS
        runs = lines(work / f"{h.id}.log")
        # s0 was recorded before the fault: it never ran again. Steps in flight at the
        # fault ran again once the journal worked; no step ran more than twice.
        assert runs.count("s0") == 1, runs
        assert all(1 <= runs.count(f"s{i}") <= 2 for i in range(STEPS)), runs
        reruns += len(runs) - STEPS
    print(f"{len(handles)} instances complete; {reruns} step attempts in flight at the fault ran again")


def test_a_full_disk_blocks_instances_and_never_fails_them(make_engine, small_fs, tenant, tmp_path):
    url = f"sqlite:///{small_fs / 'journal.db'}"
    engine = make_engine(database_url=url)
    work = tmp_path / "work"
    work.mkdir()
    try:
        wf, handles = _start(engine, tenant, work)
        filler = _fill(small_fs)
        (work / "go").touch()
        _blocked(engine, handles, "disk full")
        with pytest.raises(JournalUnavailableError, match="disk full") as raised:
            wf.create(id="while-full", params={"dir": str(work), "steps": 1})
        assert raised.value.retryable
        print(f"create() while full raised {type(raised.value).__name__}: {raised.value}")
        filler.unlink()  # space returns
        _finished(handles, work)
        assert wait_until(lambda: engine.health()["ready"], what="the engine to be ready again")
        with pytest.raises(Exception, match="while-full"):
            wf.get("while-full")  # the failed create left nothing behind
    finally:
        engine.stop()
    with sqlite3.connect(small_fs / "journal.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = db.execute(
            "SELECT i.instance_id, s.name, s.seq FROM steps s JOIN instances i ON i.pk = s.instance_pk"
        ).fetchall()
    assert len(rows) == len(set(rows)) == INSTANCES * STEPS  # each step recorded once


def _pg_database(url: str, setting: str) -> None:
    """Apply `setting` to the journal's database and end its sessions, so that every
    engine connection reconnects under it (as after an operator's change)."""
    name = sa.make_url(url).database
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" {setting}'))
        conn.execute(sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = :name AND pid <> pg_backend_pid()"
        ), {"name": name})
    admin.dispose()


def test_a_read_only_postgresql_journal_blocks_instances_and_never_fails_them(
    make_engine, make_database_url, backend, tenant, tmp_path
):
    if backend != "postgresql":
        pytest.skip("read-only PostgreSQL; SQLite's fault is the full disk above")
    url = make_database_url()
    engine = make_engine(database_url=url)
    work = tmp_path / "work"
    work.mkdir()
    wf, handles = _start(engine, tenant, work)
    _pg_database(url, "SET default_transaction_read_only = on")
    try:
        (work / "go").touch()
        _blocked(engine, handles, "read-only")
        with pytest.raises(JournalUnavailableError, match="read-only") as raised:
            wf.create(id="while-read-only", params={"dir": str(work), "steps": 1})
        print(f"create() while read-only raised {type(raised.value).__name__}: {raised.value}")
    finally:
        _pg_database(url, "RESET default_transaction_read_only")
    _finished(handles, work)
    assert wait_until(lambda: engine.health()["ready"], what="the engine to be ready again")
    statuses = json.dumps(engine.stats()["outcomes"])
    assert "errored" not in statuses
