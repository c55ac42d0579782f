"""How a caller's news that work is due reaches the hosts that run it.

Whoever creates an instance or sends an event (the platform's driver, a host whose
tenant code creates instances, the HTTP API) calls its `Notifier`, which coalesces
notifications per code version and hands them to a `Router`. The router asks the
scheduler once which hosts serve that version (`Scheduler.notify`, which also wakes
them) and from then on wakes those hosts itself: by a datagram to a host process on
the same machine (`wakeup.py`), else by one Ray call. The scheduler stays off this
path but for a version it has not named hosts for, a route to refresh (each second)
or a host that no longer serves. A notification is only a hint: hosts and the
scheduler also poll the journal (`poll_interval`).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import Any, Callable

from . import wakeup

log = logging.getLogger("dynwf_ray.notify")


class Notifier:
    """What callers use to `notify` that work is due (to the hosts of its code version, or
    the scheduler: `Router`), coalesced per code version.

    Each version has a bucket of `burst` notifications that refills at one per `window`
    seconds: a notification that finds one goes at once; the rest of a burst wait for
    the next to refill, and only one of them is sent then (the work they announce is in
    the journal; one wake finds all of it). So a steady stream of creates costs at most
    one notification per `window`, none waits longer than `window`, and an event sent
    a few milliseconds after its instance was created is not held back by the create's
    notification. With datagram wakes a notification is cheap, and the window short (5 ms:
    with 20 ms, the warm activation benchmark's events waited 5-10 ms for it).
    `later(delay, fn, *args)` runs fn after delay seconds (by default on the
    process's one `_Later` thread); tests pass a fake, and a fake `clock`."""

    def __init__(self, send: Callable[[str, str | None], Any], window: float = 0.005,
                 burst: int = 4, clock: Callable[[], float] = time.monotonic,
                 later: Callable[..., Any] | None = None):
        self._send = send
        self._window = window
        self._burst = burst
        self._clock = clock
        self._later = later or _LATER
        self._lock = threading.Lock()
        # (tenant, version) -> (notifications in its bucket, when it was last filled)
        self._buckets: dict[tuple[str, str | None], tuple[float, float]] = {}
        self._pending: set[tuple[str, str | None]] = set()

    def __call__(self, tenant_id: str, version: str | None) -> None:
        key = (tenant_id, version)
        with self._lock:
            if key in self._pending:
                return  # the one to be sent covers this one
            tokens = self._take(key)
            if tokens is not None:
                self._pending.add(key)
                self._later((1 - tokens) * self._window, self._trailing, key)
                return
        self._send(tenant_id, version)

    def _take(self, key: tuple[str, str | None]) -> float | None:
        """Take a notification from the key's bucket (None), or say how full it is."""
        now = self._clock()
        tokens, filled = self._buckets.get(key, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + (now - filled) / self._window)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > 10_000:  # forget versions not heard of for a while
                self._buckets = {k: b for k, b in self._buckets.items()
                                 if now - b[1] < self._burst * self._window}
            return None
        self._buckets[key] = (tokens, now)
        return tokens

    def _trailing(self, key: tuple[str, str | None]) -> None:
        with self._lock:
            self._pending.discard(key)
            now = self._clock()
            tokens, filled = self._buckets.get(key, (1.0, now))
            tokens = min(float(self._burst), tokens + (now - filled) / self._window)
            self._buckets[key] = (max(0.0, tokens - 1), now)
        self._send(*key)


class _Later:
    """Internal: runs `fn(*args)` `delay` seconds from now, on one daemon thread per
    process (started at the first call). A thread per call (`threading.Timer`) cost a
    thread start for each trailing notification, up to one per version every 5 ms under
    steady creates, and the creating caller waited for each to start. What `fn` raises
    is logged; the thread goes on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Callable[..., Any], tuple]] = []  # a heap
        self._count = 0  # orders calls due at the same moment
        self._thread: threading.Thread | None = None

    def __call__(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        with self._cond:
            self._count += 1
            heapq.heappush(self._due, (time.monotonic() + delay, self._count, fn, args))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="dynwf-later", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._cond.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, fn, args = heapq.heappop(self._due)
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - one failed call must not end the others
                log.exception("a delayed call (%s) failed", getattr(fn, "__qualname__", fn))


_LATER = _Later()


#: Seconds after which a caller that uses a route asks the scheduler to name the
#: version's hosts again (it still wakes those it knows meanwhile); seconds after which
#: a route not used is forgotten.
ROUTE_TTL, ROUTE_MAX_AGE = 1.0, 60.0


class Router:
    """Where a caller's notifications go (what its `Notifier` sends).

    The first notification for a code version goes to the scheduler, which wakes the
    version's hosts that have slots and names them back (`Scheduler.notify`). From then
    on the caller wakes those hosts itself: by a datagram to a host process on the same
    machine (`wakeup`), else by one Ray hop. A route in use is refreshed from the
    scheduler every `ttl` seconds (that notification wakes the hosts twice), so hosts
    started since are named too; one unused for `max_age` is forgotten. Waking is
    harmless: a host claims only within its quota. A host that no longer serves the
    version answers so (or is gone), and the scheduler is told instead (a host process
    woken by datagram tells it itself); so is a version whose hosts had no slot (the
    scheduler ticks for it). `scheduler` returns the scheduler's actor handle
    (ValueError: no scheduler runs); `address_of` a host process's wake socket (None:
    none on this machine).
    """

    def __init__(self, scheduler: Callable[[], Any], ttl: float = ROUTE_TTL,
                 clock: Callable[[], float] = time.monotonic,
                 address_of: Callable[[Any], str | None] = wakeup.address_of,
                 max_age: float = ROUTE_MAX_AGE):
        self._scheduler = scheduler
        self._ttl = ttl
        self._max_age = max_age
        self._clock = clock
        self._address_of = address_of
        self._datagrams = wakeup.WakeSender()
        self._lock = threading.Lock()
        # (tenant, version) -> (when named or refreshed, [(host id, its process's handle,
        # its wake socket)])
        self._routes: dict[tuple[str, str], tuple[float, list[tuple[int, Any, str | None]]]] = {}

    def __call__(self, tenant_id: str, version: str | None) -> None:
        key = (tenant_id, version)
        ask = True
        if version is not None:
            now = self._clock()
            with self._lock:
                named = self._routes.get(key)  # type: ignore[arg-type]
                if named is not None and now - named[0] >= self._max_age:
                    named = None
                ask = named is None or now - named[0] >= self._ttl
                if named is not None and ask:  # one refresh per ttl, not one per call
                    named = self._routes[key] = (now, named[1])  # type: ignore[index]
            if named is not None:
                self._wake(key, named)
        if not ask:
            return
        try:
            answer = self._scheduler().notify.remote(tenant_id, version, version is not None)
        except ValueError:
            return  # no scheduler runs: the next one's poll finds the work
        if version is not None:
            answer.future().add_done_callback(lambda done, k=key: self._named(k, done))

    def _wake(self, key: tuple[str, str], named: tuple) -> None:
        tenant_id, version = key
        for host_id, actor, path in named[1]:
            if path is not None and self._datagrams.send(path, host_id, tenant_id, version):
                continue
            actor.wake.remote(host_id).future().add_done_callback(
                lambda done, n=named: self._woken(key, n, done))

    def _named(self, key: tuple[str, str], done: Any) -> None:
        try:
            hosts = done.result()
        except Exception:  # noqa: BLE001 - the scheduler restarted meanwhile: ask again next time
            hosts = None
        if hosts:
            hosts = [(host_id, actor, self._address_of(actor)) for host_id, actor in hosts]
        with self._lock:
            if hosts:
                self._routes[key] = (self._clock(), hosts)
            else:
                self._routes.pop(key, None)
            if len(self._routes) > 10_000:  # forget versions not heard of for a while
                now = self._clock()
                self._routes = {k: v for k, v in self._routes.items() if now - v[0] < self._max_age}

    def _woken(self, key: tuple[str, str], named: tuple, done: Any) -> None:
        try:
            served = done.result()
        except Exception:  # noqa: BLE001 - its process is gone
            served = False
        if not served:
            with self._lock:
                stale = self._routes.get(key) is named  # not a route named since
                if stale:
                    del self._routes[key]
            if stale:  # once per stale route, not once per host of it
                try:
                    self(*key)
                except Exception:  # noqa: BLE001 - Ray is shutting down: nobody waits
                    pass
