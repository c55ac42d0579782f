"""Wakes by datagram (`wakeup`): a real socket pair on this machine, plain fakes for
the host process's hosts and its scheduler."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time

import pytest

from dynwf_ray import wakeup


@pytest.fixture
def wake_dir(monkeypatch):
    """A short temp dir of this test's own (socket paths are limited to 107 bytes)."""
    root = tempfile.mkdtemp(prefix="wk", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", root)
    monkeypatch.setattr(wakeup, "STATS", {"by_datagram": 0, "forwarded": 0})
    yield root
    shutil.rmtree(root, ignore_errors=True)


async def _until(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def _listen(actor_id="a1", serves=(7,)):
    woken, forwarded = [], []

    def wake(host_id):
        woken.append(host_id)
        return host_id in serves

    listener = wakeup.WakeListener(actor_id, wake, lambda t, v: forwarded.append((t, v)))
    return listener, woken, forwarded


def test_a_wake_for_a_host_it_serves_wakes_it_and_goes_no_further(wake_dir):
    async def scenario():
        listener, woken, forwarded = _listen()
        assert listener.start(asyncio.get_running_loop())
        path = wakeup.address("a1")
        assert path is not None and os.path.exists(path)
        assert wakeup.WakeSender().send(path, 7, "acme", "v1")
        await _until(lambda: woken)
        listener.close()
        return woken, forwarded, path

    woken, forwarded, path = asyncio.run(scenario())
    assert woken == [7] and forwarded == []
    assert wakeup.STATS == {"by_datagram": 1, "forwarded": 0}
    assert not os.path.exists(path)  # a closed listener leaves no socket behind


def test_a_wake_for_a_host_it_does_not_serve_goes_to_the_scheduler(wake_dir):
    async def scenario():
        listener, woken, forwarded = _listen(serves=())
        listener.start(asyncio.get_running_loop())
        sender = wakeup.WakeSender()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.sendto(b"not a wake \xff", wakeup.address("a1"))  # ignored
        sender.send(wakeup.address("a1"), 9, "acme", "v2")
        await _until(lambda: forwarded)
        listener.close()
        return woken, forwarded

    woken, forwarded = asyncio.run(scenario())
    assert woken == [9] and forwarded == [("acme", "v2")]
    assert wakeup.STATS == {"by_datagram": 0, "forwarded": 1}


def test_with_nobody_listening_the_sender_says_so(wake_dir):
    sender = wakeup.WakeSender()
    gone = wakeup.address("gone", create=True)
    assert not sender.send(gone, 1, "acme", "v1")  # no such socket: another machine's
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(gone)
    sock.close()  # the file stays, nobody reads it: a killed process's
    assert not sender.send(gone, 1, "acme", "v1")


def test_a_directory_others_can_enter_is_never_used(wake_dir):
    directory = os.path.dirname(wakeup.address("x", create=True))
    os.chmod(directory, 0o755)
    assert wakeup.address("x") is None
    listener, _, _ = _listen()
    assert not asyncio.run(_start(listener))  # callers then wake its hosts through Ray


async def _start(listener):
    return listener.start(asyncio.get_running_loop())


def test_starting_sweeps_the_sockets_of_processes_that_are_gone(wake_dir):
    async def scenario():
        live, _, _ = _listen("live")
        live.start(asyncio.get_running_loop())
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        dead.bind(wakeup.address("dead"))
        dead.close()
        new, _, _ = _listen("new")
        new.start(asyncio.get_running_loop())
        names = sorted(os.listdir(os.path.dirname(wakeup.address("new"))))
        live.close()
        new.close()
        return names

    assert asyncio.run(scenario()) == ["live.sock", "new.sock"]
