"""`dynwf_ray.testing`: run a tenant's workflow in-process, on a virtual clock, for tests.

This module owns the tenant author's test harness (docs/testing.md): `WorkflowTest`
(one private journal, one virtual clock, the mocks), `WorkflowRun` (one instance
of it: drive it on, send it events, read its status, steps and logs), `StepRun`
(one recorded step), `load_workflow` (the class a push of a directory would run)
and `WorkflowTestError`.

Nothing here is a copy of the engine: an instance lives in a real `Journal` (a
SQLite file in a temporary directory, dropped when the test closes), is created
and signalled through a real `WorkflowBinding`, and is run by
`activation.activate` with the in-process runner, as `tests/driver.py` does. The
harness plays the scheduler: it activates whatever is due, and when nothing is,
moves the virtual clock to the next timer (a sleep's end, a retry's next
attempt) instead of waiting. A wait's deadline is not such a timer: an instance
that waits for an event the test has not sent stays waiting and `run()` returns
(unless the test forced that wait to time out, or `advance()` moves the clock
past the deadline).

Mocks replace the *callback* a step runs, never the step: the real `Step`
records the attempt, applies retries and backoff, `NonRetryableError`, JSON
checks and replay. A forced step timeout spends the step's timeout on the
virtual clock and fails the attempt with the `StepTimeoutError` a real timeout
raises; a forced wait timeout moves the clock to the wait's deadline, where the
real wait raises `WorkflowTimeoutError`.

No Ray here (tenant authors import this in their own test runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import tomllib
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from .activation import InProcess, activate
from .binding import InstanceHandle, WorkflowBinding
from .entrypoint import WorkflowEntrypoint
from .errors import InvalidInputError
from .journal import STEP_COMPLETE, STEP_FAILED, TERMINAL, ActivationState, Journal, StepRecord
from .types import InstanceStatus
from .logs import LogCapture, _Tee
from .step import Step
from .types import LogLine, parse_duration, takes_context, validate_id, validate_step_name

__all__ = ["StepRun", "WorkflowRun", "WorkflowTest", "WorkflowTestError", "load_workflow"]

#: Where the virtual clock starts unless a test says otherwise.
DEFAULT_START = datetime(2025, 1, 1, tzinfo=timezone.utc)
_CODE_VERSION = "test"
_OWNER = "dynwf-testing"
_LEASE_TTL = 30.0
_KEEP_LOGS = 100_000
_UNSET: Any = object()


class WorkflowTestError(Exception):
    """The harness could not do what the test asked: a run went over its step budget,
    a step that was asked for is not recorded, a mock is malformed."""


class _OverBudget(BaseException):
    """Internal: ends an activation that went over the step budget (a BaseException, so
    that neither the tenant's `except Exception` nor the step's retries catch it)."""


# -- the records a test reads -----------------------------------------------------------


@dataclass(frozen=True)
class StepRun:
    """One recorded step of an instance, as the journal holds it.

    `kind`: "do", "sleep", "wait", or "rollback" for the compensation of the step
    `name` (`count` is that step's count). `status`: "complete", "failed",
    "retrying" (attempts failed, another is due) or "waiting" (a wait not over).
    `result`: the step's result for a do or a rollback, the received event's
    payload for a wait, None for a sleep. `error`: {"name", "message"} of the last failed attempt (a do), or of a
    wait's timeout; None once a do completed. `started` and `finished` are virtual
    seconds since the instance was created (`finished` is None while not over)."""

    name: str
    count: int
    kind: str
    status: str
    attempts: int
    result: Any
    error: dict[str, str] | None
    started: float
    finished: float | None


def _step_run(record: StepRecord, origin: float) -> StepRun:
    result: Any = None
    if record.result_json is not None and record.status == STEP_COMPLETE and record.kind != "sleep":
        value = json.loads(record.result_json)
        result = value["payload"] if record.kind == "wait" else value
    error = (
        {"name": record.error_name, "message": record.error_message or ""}
        if record.error_name else None
    )
    return StepRun(
        name=record.name, count=-record.seq if record.kind == "rollback" else record.seq,
        kind=record.kind, status=record.status,
        attempts=record.attempts, result=result, error=error,
        started=record.started_at - origin,
        finished=None if record.finished_at is None else record.finished_at - origin,
    )


# -- mocks ------------------------------------------------------------------------------


@dataclass
class _Mock:
    name: str
    count: int | None
    times: int | None
    result: Any = _UNSET
    error: BaseException | None = None
    timeout: bool = False
    fn: Callable[..., Any] | None = None
    rollback: bool = False

    def applies(self, name: str, count: int, rollback: bool) -> bool:
        return (self.name == name and self.rollback == rollback
                and (self.count is None or self.count == count))


# -- the harness ------------------------------------------------------------------------


class WorkflowTest:
    """A private journal and a virtual clock to run one workflow class in, with mocks.

    `env`: what the class gets as `self.env`; unless it has "WORKFLOWS", that is
    the tenant's binding on the test's journal (`binding`), so children it creates
    run in the test too. `start`: where the virtual clock starts (a datetime,
    naive means UTC, or a UNIX timestamp). `max_steps`: the most steps one
    `run()`, `resume()` or `advance()` may execute (attempts, sleeps and waits not
    over, each time they do work; replayed steps are free) before it raises
    `WorkflowTestError` instead of looping forever.

    Use it as a context manager (or call `close()`) to drop the journal at once;
    otherwise it is dropped when the object is garbage-collected.
    """

    def __init__(
        self,
        workflow: type[WorkflowEntrypoint],
        *,
        env: Mapping[str, Any] | None = None,
        start: datetime | float | None = None,
        tenant: str = "test",
        max_steps: int = 1000,
    ):
        if not (isinstance(workflow, type) and issubclass(workflow, WorkflowEntrypoint)):
            raise TypeError(f"WorkflowTest needs a WorkflowEntrypoint subclass, got {workflow!r}")
        if workflow.run is WorkflowEntrypoint.run:
            raise TypeError(f"{workflow.__name__} does not implement run(event, step)")
        self.workflow = workflow
        self.tenant = validate_id(tenant, "tenant id")
        self.max_steps = max_steps
        self._now = _timestamp(DEFAULT_START if start is None else start)
        self._dir = tempfile.mkdtemp(prefix="dynwf-test-")
        try:
            self._journal = Journal(
                f"sqlite:///{os.path.join(self._dir, 'journal.db')}", synchronous="OFF"
            )
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _drop, self._journal, self._dir)
        self._journal.save_code(self.tenant, _CODE_VERSION, "test", b"", self._now)
        self.binding = WorkflowBinding(self._journal, self.tenant, clock=self._clock)
        env = dict(env or {})
        env.setdefault("WORKFLOWS", self.binding)
        self.env: dict[str, Any] = env
        self._mocks: list[_Mock] = []
        self._mock_uses: dict[tuple[int, int], int] = {}  # (instance pk, id(mock)) -> uses
        self._forced_waits: set[tuple[str, int | None]] = set()
        self._order: dict[int, list[tuple[str, int]]] = {}  # first-seen order of steps
        self._seen: dict[int, set[tuple[str, int]]] = {}
        self._work = 0
        self._runs = 0

    # -- lifecycle --

    def __enter__(self) -> "WorkflowTest":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the journal and delete its temporary directory."""
        self._finalizer()

    # -- the clock --

    def _clock(self) -> float:
        """The virtual clock (UNIX seconds): what the engine's code reads as now."""
        return self._now

    @property
    def now(self) -> datetime:
        """The virtual time now (UTC)."""
        return datetime.fromtimestamp(self._now, timezone.utc)

    # -- mocks --

    def mock_step(
        self,
        name: str,
        *,
        result: Any = _UNSET,
        error: BaseException | type[BaseException] | None = None,
        timeout: bool = False,
        fn: Callable[..., Any] | None = None,
        times: int | None = None,
        count: int | None = None,
        rollback: bool = False,
    ) -> None:
        """Replace the callback of the step `name` (every occurrence, or only the
        `count`-th) with exactly one of: returning `result`; raising `error` (an
        exception or its class); timing out (`timeout=True`: the attempt takes the
        step's timeout and fails with `StepTimeoutError`); or calling `fn` instead
        (with the `StepContext` when it takes one).

        With `times=N` the mock answers the next N attempts, then the step's next
        mock for that name (mocks stack in the order they were added), or its real
        callback when there is none. Without `times` it answers every attempt.
        Each instance uses the mocks from the start. With `rollback=True` the mock
        replaces the step's compensation (its `rollback=` callback) instead."""
        validate_step_name(name)
        given = sum((result is not _UNSET, error is not None, bool(timeout), fn is not None))
        if given != 1:
            raise WorkflowTestError(
                f"mock_step({name!r}): give exactly one of result=, error=, timeout=True or fn="
            )
        if times is not None and (not isinstance(times, int) or times < 1):
            raise WorkflowTestError(f"mock_step({name!r}): times must be a positive int, got {times!r}")
        if count is not None and (not isinstance(count, int) or count < 1):
            raise WorkflowTestError(f"mock_step({name!r}): count must be a positive int, got {count!r}")
        if isinstance(error, type):
            if not issubclass(error, Exception):
                raise WorkflowTestError(f"mock_step({name!r}): error must be an Exception, got {error!r}")
            error = error()
        elif error is not None and not isinstance(error, Exception):
            raise WorkflowTestError(f"mock_step({name!r}): error must be an Exception, got {error!r}")
        if fn is not None and not callable(fn):
            raise WorkflowTestError(f"mock_step({name!r}): fn must be callable, got {fn!r}")
        self._mocks.append(
            _Mock(name, count, times, result=result, error=error, timeout=bool(timeout), fn=fn,
                  rollback=bool(rollback))
        )

    def force_wait_timeout(self, name: str, *, count: int | None = None) -> None:
        """Make the wait `name` (every occurrence, or only the `count`-th) time out:
        when an instance waits there for an event it has not got, the clock moves to
        the wait's deadline and the wait raises `WorkflowTimeoutError`, as it would
        have if nobody had sent the event in time. An event already sent still wins."""
        validate_step_name(name)
        self._forced_waits.add((name, count))

    # -- instances --

    def run(
        self,
        params: Any = None,
        *,
        id: str | None = None,
        events: Iterable[tuple[str, Any]] = (),
    ) -> "WorkflowRun":
        """Create an instance with `params`, send it `events` ((type, payload) pairs,
        buffered before it first runs), and drive it: see `WorkflowRun.resume`."""
        self._runs += 1
        handle = self.binding.create(id=id or f"run-{self._runs}", params=params)
        for event_type, payload in events:
            handle.send_event(event_type, payload)
        return WorkflowRun(self, handle).resume()

    def get(self, id: str) -> "WorkflowRun":
        """Another instance of the test's tenant, say a child the workflow created."""
        return WorkflowRun(self, self.binding.get(id))

    # -- the scheduler's part --

    def _drive(self, target: str, until: float | None = None) -> None:
        """Activate what is due and skip the clock to the next timer, until the target
        instance (an id) is settled; with `until`, until the clock reaches it instead."""
        self._work = 0
        activations = 0
        while True:
            if self._activate_next():
                activations += 1
                if activations > self.max_steps:
                    raise WorkflowTestError(
                        f"more than {self.max_steps} activations in one call: the workflow "
                        "does not settle (raise max_steps if it should)"
                    )
                continue
            if until is None:
                info = self._journal.require_instance(self.tenant, target)
                if info.status in TERMINAL or info.status == InstanceStatus.paused:
                    return
            timer = self._next_timer(with_waits=until is not None)
            if until is not None and (timer is None or timer > until):
                self._now = max(self._now, until)
                if self._activate_next():  # something due exactly at `until`
                    continue
                return
            if timer is None:
                return
            if timer <= self._now:
                raise WorkflowTestError(
                    f"an instance of tenant {self.tenant!r} is due at {timer} but cannot be "
                    "claimed (is it leased by an activation that did not end?)"
                )
            self._now = timer

    def _activate_next(self) -> bool:
        claims = self._journal.claim_due(self._now, 1, _OWNER, _LEASE_TTL, tenant_id=self.tenant)
        if not claims:
            return False
        claim = claims[0]
        runner = _Runner(self.workflow, self.env, self, claim.pk)
        try:
            with _capturing_logs():
                outcome = _run_sync(
                    lambda: activate(
                        self._journal, claim.pk, claim.token, runner, clock=self._clock,
                        lease_ttl=_LEASE_TTL, capture_logs=True, keep_logs=_KEEP_LOGS,
                    )
                )
        except _OverBudget:
            self._journal.release(claim.pk, claim.token, self._now, self._now)
            raise WorkflowTestError(
                f"instance {claim.instance_id!r} ran more than {self.max_steps} steps in one "
                "call without settling: an endless loop? (raise max_steps if it should)"
            ) from None
        except BaseException:  # SystemExit from tenant code, a bug: leave it claimable
            self._journal.release(claim.pk, claim.token, self._now, self._now)
            raise
        if outcome == "journal_unavailable":
            raise WorkflowTestError(
                f"the test's journal could not be written while running {claim.instance_id!r}"
            )
        return True

    def _next_timer(self, with_waits: bool) -> float | None:
        """The earliest timer of the tenant's instances that the clock may skip to."""
        timers = []
        for info in self._journal.list_instances(self.tenant, limit=1_000_000):
            if info.wake_at is None or info.status in TERMINAL or info.status == InstanceStatus.paused:
                continue
            if info.waiting_for is not None and not with_waits and not self._forced(info.pk):
                continue
            timers.append(info.wake_at)
        return min(timers, default=None)

    def _forced(self, pk: int) -> bool:
        if not self._forced_waits:
            return False
        for record in self._journal.list_steps(pk):
            if record.kind == "wait" and record.status not in (STEP_COMPLETE, STEP_FAILED):
                if (record.name, None) in self._forced_waits or (record.name, record.seq) in self._forced_waits:
                    return True
        return False

    # -- used by the step proxy --

    def _take_mock(self, pk: int, name: str, count: int, rollback: bool) -> _Mock | None:
        for mock in self._mocks:
            if not mock.applies(name, count, rollback):
                continue
            key = (pk, id(mock))
            used = self._mock_uses.get(key, 0)
            if mock.times is not None and used >= mock.times:
                continue
            self._mock_uses[key] = used + 1
            return mock
        return None

    def _has_mocks(self, name: str, rollback: bool = False) -> bool:
        return any(m.name == name and m.rollback == rollback for m in self._mocks)

    def _note(self, pk: int, key: tuple[str, int]) -> None:
        seen = self._seen.setdefault(pk, set())
        if key not in seen:
            seen.add(key)
            self._order.setdefault(pk, []).append(key)

    def _did_work(self) -> None:
        self._work += 1
        if self._work > self.max_steps:
            raise _OverBudget()


class WorkflowRun:
    """One instance of a `WorkflowTest`: drive it, signal it, read what it did.

    Reading `status`, `output`, `error`, `steps` or `logs` reads the journal, so it
    always says where the instance is now."""

    def __init__(self, test: WorkflowTest, handle: InstanceHandle):
        self.test = test
        self.handle = handle  # the platform's handle: pause(), terminate(), restart(), ...
        self.id = handle.id
        info = test._journal.require_instance(test.tenant, handle.id)
        self._pk = info.pk
        self._created = info.created_at

    def __repr__(self) -> str:
        info = self._load()
        parts = [f"WorkflowRun {self.id!r}: {info.status}", f"elapsed {self.elapsed:g} s"]
        if info.status == InstanceStatus.waiting and info.waiting_for:
            parts.append(f"waiting for {info.waiting_for!r}")
        if info.error_name:
            parts.append(f"error {info.error_name}: {info.error_message}")
        if info.output_json is not None:
            parts.append(f"output {info.output_json[:200]}")
        return "<" + ", ".join(parts) + ">"

    # -- driving --

    def resume(self) -> "WorkflowRun":
        """Run on: activate what is due, skipping the clock over sleeps and retry
        delays, until the instance is complete, errored, terminated or paused, or
        waits for an event that has not been sent (a wait whose timeout was forced
        times out instead). Other instances of the test run meanwhile as they fall
        due (children). Returns this run."""
        self.test._drive(self.id)
        return self

    def advance(self, duration: Any) -> "WorkflowRun":
        """Let `duration` (seconds, a timedelta or "30 minutes") pass on the clock,
        running whatever falls due on the way, wait deadlines included; it stops at
        that time even if a sleep is not over. Returns this run."""
        seconds = parse_duration(duration, "advance()")
        self.test._drive(self.id, until=self.test._now + seconds)
        return self

    def send_event(self, type: str, payload: Any = None) -> "WorkflowRun":
        """Send an event (as `instance.send_event` does); call `resume()` to let the
        instance take it. Returns this run."""
        self.handle.send_event(type, payload)
        return self

    # -- reading --

    def _load(self) -> Any:
        return self.test._journal.require_instance(self.test.tenant, self.id)

    @property
    def status(self) -> str:
        """One of queued, waiting, paused, complete, errored or terminated."""
        return self._load().status

    @property
    def output(self) -> Any:
        """What run() returned (None until the instance is complete)."""
        info = self._load()
        return json.loads(info.output_json) if info.output_json is not None else None

    @property
    def error(self) -> dict[str, str] | None:
        """{"name", "message"} of an errored instance (as `instance.status()` says)."""
        info = self._load()
        return {"name": info.error_name, "message": info.error_message or ""} if info.error_name else None

    @property
    def waiting_for(self) -> str | None:
        """The event type the instance waits for, if it does."""
        info = self._load()
        return info.waiting_for if info.status == InstanceStatus.waiting else None

    @property
    def now(self) -> datetime:
        """The virtual time now (UTC)."""
        return self.test.now

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the instance was created (sleeps, retry delays, step
        timeouts and wait deadlines that passed included)."""
        return self.test._now - self._created

    @property
    def steps(self) -> list[StepRun]:
        """The instance's recorded steps, in the order run() reached them."""
        records = self.test._journal.list_steps(self._pk)
        rank = {key: i for i, key in enumerate(self.test._order.get(self._pk, ()))}
        records.sort(key=lambda r: (rank.get((r.name, r.seq), len(rank)), r.started_at))
        return [_step_run(r, self._created) for r in records]

    def step(self, name: str, count: int = 1, *, rollback: bool = False) -> StepRun:
        """The `count`-th step called `name` (with `rollback=True`, its compensation);
        `WorkflowTestError` if it is not recorded."""
        steps = self.steps
        for s in steps:
            if s.name == name and s.count == count and (s.kind == "rollback") == rollback:
                return s
        have = ", ".join(
            f"{s.name!r}#{s.count}" + (" (rollback)" if s.kind == "rollback" else "") for s in steps
        ) or "none"
        what = "rollback of step" if rollback else "step"
        raise WorkflowTestError(
            f"instance {self.id!r} has no {what} {name!r} (count {count}); recorded: {have}"
        )

    @property
    def logs(self) -> list[LogLine]:
        """What the instance's code printed or logged, oldest first; each line says
        which step, count and attempt printed it (None: run() itself)."""
        return self.test._journal.read_logs(self._pk, 0, _KEEP_LOGS)


# -- the runner and the step it hands to run() ------------------------------------------


class _Runner(InProcess):
    """The in-process runner, with a step that knows the test's mocks and budget."""

    def __init__(self, workflow: type[WorkflowEntrypoint], env: Mapping[str, Any], test: WorkflowTest, pk: int):
        super().__init__(workflow, env)
        self._test = test
        self._pk = pk

    async def run(self, state: ActivationState, event: Any, step: Step, trace: Any) -> Any:
        return await super().run(state, event, _TestStep(step, state, self._test, self._pk), trace)


class _TestStep:
    """The `step` run() gets: the activation's real `Step`, with the callbacks of mocked
    steps replaced and the work counted against the test's budget."""

    def __init__(self, step: Step, state: ActivationState, test: WorkflowTest, pk: int):
        self._step = step
        self._test = test
        self._pk = pk
        self._records = {(s.name, s.seq): s for s in state.steps}
        self._counts: dict[str, int] = {}

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._step, attr)

    def _key(self, name: Any, count: int | None) -> tuple[str, int] | None:
        """(name, occurrence) as the real step will count it (None for a bad name: the
        real step raises for it), counted as work unless the journal already answers it."""
        if not isinstance(name, str) or not name:
            return None
        seq = self._counts.get(name, 0) + 1 if count is None else count
        self._counts[name] = max(seq, self._counts.get(name, 0))
        return self._work_on((name, seq))

    def _work_on(self, key: tuple[str, int]) -> tuple[str, int]:
        record = self._records.get(key)
        replayed = record is not None and record.status in (STEP_COMPLETE, STEP_FAILED) and (
            record.kind != "sleep" or record.finished_at is not None
        )
        if not replayed:
            self._test._did_work()
        return key

    def _noted(self, key: tuple[str, int] | None) -> None:
        if key is not None:
            self._test._note(self._pk, key)

    # Options are passed through as they are: the real step validates them.

    async def do(self, name: str, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        key = self._key(name, options.get("count"))
        if key is not None and callable(fn) and self._test._has_mocks(name):
            fn = self._mocked(name, fn)
        try:
            return await self._step.do(name, fn, **options)
        finally:
            self._noted(key)

    async def undo(self, name: str, count: int, fn: Callable[[], Any], options: dict) -> Any:
        """A compensation (rollback.py), recorded under the step's count negated."""
        key = self._work_on((name, -count))
        if callable(fn) and self._test._has_mocks(name, rollback=True):
            fn = self._mocked(name, fn, rollback=True)
        try:
            return await self._step.undo(name, count, fn, options)
        finally:
            self._noted(key)

    def _mocked(self, name: str, real: Callable[..., Any], rollback: bool = False) -> Callable[[Any], Any]:
        test, pk = self._test, self._pk
        real_takes_context = takes_context(real)

        def callback(ctx: Any) -> Any:  # called by the real step, once per attempt
            mock = test._take_mock(pk, name, -ctx.count if rollback else ctx.count, rollback)
            if mock is None:
                return real(ctx) if real_takes_context else real()
            if mock.fn is not None:
                return mock.fn(ctx) if takes_context(mock.fn) else mock.fn()
            if mock.error is not None:
                raise mock.error.with_traceback(None)
            if mock.timeout:
                test._now += ctx.config.timeout  # the attempt ran that long
                raise Step._timeout_error(name, ctx.attempt, ctx.config)
            return mock.result

        return callback

    async def sleep(self, name: str, duration: Any, **options: Any) -> None:
        key = self._key(name, options.get("count"))
        try:
            return await self._step.sleep(name, duration, **options)
        finally:
            self._noted(key)

    async def sleep_until(self, name: str, when: Any, **options: Any) -> None:
        key = self._key(name, options.get("count"))
        try:
            return await self._step.sleep_until(name, when, **options)
        finally:
            self._noted(key)

    async def wait_for_event(self, name: str, **options: Any) -> Any:
        key = self._key(name, options.get("count"))
        try:
            return await self._step.wait_for_event(name, **options)
        finally:
            self._noted(key)


# -- loading a tenant directory ----------------------------------------------------------


def load_workflow(directory: str | os.PathLike) -> type[WorkflowEntrypoint]:
    """The class `engine.push_tenant(tenant, directory)` would run: `dynwf.toml`'s
    `entrypoint` (default "workflow"), resolved as a push resolves it (with a module
    alone, its one `WorkflowEntrypoint` subclass). The directory goes first on
    `sys.path`, as in a sandbox, and stays there. A module of the same name imported
    earlier from elsewhere (another tenant's `workflow`), and every module imported
    from a directory loaded earlier (its `helper`), is imported again from here.
    `[env]` and `pip` are not applied: set variables with pytest's `monkeypatch`."""
    from .sandbox.runtime import resolve_entrypoint

    root = Path(directory).resolve()
    if not root.is_dir():
        raise InvalidInputError(f"tenant code path {str(directory)!r} is not a directory")
    entrypoint = "workflow"
    manifest = root / "dynwf.toml"
    if manifest.exists():
        try:
            entrypoint = tomllib.loads(manifest.read_text()).get("entrypoint", entrypoint)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError(f"{manifest}: not valid TOML: {exc}") from None
        if not isinstance(entrypoint, str):
            raise InvalidInputError(f"{manifest}: entrypoint must be a string")
    top = entrypoint.partition(":")[0].split(".")[0]
    others = tuple(str(d) + os.sep for d in _LOADED if d != root)
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if name == top or name.startswith(top + "."):
            if origin is None or root not in Path(origin).resolve().parents:
                del sys.modules[name]  # someone else's module of that name
        elif others and isinstance(origin, str) and origin.startswith(others):
            del sys.modules[name]  # a module of a directory loaded before (its `helper`)
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    if root not in _LOADED:
        _LOADED.append(root)
    return resolve_entrypoint(entrypoint)[1]


#: The tenant directories `load_workflow` put on `sys.path`, in this process.
_LOADED: list[Path] = []


# -- helpers -----------------------------------------------------------------------------


def _timestamp(when: datetime | float) -> float:
    if isinstance(when, datetime):
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        return float(when)
    raise TypeError(f"start must be a datetime or a UNIX timestamp, got {when!r}")


def _drop(journal: Journal, directory: str) -> None:
    try:
        journal.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run_sync(make: Callable[[], Any]) -> Any:
    """Run a coroutine to its end from synchronous code, also when this thread is
    already running an event loop (an async test): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name="dynwf-testing")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@contextlib.contextmanager
def _capturing_logs() -> Iterator[None]:
    """Capture what tenant code prints or logs in this process, as a sandbox's runtime
    does in its own (unless this process already captures it)."""
    if isinstance(sys.stdout, _Tee):
        yield
        return
    capture = LogCapture().install()
    try:
        yield
    finally:
        capture.uninstall()
