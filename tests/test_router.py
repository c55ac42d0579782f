"""Where notifications go (`notify.Router`), with plain fakes of Ray's handles; and
how a caller's notifications are coalesced (`notify.Notifier`), on a fake clock; and
the one thread per process that sends the held-back ones (`notify._Later`).

The scheduler names the hosts it woke; for the route's time to live the caller wakes
them itself, by datagram when their process's wake socket is on this machine; a host
that no longer serves the version, or is gone, sends the next notification to the
scheduler again, and so does a version with no host named.
"""

from __future__ import annotations

import socket
import tempfile
import threading
from concurrent.futures import Future

from dynwf_ray import notify as notify_module
from dynwf_ray.notify import Notifier, Router


class _Method:
    """`handle.method`: `.remote(*args)` records the call; its result is `answer(*args)`."""

    def __init__(self, answer):
        self.calls: list[tuple] = []
        self._answer = answer

    def remote(self, *args):
        self.calls.append(args)
        done: Future = Future()
        try:
            done.set_result(self._answer(*args))
        except Exception as exc:  # noqa: BLE001 - what the call raised reaches its future
            done.set_exception(exc)
        return _Ref(done)


class _Ref:
    def __init__(self, done: Future):
        self._done = done

    def future(self) -> Future:
        return self._done


class _Handle:
    def __init__(self, **methods):
        for name, answer in methods.items():
            setattr(self, name, _Method(answer))


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _gone(*args):
    raise RuntimeError("the actor died")


def _setup(served=lambda host_id: True, named=None, address=None):
    clock = _Clock()
    host = _Handle(wake=served)
    hosts = [(7, host)] if named is None else named
    scheduler = _Handle(notify=lambda tenant, version, name: hosts if name else None)
    router = Router(lambda: scheduler, ttl=1.0, clock=clock, address_of=lambda actor: address)
    return router, scheduler, host, clock


def test_the_hosts_the_scheduler_named_are_woken_directly_and_the_route_refreshed_each_ttl():
    route, scheduler, host, clock = _setup()
    route("t", "v1")
    assert scheduler.notify.calls == [("t", "v1", True)] and host.wake.calls == []
    route("t", "v1")
    clock.now += 0.9
    route("t", "v1")
    assert host.wake.calls == [(7,), (7,)]
    assert len(scheduler.notify.calls) == 1  # no call to the scheduler meanwhile
    clock.now += 0.2  # a ttl since it was named: woken still, and the scheduler asked again
    route("t", "v1")
    route("t", "v1")
    assert len(scheduler.notify.calls) == 2 and len(host.wake.calls) == 4


def test_a_route_unused_for_its_max_age_is_forgotten():
    route, scheduler, host, clock = _setup()
    route("t", "v1")
    clock.now += 60.0
    route("t", "v1")
    assert len(scheduler.notify.calls) == 2 and host.wake.calls == []


def test_a_route_is_kept_per_code_version():
    route, scheduler, host, _ = _setup()
    route("t", "v1")
    route("t", "v2")
    route("u", "v1")
    assert [c[:2] for c in scheduler.notify.calls] == [("t", "v1"), ("t", "v2"), ("u", "v1")]
    assert host.wake.calls == []


def test_a_host_that_no_longer_serves_the_version_sends_the_notification_to_the_scheduler():
    answers = iter([True, False])
    route, scheduler, host, _ = _setup(served=lambda host_id: next(answers))
    route("t", "v1")  # named
    route("t", "v1")  # woken: it serves
    route("t", "v1")  # woken: it says it stopped, so the scheduler is told at once
    assert len(host.wake.calls) == 2
    assert scheduler.notify.calls == [("t", "v1", True)] * 2


def test_a_host_process_that_is_gone_counts_as_not_serving():
    route, scheduler, host, _ = _setup(served=_gone)
    route("t", "v1")
    route("t", "v1")
    assert len(host.wake.calls) == 1 and len(scheduler.notify.calls) == 2


def test_a_stale_route_of_several_hosts_tells_the_scheduler_once():
    gone_a, gone_b = _Handle(wake=lambda h: False), _Handle(wake=lambda h: False)
    route, scheduler, _, _ = _setup(named=[(1, gone_a), (2, gone_b)])
    route("t", "v1")
    route("t", "v1")
    assert len(gone_a.wake.calls) == len(gone_b.wake.calls) == 1
    assert len(scheduler.notify.calls) == 2  # the first, and one for the stale route


def test_with_no_host_named_every_notification_goes_to_the_scheduler():
    route, scheduler, host, _ = _setup(named=[])
    route("t", "v1")
    route("t", "v1")
    assert len(scheduler.notify.calls) == 2 and host.wake.calls == []


def test_a_notification_without_a_version_asks_for_no_names_and_keeps_no_route():
    route, scheduler, host, _ = _setup()
    route("t", None)
    route("t", None)
    assert scheduler.notify.calls == [("t", None, False)] * 2 and host.wake.calls == []


def test_a_scheduler_that_restarted_meanwhile_leaves_no_route():
    scheduler = _Handle(notify=_gone)
    route = Router(lambda: scheduler, ttl=1.0, clock=_Clock())
    route("t", "v1")
    route("t", "v1")
    assert len(scheduler.notify.calls) == 2


def test_no_scheduler_running_is_not_an_error():
    """No scheduler runs: a notification is dropped quietly (the next scheduler's poll
    finds the work), nothing is remembered, and once one runs it is notified."""
    scheduler = _Handle(notify=lambda tenant, version, name: [(7, _Handle(wake=lambda h: True))])
    running: list = []
    lookups: list = []

    def lookup():
        lookups.append(1)
        if not running:
            raise ValueError("Failed to look up actor")
        return running[0]

    route = Router(lookup, ttl=1.0, clock=_Clock(), address_of=lambda actor: None)
    route("t", "v1")
    route("t", "v1")
    assert len(lookups) == 2  # asked each time: no route was made up
    running.append(scheduler)
    route("t", "v1")
    assert scheduler.notify.calls == [("t", "v1", True)]


def test_a_host_process_on_this_machine_is_woken_by_datagram_not_by_ray():
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        inbox.bind(f"{d}/w.sock")
        inbox.settimeout(5)
        route, scheduler, host, _ = _setup(address=f"{d}/w.sock")
        route("t", "v1")  # named
        route("t", "v1")
        assert inbox.recv(512) == b"7\0t\0v1"
        assert host.wake.calls == [] and len(scheduler.notify.calls) == 1
        inbox.close()  # its process is gone: Ray is tried, which finds it gone too
        route("t", "v1")
        assert host.wake.calls == [(7,)]


def test_a_wake_socket_that_is_not_on_this_machine_means_ray():
    route, scheduler, host, _ = _setup(address="/nonexistent/dynwf-wake/w.sock")
    route("t", "v1")
    route("t", "v1")
    assert host.wake.calls == [(7,)] and len(scheduler.notify.calls) == 1


class _Later:
    """A fake of `Notifier`'s timer: holds (due time, fn, args) until `run_due`."""

    def __init__(self, clock):
        self.clock, self.timers = clock, []

    def __call__(self, delay, fn, *args):
        self.timers.append((self.clock[0] + delay, fn, args))

    def run_due(self):
        due = [t for t in self.timers if t[0] <= self.clock[0] + 1e-9]
        self.timers = [t for t in self.timers if t not in due]
        for _, fn, args in due:
            fn(*args)


def _notifier(window=0.02, burst=4):
    clock, sent = [0.0], []
    later = _Later(clock)
    notify = Notifier(lambda t, v: sent.append((clock[0], t, v)), window=window, burst=burst,
                      clock=lambda: clock[0], later=later)
    return notify, clock, later, sent


def test_a_burst_of_notifications_goes_at_once_then_one_per_window():
    notify, clock, later, sent = _notifier()
    for _ in range(10):
        notify("t", "v")
    assert len(sent) == 4 and len(later.timers) == 1  # the other 6: one, when one refills
    clock[0] = later.timers[0][0]
    later.run_due()
    assert len(sent) == 5 and sent[-1] == (clock[0], "t", "v") and abs(clock[0] - 0.02) < 1e-9
    notify("other", "v")  # another version has a bucket of its own
    assert sent[-1][1] == "other"


def test_a_steady_stream_costs_one_notification_per_window_and_none_waits_longer():
    notify, clock, later, sent = _notifier()
    waits = []
    for i in range(2000):  # one per millisecond for two seconds
        clock[0] = i * 0.001
        later.run_due()
        before = len(sent)
        notify("t", "v")
        if len(sent) == before:  # held: the timer that covers it is due within a window
            waits.append(max(t[0] for t in later.timers) - clock[0])
    assert 4 + 2.0 / 0.02 - 2 <= len(sent) <= 4 + 2.0 / 0.02 + 1
    assert max(waits) <= 0.02 + 1e-9


def test_an_event_just_after_its_create_is_not_held_back():
    """The warm activation benchmark's case: a create, then an event 10 ms later."""
    notify, clock, later, sent = _notifier()
    notify("t", "v")
    clock[0] = 0.010
    notify("t", "v")
    assert [s[0] for s in sent] == [0.0, 0.010] and not later.timers
    clock[0] = 5.0  # after a quiet while, the bucket is full again
    for _ in range(4):
        notify("t", "v")
    assert len(sent) == 6 and not later.timers


def test_delayed_calls_run_in_time_order_on_one_thread_and_a_failure_stops_none(caplog):
    """The default `later` of a Notifier: one thread, started once, runs every call."""
    later = notify_module._Later()
    ran, done = [], threading.Event()

    def note(name):
        ran.append((name, threading.current_thread() is later._thread))
        if len(ran) == 3:
            done.set()

    def broken():
        raise RuntimeError("a failing call")

    later(0.06, note, "c")
    later(0.0, broken)
    later(0.02, note, "a")
    later(0.04, note, "b")
    assert done.wait(10)
    assert ran == [("a", True), ("b", True), ("c", True)]
    assert "a delayed call" in caplog.text and "a failing call" in caplog.text
