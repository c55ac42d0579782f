"""Group commit: the writes of concurrent activations of one process share one transaction.

Also what every writer of those writes shares: their names and signatures
(`ActivationWriteQueue`) and how a batch of them is committed (`commit_batch`)."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..errors import JournalUnavailableError
from .faults import retried
from .schema import ActivationState, Claim, LeaseLostError

if TYPE_CHECKING:
    from . import Journal


class ActivationWriteQueue:
    """The writes activations make while they run, awaitable: each is the journal's
    method of the same name (without its connection), and returns once a commit holds
    it. `GroupCommit` runs them in this process; `node_writer.NodeWriterClient` sends
    them to the process that commits for the whole machine. `_submit(name, args)`
    is the one thing each provides."""

    #: The writes, by name (the journal's methods are these with a leading underscore).
    NAMES = ("claim_due", "claim_and_load", "renew_leases", "record_step", "take_event",
             "count_crash", "end_activation", "release")

    async def claim_due(self, *args: Any) -> list[Claim]:
        return await self._submit("claim_due", args)

    async def claim_and_load(self, *args: Any) -> list[ActivationState]:
        return await self._submit("claim_and_load", args)

    async def renew_leases(self, *args: Any) -> None:
        return await self._submit("renew_leases", args)

    async def record_step(self, *args: Any) -> bool:
        return await self._submit("record_step", args)

    async def take_event(self, *args: Any) -> tuple[str, str, float] | None:
        return await self._submit("take_event", args)

    async def count_crash(self, pk: int) -> int:
        return await self._submit("count_crash", (pk,))

    async def end_activation(self, *args: Any) -> None:
        return await self._submit("end_activation", args)

    async def release(self, *args: Any) -> bool:
        return await self._submit("release", args)

    def _submit(self, name: str, args: tuple) -> Awaitable[Any]:
        raise NotImplementedError


class GroupCommit(ActivationWriteQueue):
    """Group commit: the writes of concurrent activations in one process share commits.

    Each awaitable method queues its write and returns when the transaction that holds
    it has committed, so a step is durable before `step.do` returns, as with the
    journal's plain methods. One writer thread takes every write queued meanwhile, runs
    them in one transaction and commits them together: while it commits, the next
    writes queue up; those that queue while it waits for its transaction to begin (on
    SQLite, for its process's turn on the file) join the batch. A write that fails
    raises to its own caller only (`commit_batch`, which the machine writer of
    `node_writer` runs too). Its numbers (`stats`) say how well it groups.
    """

    def __init__(self, journal: "Journal"):
        self._journal = journal
        self._queue: list[tuple[Any, tuple, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stats = {"group_commits": 0, "group_writes": 0, "group_max": 0}
        threading.Thread(target=self._run, name="dynwf-group-commit", daemon=True).start()

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _submit(self, name: str, args: tuple) -> asyncio.Future:
        return self._enqueue(getattr(self._journal, f"_{name}"), args)

    def _enqueue(self, fn: Any, args: tuple) -> asyncio.Future:
        """Queue `fn(conn, *args)` for the next commit; a future of its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the journal is closed")
            self._queue.append((fn, args, loop, future))
            self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                batch, self._queue = self._queue, []
            results = self._commit(batch)
            # One wake-up per event loop (a host process has one), not one per write.
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for (_, _, loop, future), result in zip(batch, results):
                by_loop.setdefault(loop, []).append((future, result))
            for loop, settled in by_loop.items():
                try:
                    loop.call_soon_threadsafe(settle, settled)
                except RuntimeError:  # that caller's loop is closed: nobody waits
                    pass

    def _commit(self, batch: list) -> list[tuple[bool, Any]]:
        results, together = commit_batch(self._journal, batch, self._take_queued)
        if together:
            self._stats["group_commits"] += 1
            self._stats["group_writes"] += len(batch)
            self._stats["group_max"] = max(self._stats["group_max"], len(batch))
        return results

    def _take_queued(self) -> list:
        with self._cond:
            queued, self._queue = self._queue, []
        return queued


def commit_batch(journal: "Journal", batch: list,
                 top_up: Callable[[], list]) -> tuple[list[tuple[bool, Any]], bool]:
    """Run a batch of writes in one transaction: its items begin with (fn, args), each
    write being `fn(conn, *args)`. Returns one (ok, result or error) per item, and
    whether they were committed together (one commit). Once the
    transaction has begun, the items `top_up()` returns join the batch (appended in
    place, so the caller answers them too): on SQLite, those that queued while the
    writer waited for its turn on the file.

    A write that finds its lease lost raises before it writes anything (the fence is
    its first statement), so it fails alone; any other error rolls the whole batch
    back and runs each write in a transaction of its own, so that one bad write cannot
    fail the others; an unavailable journal fails them all (it is nothing one write
    did)."""
    try:
        return _together(journal, batch, top_up), True
    except JournalUnavailableError as exc:
        return [(False, exc)] * len(batch), False
    except Exception:  # noqa: BLE001 - one by one, below
        return [_alone(journal, item) for item in batch], False


@retried
def _together(journal: "Journal", batch: list, top_up: Callable[[], list]) -> list[tuple[bool, Any]]:
    """The batch's writes in one transaction (tried again on a transient fault)."""
    results: list[tuple[bool, Any]] = []
    with journal._write() as conn:
        batch.extend(top_up())
        for item in batch:
            try:
                results.append((True, item[0](conn, *item[1])))
            except LeaseLostError as exc:
                results.append((False, exc))
    return results


def _alone(journal: "Journal", item: tuple) -> tuple[bool, Any]:
    try:
        with journal._write() as conn:
            return True, item[0](conn, *item[1])
    except Exception as exc:  # noqa: BLE001 - raised to its own caller
        return False, exc


def settle(settled: list[tuple[asyncio.Future, tuple[bool, Any]]]) -> None:
    """Give each waiting future its (ok, result or error)."""
    for future, (ok, value) in settled:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
