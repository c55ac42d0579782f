"""Group commit (`Journal.grouped`) and SQLite's writer lock, against a real journal.

Concurrent writes share commits; each is durable when its await returns; a write
whose lease is lost fails alone; any other failure in a batch reruns its writes one
by one, so only the bad one fails; SQLite writers of two journals take turns, and a
turn carries the writes queued while it was awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Iterator

import pytest

from dynwf_ray.journal import STEP_COMPLETE, Journal, LeaseLostError, StepRecord
from dynwf_ray.tracing import new_trace_context


def _claimed(journal: Journal, tenant: str, n: int) -> list:
    now = time.time()
    journal.save_code(tenant, "v1", "test", b"", now)
    journal.create_instances(
        tenant, "v1", [(f"g{i}", "{}", "{}", *new_trace_context()) for i in range(n)], now,
        skip_existing=False,
    )
    return journal.claim_due(now, n, "test", 30.0, tenant_id=tenant)


@contextlib.contextmanager
def _turn_held(journal: Journal) -> Iterator[threading.Event]:
    """A thread holds `journal`'s SQLite writer lock, in an open write transaction,
    until the event yielded is set (or the block ends)."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        with journal._write():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    try:
        yield release
    finally:
        release.set()
        holder.join()


def _record(name: str) -> StepRecord:
    now = time.time()
    return StepRecord(name, 1, "do", STEP_COMPLETE, '"ok"', None, None, 1, None, now, now)


def test_concurrent_writes_share_commits_and_each_is_durable(journal, tenant):
    claims = _claimed(journal, tenant, 20)
    before = journal.grouped.stats()["group_commits"]

    async def write_all():
        await asyncio.gather(*(
            journal.grouped.record_step(c.pk, c.token, _record("s"), time.time(), 30.0)
            for c in claims
        ))

    asyncio.run(write_all())
    commits = journal.grouped.stats()["group_commits"] - before
    assert 1 <= commits < 20, commits
    fresh = Journal(journal.url, create_tables=False)  # another connection sees them all
    try:
        assert all([s.name for s in fresh.list_steps(c.pk)] == ["s"] for c in claims)
    finally:
        fresh.close()


def test_a_lost_lease_fails_only_its_own_write(journal, tenant):
    kept, lost = _claimed(journal, tenant, 2)
    journal.terminate(tenant, lost.instance_id, time.time())  # fences the second lease

    async def both():
        return await asyncio.gather(
            journal.grouped.record_step(kept.pk, kept.token, _record("a"), time.time(), 30.0),
            journal.grouped.record_step(lost.pk, lost.token, _record("a"), time.time(), 30.0),
            return_exceptions=True,
        )

    ok, failed = asyncio.run(both())
    assert ok is False  # pause_requested
    assert isinstance(failed, LeaseLostError)
    assert [s.name for s in journal.list_steps(kept.pk)] == ["a"]
    assert journal.list_steps(lost.pk) == []


def test_another_failure_in_a_batch_reruns_the_others_alone(journal, tenant):
    good = _claimed(journal, tenant, 3)
    group = journal.grouped

    def broken(conn):
        conn.exec_driver_sql("SELECT 1")
        raise ValueError("a bug in one write")

    async def mixed():
        writes = [group.record_step(c.pk, c.token, _record("m"), time.time(), 30.0) for c in good]
        writes.insert(1, group._enqueue(broken, ()))
        return await asyncio.gather(*writes, return_exceptions=True)

    results = asyncio.run(mixed())
    assert isinstance(results[1], ValueError)
    assert [r for i, r in enumerate(results) if i != 1] == [False, False, False]
    assert all([s.name for s in journal.list_steps(c.pk)] == ["m"] for c in good)


def test_sqlite_writers_of_two_journals_take_turns_and_the_wait_is_counted(tmp_path):
    url = f"sqlite:///{tmp_path}/j.db"
    first, second = Journal(url), Journal(url, create_tables=False)
    try:
        if not first.is_sqlite:
            pytest.skip("SQLite only")
        held = first.write_stats()
        with _turn_held(first) as release:
            waits = second.write_stats()["sqlite_lock_waits"]
            done = threading.Event()
            writer = threading.Thread(
                target=lambda: (second.save_code("t", "v", "test", b"", time.time()), done.set())
            )
            writer.start()
            assert not done.wait(0.3)  # its turn has not come: the other transaction is open
            release.set()
            assert done.wait(10)
        writer.join()
        stats = second.write_stats()
        assert stats["sqlite_lock_waits"] == waits + 1 and stats["sqlite_lock_wait_s"] > 0.2
        # The holder held its turn for those 0.3 s, asleep: held time, little CPU.
        assert stats["sqlite_lock_held_s"] - held["sqlite_lock_held_s"] > 0.3
        assert stats["sqlite_lock_held_cpu_s"] - held["sqlite_lock_held_cpu_s"] < 0.2
        assert second.latest_version("t") == "v"
    finally:
        first.close()
        second.close()


def test_writes_queued_while_a_process_waits_for_its_turn_share_that_turn(tmp_path):
    """SQLite: once the group-commit writer's transaction has begun, the writes that
    queued while it waited for its turn on the file join it: one commit for all (it
    used to take its batch before the wait and leave them for a second commit)."""
    url = f"sqlite:///{tmp_path}/j.db"
    first, second = Journal(url), Journal(url, create_tables=False)
    try:
        if not first.is_sqlite:
            pytest.skip("SQLite only")
        claims = _claimed(second, "t", 5)
        group = second.grouped
        before = group.stats()
        waiting = threading.Event()
        take_turn = second._writers.acquire

        def acquire():  # the writer thread has begun to wait for its turn
            waiting.set()
            take_turn()

        second._writers.acquire = acquire

        def write(claim):
            return group.record_step(claim.pk, claim.token, _record("q"), time.time(), 30.0)

        async def scenario(release: threading.Event):
            head = asyncio.ensure_future(write(claims[0]))
            assert await asyncio.to_thread(waiting.wait, 10)
            rest = [asyncio.ensure_future(write(c)) for c in claims[1:]]
            await asyncio.sleep(0)  # the four are queued, the writer still waits
            release.set()
            return await asyncio.wait_for(asyncio.gather(head, *rest), 10)

        with _turn_held(first) as release:
            assert asyncio.run(scenario(release)) == [False] * 5
        after = group.stats()
        assert after["group_commits"] - before["group_commits"] == 1
        assert after["group_writes"] - before["group_writes"] == 5
        assert all([s.name for s in first.list_steps(c.pk)] == ["q"] for c in claims)
    finally:
        first.close()
        second.close()


def test_a_writer_lock_that_fails_fails_the_writes_not_the_writer(journal, tenant, monkeypatch):
    """SQLite's writer lock raising (flock on a file system without locks) reaches the
    writes' callers; the writer thread lives on and commits once the lock works."""
    first, second = _claimed(journal, tenant, 2)
    group = journal.grouped

    def no_lock():
        raise OSError("no locks available")

    monkeypatch.setattr(journal._writers, "acquire", no_lock)

    async def write(claim):
        return await asyncio.wait_for(
            group.record_step(claim.pk, claim.token, _record("w"), time.time(), 30.0), 10)

    with pytest.raises(OSError, match="no locks available"):
        asyncio.run(write(first))
    monkeypatch.undo()
    assert asyncio.run(write(second)) is False
    assert [s.name for s in journal.list_steps(second.pk)] == ["w"]
    assert journal.list_steps(first.pk) == []


def test_a_write_that_fails_alone_in_its_batch_reaches_its_caller(journal):
    """A batch of one write that raises: its caller gets the error (a batch of one used
    to be settled with the wrong shape, leaving its caller waiting for ever)."""
    def broken(conn):
        raise ValueError("a bug in the only write")

    async def alone():
        return await asyncio.wait_for(journal.grouped._enqueue(broken, ()), 10)

    with pytest.raises(ValueError, match="the only write"):
        asyncio.run(alone())
