"""The journal's writer per machine (`journal.node_writer`), against real SQLite files.

A writer serves on a thread of this process (or, where it must die, in a process of
its own); clients are journals of the same file sending their `grouped` writes to it.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from dynwf_ray.errors import JournalUnavailableError
from dynwf_ray.journal import Journal, LeaseLostError, node_writer

from .test_group_commit import _claimed, _record, _turn_held


@pytest.fixture
def url(monkeypatch):
    """A fresh SQLite journal, and a short private temp dir for the writer's socket."""
    root = tempfile.mkdtemp(prefix="nw", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", root)
    yield f"sqlite:///{root}/journal.db"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def writer(url):
    journal = Journal(url)
    served = node_writer.NodeWriter(journal)
    assert served.start()
    yield served
    served.close()
    journal.close()


def _client(url: str) -> Journal:
    journal = Journal(url, create_tables=False)
    assert journal.write_through_node_writer()
    return journal


def _steps(journal: Journal, pk: int) -> list[str]:
    return [s.name for s in journal.list_steps(pk)]


def test_writes_of_two_processes_share_the_writers_commits_and_are_durable(url, writer):
    a, b = _client(url), _client(url)
    claims = _claimed(a, "acme", 20)

    async def write(journal: Journal, mine: list) -> list:
        return await asyncio.gather(*(
            journal.grouped.record_step(c.pk, c.token, _record("s"), time.time(), 30.0)
            for c in mine))

    async def both() -> list:
        return await asyncio.gather(write(a, claims[:10]), write(b, claims[10:]))

    results = asyncio.run(both())  # two clients (one loop here; a host process each in use)
    assert results == [[False] * 10, [False] * 10]  # recorded, no pause asked
    reader = Journal(url, create_tables=False)
    assert all(_steps(reader, c.pk) == ["s"] for c in claims)
    served = writer.stats()
    assert served["group_writes"] == 20 and served["group_commits"] < 20
    assert served["clients"] == 2 and served["writes"] == 20
    assert a.write_stats()["node_writer_writes"] == 10 and a.write_stats().get("group_commits") is None
    for j in (a, b, reader):
        j.close()


def test_a_write_whose_lease_is_lost_fails_alone_with_its_own_error(url, writer):
    client = _client(url)
    first, second = _claimed(client, "acme", 2)

    async def scenario() -> list:
        return await asyncio.gather(
            client.grouped.record_step(first.pk, first.token + 1, _record("x"), time.time(), 30.0),
            client.grouped.record_step(second.pk, second.token, _record("y"), time.time(), 30.0),
            return_exceptions=True)

    lost, ok = asyncio.run(scenario())
    assert isinstance(lost, LeaseLostError) and ok is False
    assert _steps(client, first.pk) == [] and _steps(client, second.pk) == ["y"]
    client.close()


def test_without_a_writer_a_process_takes_its_own_turns_and_looks_again_later(url, monkeypatch):
    Journal(url).close()  # the tables
    client = _client(url)
    (claim,) = _claimed(client, "acme", 1)

    async def record(name: str) -> bool:
        return await client.grouped.record_step(claim.pk, claim.token, _record(name), time.time(), 30.0)

    assert asyncio.run(record("alone")) is False
    stats = client.write_stats()
    assert stats["node_writer_alone"] == 1 and stats["group_writes"] == 1
    assert stats["node_writer_writes"] == 0

    # A writer started since: found once the wait is over.
    monkeypatch.setattr(node_writer, "RETRY_S", 0.0)
    client._node_client._alone_until = float("-inf")
    served_by = Journal(url, create_tables=False)
    served = node_writer.NodeWriter(served_by)
    assert served.start()
    try:
        assert asyncio.run(record("through")) is False
        assert client.write_stats()["node_writer_writes"] == 1
        assert _steps(client, claim.pk) == ["alone", "through"]
    finally:
        served.close()
        served_by.close()
        client.close()


def test_one_writer_per_file_and_none_for_other_journals(url, writer):
    second = node_writer.NodeWriter(Journal(url, create_tables=False))
    assert not second.start()  # the first one serves this file
    assert node_writer.address("postgresql+psycopg://u@h/db") is None
    assert node_writer.address("sqlite:///:memory:") is None
    assert not Journal("sqlite:///:memory:").write_through_node_writer()


def test_a_message_that_is_not_writes_closes_that_connection_only(url, writer):
    evil = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    evil.connect(writer.path)

    class Boom:
        def __reduce__(self):
            return (os.system, ("true",))

    data = pickle.dumps([("record_step", (Boom(),))])
    evil.sendall(len(data).to_bytes(4, "big") + data)
    evil.settimeout(10)
    assert evil.recv(16) == b""  # closed, nothing run and nothing answered
    evil.close()
    assert writer.stats()["refused"] == 1

    client = _client(url)
    (claim,) = _claimed(client, "acme", 1)
    assert asyncio.run(client.grouped.record_step(
        claim.pk, claim.token, _record("s"), time.time(), 30.0)) is False
    client.close()


_SERVE = """
import sys, tempfile, time
tempfile.tempdir = sys.argv[2]
from dynwf_ray.journal import Journal, node_writer
served = node_writer.NodeWriter(Journal(sys.argv[1], create_tables=False))
assert served.start()
print("serving", flush=True)
time.sleep(600)
"""


def test_a_writer_killed_before_it_answers_fails_its_writes_as_unknown_and_nothing_more(url):
    Journal(url).close()  # the tables
    client = _client(url)
    (claim,) = _claimed(client, "acme", 1)
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, url, tempfile.tempdir],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "serving"
        with _turn_held(client):  # the writer cannot commit while this holds the file

            async def scenario():
                write = asyncio.ensure_future(client.grouped.record_step(
                    claim.pk, claim.token, _record("s"), time.time(), 30.0))
                while client.write_stats()["node_writer_messages"] < 1:
                    await asyncio.sleep(0.001)
                os.kill(proc.pid, signal.SIGKILL)  # sent, not answered
                with pytest.raises(JournalUnavailableError, match="whether they committed is unknown"):
                    await asyncio.wait_for(write, 30)
                assert client.health.snapshot()["cause"] == "writer lost"

            asyncio.run(scenario())
        assert client.write_stats()["node_writer_lost"] == 1
        assert _steps(client, claim.pk) == []  # it never committed
        # The next write finds no writer and takes the process's own turn.
        assert asyncio.run(client.grouped.record_step(
            claim.pk, claim.token, _record("s"), time.time(), 30.0)) is False
        assert _steps(client, claim.pk) == ["s"]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        client.close()


def test_the_writers_errors_cross_processes_as_they_are():
    error = JournalUnavailableError("disk full", "no space left", retryable=True)
    again = pickle.loads(pickle.dumps(error))
    assert (again.cause, again.detail, again.retryable, str(again)) == (
        error.cause, error.detail, error.retryable, str(error))


def test_a_batch_the_writer_fails_to_answer_drops_its_clients_and_the_writer_goes_on(url, writer, monkeypatch):
    client = _client(url)
    first, second = _claimed(client, "acme", 2)
    answer, failed = node_writer._Connection.answer, []

    def fails_once(self, *args):
        if not failed:
            failed.append(True)
            raise RuntimeError("a bug while answering")
        return answer(self, *args)

    monkeypatch.setattr(node_writer._Connection, "answer", fails_once)

    async def record(claim, name):
        return await client.grouped.record_step(claim.pk, claim.token, _record(name), time.time(), 30.0)

    with pytest.raises(JournalUnavailableError, match="writer lost"):
        asyncio.run(record(first, "x"))  # committed, but its answer never came
    assert asyncio.run(record(second, "y")) is False  # a new connection, answered
    assert _steps(client, second.pk) == ["y"] and writer.stats()["clients"] == 2
    client.close()


def test_a_journal_the_writer_cannot_use_fails_its_clients_writes_with_the_cause(url, writer, monkeypatch):
    client = _client(url)
    (claim,) = _claimed(client, "acme", 1)
    full = JournalUnavailableError("disk full", "database or disk is full")
    monkeypatch.setattr(node_writer, "commit_batch",
                        lambda journal, batch, top_up: ([(False, full)] * len(batch), False))
    with pytest.raises(JournalUnavailableError, match="disk full") as caught:
        asyncio.run(client.grouped.record_step(claim.pk, claim.token, _record("s"), time.time(), 30.0))
    assert (caught.value.cause, caught.value.retryable) == ("disk full", True)
    assert client.health.snapshot()["cause"] == "disk full"
    assert writer.stats()["group_commits"] == 0 and _steps(client, claim.pk) == []
    client.close()
