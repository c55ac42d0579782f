"""`Step`: what `run(event, step)` receives: `do`, `sleep`, `sleep_until`, `wait_for_event`.

Replay lives here. Each call is keyed by (name, occurrence count of that name
in this run). A key the journal already holds returns the recorded result (or
raises the recorded error) without running anything; a new key runs, and its
outcome is recorded durably, fenced by the activation's lease, before the
call returns. A sleep, wait or retry delay that is not over raises `Suspend`,
which ends the activation; a host of its code claims the instance again when it
is due.

Telemetry hooks in here too, each optional: an `InstanceTrace` gets a span
per attempt (current while the callback runs, so tenant spans nest under it)
and sleep and wait spans when they end; an `ActivationLog` learns which step
attempt is printing, and its lines go to the journal with the step's record;
`ActivityCounts` counts attempts, completions, failures and retries.

A journal write that fails because the journal cannot be used raises
`JournalFault` (an `Abandon`): the activation ends with nothing written and the
platform retries it; tenant code never sees the journal's error.

`Suspend`, `PauseAtBoundary` and `Abandon` derive from BaseException so that
tenant code catching `Exception` cannot swallow them (in a sandbox, tenant code
never sees them at all: the supervisor runs this class).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from dataclasses import replace
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Callable

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_fixed,
    wait_incrementing,
)

from .errors import (
    InstanceTerminatingError,
    InvalidInputError,
    JournalUnavailableError,
    NonRetryableError,
    StepFailedError,
    StepTimeoutError,
    WorkflowTimeoutError,
    invalid,
)
from .logs import ActivationLog
from .rollback import Compensations
from .metrics import ActivityCounts
from .tracing import InstanceTrace
from .journal import (
    STEP_COMPLETE,
    STEP_FAILED,
    STEP_RETRYING,
    STEP_WAITING,
    ActivationState,
    Journal,
    StepRecord,
)
from .types import (
    DEFAULT_STEP_CONFIG,
    DEFAULT_WAIT_TIMEOUT,
    MAX_SLEEP,
    Backoff,
    ReceivedEvent,
    RetryConfig,
    StepConfig,
    StepContext,
    parse_duration,
    takes_context,
    timestamp_to_datetime,
    to_json,
    validate_event_type,
    validate_step_name,
)


class Suspend(BaseException):
    """Internal: end this activation; activate again at `wake_at` (or on an event)."""

    def __init__(self, wake_at: float, waiting_for: str | None = None):
        super().__init__(wake_at, waiting_for)
        self.wake_at = wake_at
        self.waiting_for = waiting_for


class PauseAtBoundary(BaseException):
    """Internal: a pause was requested; stop before the next new step."""


class Abandon(BaseException):
    """Internal: end this activation with no outcome of the tenant's; the instance is
    released to be activated again at once. Raised when its sandbox died for no
    reason of the tenant's that could be recorded (`crash` counts it as a crash)."""

    def __init__(self, reason: str, crash: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.crash = crash


class JournalFault(Abandon):
    """Internal: the journal could not record this step (`JournalUnavailableError`): end the
    activation with nothing written; the platform runs it again once the journal works.
    A BaseException, like the other control flow here: tenant code never catches it."""

    def __init__(self, error: JournalUnavailableError):
        super().__init__(str(error), crash=False)
        self.error = error


@lru_cache(maxsize=64)
def _retrying(config: RetryConfig) -> Retrying:
    """The tenacity policy for a retry config (backoff: d, d*n, d*2^(n-1), at most 365
    days)."""
    longest = MAX_SLEEP.total_seconds()
    if config.backoff is Backoff.constant:
        wait = wait_fixed(config.delay)
    elif config.backoff is Backoff.linear:
        wait = wait_incrementing(start=config.delay, increment=config.delay, max=longest)
    else:
        wait = wait_exponential(multiplier=config.delay, exp_base=2, min=0, max=longest)
    return Retrying(
        stop=stop_never if config.limit is None else stop_after_attempt(config.limit + 1),
        wait=wait,
        retry=retry_if_not_exception_type(NonRetryableError),
    )


def retry_delay(config: RetryConfig, attempt: int, exc: BaseException) -> float | None:
    """Seconds until the next attempt after `attempt` failed with `exc`; None = give up."""
    policy = _retrying(config)
    state = RetryCallState(policy, None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, exc.__traceback__))
    if not policy.retry(state) or policy.stop(state):
        return None
    return float(policy.wait(state))


def error_name_of(exc: BaseException) -> str:
    """The name recorded for an attempt's exception: a sandbox's exceptions arrive as
    data (`TenantError`) and carry the tenant's own exception name."""
    return getattr(exc, "tenant_error_name", None) or type(exc).__name__


class Step:
    """The `step` argument of `run(event, step)`."""

    def __init__(
        self,
        journal: Journal,
        state: ActivationState,
        token: int,
        *,
        clock: Callable[[], float] = time.time,
        lease_ttl: float = 30.0,
        trace: InstanceTrace | None = None,
        log: ActivationLog | None = None,
        keep_logs: int = 1000,
        counts: ActivityCounts | None = None,
    ):
        self._journal = journal
        self._trace = trace
        self._log = log
        self._keep_logs = keep_logs
        self._activity = counts if counts is not None else ActivityCounts()
        self._pk = state.info.pk
        self._token = token
        self._clock = clock
        self._lease_ttl = lease_ttl
        self._records = {(s.name, s.seq): s for s in state.steps}
        self._counts: dict[str, int] = {}
        self._pause_requested = state.info.pause_requested
        self.instance_id = state.info.instance_id
        self.compensations = Compensations()
        self.terminating = state.terminating
        self._used: set[tuple[str, int]] = set()
        self._frontier: tuple[str, int] | None = None

    def now(self) -> float:
        """The activation's clock (a fake one in tests)."""
        return self._clock()

    @property
    def new_steps_at_once(self) -> bool:
        """Whether a sandbox may run a new step's callback before asking (`do` with
        `at_once`): not once a pause was asked for (as of the last journal write), nor
        while the instance is being terminated."""
        return not self._pause_requested and not self.terminating

    # -- step.do -----------------------------------------------------------

    async def do(
        self,
        name: str,
        fn: Callable[..., Any] | None = None,
        *,
        retries: dict | RetryConfig | None = None,
        timeout: Any = None,
        rollback: Callable[..., Any] | None = None,
        rollback_retries: dict | RetryConfig | None = None,
        rollback_timeout: Any = None,
        count: int | None = None,
        kind: str = "do",
    ) -> Any:
        """Run `fn` once, durably; on replay return its recorded result. `rollback`: the
        step's compensation, run if `run()` fails later (rollback.py).

        `count` is the occurrence count of `name` when the caller keeps it (a
        sandbox replays finished steps itself and says which occurrence it asks for);
        a compensation is recorded as kind "rollback" at its step's count negated.
        """
        seq = self._next_seq(name, count)
        result = await self._do(name, fn, retries, timeout, seq, kind)
        if rollback is not None:
            self.compensations.register(name, seq, rollback, result,
                                        {"retries": rollback_retries, "timeout": rollback_timeout})
        return result

    async def undo(self, name: str, count: int, fn: Callable[[], Any], options: dict) -> Any:
        """Run the compensation of step (name, count) durably (rollback.py)."""
        return await self._do(name, fn, options.get("retries"), options.get("timeout"), -count, "rollback")

    async def _do(
        self, name: str, fn: Callable[..., Any] | None, retries: Any, timeout: Any,
        seq: int, kind: str,
    ) -> Any:
        record = self._seen(name, seq, kind)
        attempts_done = 0
        if record is not None:
            if record.status == STEP_COMPLETE:
                return json.loads(record.result_json) if record.result_json else None
            if record.status == STEP_FAILED:
                raise StepFailedError(name, record.error_name, record.error_message, record.attempts)
            if record.status == STEP_RETRYING:
                attempts_done = record.attempts
                if record.next_attempt_at is not None and self._clock() < record.next_attempt_at:
                    if kind != "rollback":
                        self._terminating()
                    raise Suspend(record.next_attempt_at)
        if not callable(fn):
            raise InvalidInputError(f"step {name!r}: step.do needs a callable, got {fn!r}")
        self._boundary(kind)
        config = self._config(name, retries, timeout)
        attempt = attempts_done + 1
        started = self._clock() if record is None else record.started_at
        self._activity.steps_started += 1
        trace, log = self._trace, self._log
        span = trace.attempt(name, seq, attempt) if trace is not None else None
        if log is not None:
            log.step = (name, seq, attempt)
        try:
            if span is not None:
                with trace.use_span(span):
                    value = await self._attempt(fn, name, seq, attempt, config)
            else:
                value = await self._attempt(fn, name, seq, attempt, config)
        except Exception as exc:  # noqa: BLE001 - any tenant error is a failed attempt
            await self._attempt_failed(name, seq, attempt, started, config, exc, span, kind)
        finally:
            if log is not None:
                log.step = None
        try:
            text = to_json(value, f"result of step {name!r}")
        except InvalidInputError as exc:
            self._end_attempt(span, exc, None)
            self._activity.steps_failed += 1
            await self._record(name, seq, STEP_FAILED, started, attempt, error=exc, kind=kind)
            raise StepFailedError(name, type(exc).__name__, str(exc), attempt) from None
        self._end_attempt(span)
        self._activity.steps_completed += 1
        await self._record(name, seq, STEP_COMPLETE, started, attempt, result_json=text, kind=kind)
        return json.loads(text)

    def _end_attempt(
        self, span: Any, error: BaseException | None = None, retry_at: float | None = None
    ) -> None:
        if span is not None:
            if error is not None:
                self._trace.attempt_failed(span, (error_name_of(error), str(error)), retry_at)
            self._trace.end_span(span)

    def _config(self, name: str, retries: Any, timeout: Any) -> StepConfig:
        if retries is None and timeout is None:
            return DEFAULT_STEP_CONFIG
        try:
            kwargs: dict[str, Any] = {}
            if retries is not None:
                kwargs["retries"] = retries
            if timeout is not None:
                kwargs["timeout"] = timeout
            return StepConfig(**kwargs)
        except Exception as exc:  # pydantic's ValidationError or our InvalidInputError
            raise invalid(f"step {name!r}: invalid options", exc) from None

    async def _attempt(
        self, fn: Callable[..., Any], name: str, seq: int, attempt: int, config: StepConfig
    ) -> Any:
        args = (StepContext(step=name, count=seq, attempt=attempt, config=config),) if takes_context(fn) else ()
        deadline = time.monotonic() + config.timeout
        value = fn(*args)
        if inspect.isawaitable(value):
            try:
                value = await asyncio.wait_for(value, config.timeout)
            except asyncio.TimeoutError:
                raise self._timeout_error(name, attempt, config) from None
        if time.monotonic() > deadline:
            # A synchronous callback cannot be interrupted; it still failed its timeout.
            raise self._timeout_error(name, attempt, config)
        return value

    @staticmethod
    def _timeout_error(name: str, attempt: int, config: StepConfig) -> StepTimeoutError:
        return StepTimeoutError(
            f"step {name!r} attempt {attempt} exceeded its timeout of {config.timeout:g} s"
        )

    async def _attempt_failed(
        self, name: str, seq: int, attempt: int, started: float, config: StepConfig,
        exc: BaseException, span: Any = None, kind: str = "do",
    ) -> None:
        """Record a failed attempt; raise Suspend (retry later) or StepFailedError."""
        delay = retry_delay(config.retries, attempt, exc)
        error_name = error_name_of(exc)
        if delay is None:
            self._end_attempt(span, exc, None)
            self._activity.steps_failed += 1
            await self._record(name, seq, STEP_FAILED, started, attempt, error=exc, kind=kind)
            raise StepFailedError(name, error_name, str(exc), attempt) from exc
        next_at = self._clock() + delay
        self._end_attempt(span, exc, next_at)
        self._activity.retries += 1
        await self._record(name, seq, STEP_RETRYING, started, attempt, error=exc,
                           next_attempt_at=next_at, kind=kind)
        raise Suspend(next_at)

    # -- sleeping ----------------------------------------------------------

    async def sleep(self, name: str, duration: Any, *, count: int | None = None) -> None:
        """Durable sleep: the instance hibernates until `duration` has passed."""
        seconds = parse_duration(duration, f"duration of sleep {name!r}")
        if seconds > MAX_SLEEP.total_seconds():
            raise InvalidInputError(f"sleep {name!r}: {seconds:g} s is longer than 365 days")
        await self._sleep_until(name, lambda: self._clock() + seconds, count)

    async def sleep_until(
        self, name: str, when: datetime | float, *, count: int | None = None
    ) -> None:
        """Durable sleep until a datetime (naive means UTC) or a UNIX timestamp."""
        if isinstance(when, datetime):
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            target = when.timestamp()
        elif isinstance(when, (int, float)) and not isinstance(when, bool) and abs(when) < 1e15:  # not NaN
            target = float(when)
        else:
            raise InvalidInputError(
                f"sleep_until {name!r}: expected a datetime or timestamp, got {when!r}"
            )
        if target - self._clock() > MAX_SLEEP.total_seconds():
            raise InvalidInputError(f"sleep_until {name!r}: more than 365 days ahead")
        await self._sleep_until(name, lambda: target, count)

    async def _sleep_until(
        self, name: str, target: Callable[[], float], count: int | None = None
    ) -> None:
        seq = self._next_seq(name, count)
        record = self._seen(name, seq, "sleep")
        if record is not None:
            wake_at = json.loads(record.result_json)
            started = record.started_at
        else:
            self._boundary()
            wake_at = target()
            started = self._clock()
            record = self._make_record(
                name, seq, STEP_COMPLETE, started, 0, kind="sleep",
                result_json=json.dumps(wake_at), finished=False,
            )
            await self._write(record)
        now = self._clock()
        if now < wake_at:
            self._terminating()
            raise Suspend(wake_at)
        if record.finished_at is None:  # the first activation past its end: record it once
            await self._write(replace(record, finished_at=now))
            if self._trace is not None:
                self._trace.sleep(name, seq, started, now)

    # -- events ------------------------------------------------------------

    async def wait_for_event(
        self, name: str, *, type: str, timeout: Any = DEFAULT_WAIT_TIMEOUT,
        count: int | None = None,
    ) -> ReceivedEvent:
        """Wait (hibernated) for an event of `type`; events sent earlier are buffered FIFO."""
        validate_event_type(type)
        seconds = parse_duration(
            DEFAULT_WAIT_TIMEOUT if timeout is None else timeout, f"timeout of wait_for_event {name!r}"
        )
        if seconds > MAX_SLEEP.total_seconds():
            raise InvalidInputError(f"wait_for_event {name!r}: timeout longer than 365 days")
        seq = self._next_seq(name, count)
        record = self._seen(name, seq, "wait")
        if record is not None and record.status == STEP_COMPLETE:
            return self._received(json.loads(record.result_json))
        if record is not None and record.status == STEP_FAILED:
            raise WorkflowTimeoutError(record.error_message)
        if record is not None:  # STEP_WAITING: the deadline was fixed when first reached
            deadline = json.loads(record.result_json)
            started = record.started_at
        else:
            self._boundary()
            started = self._clock()
            deadline = started + seconds
            record = self._make_record(
                name, seq, STEP_WAITING, started, 0, kind="wait", result_json=json.dumps(deadline)
            )
            await self._write(record)
        now = self._clock()
        try:
            got = await self._journal.grouped.take_event(
                self._pk, self._token, record, type, now, self._lease_ttl
            )
        except JournalUnavailableError as exc:
            raise JournalFault(exc) from None
        if got is not None:
            event_type, payload_json, created_at = got
            if self._trace is not None:
                self._trace.wait(name, seq, type, started, now)
            return ReceivedEvent(
                type=event_type, payload=json.loads(payload_json),
                timestamp=timestamp_to_datetime(created_at),
            )
        if now >= deadline:
            exc = WorkflowTimeoutError(
                f"wait_for_event {name!r} got no {type!r} event within {seconds:g} s"
            )
            await self._record(name, seq, STEP_FAILED, started, 0, kind="wait", error=exc)
            if self._trace is not None:
                self._trace.wait(name, seq, type, started, now, exc)
            raise exc
        self._terminating()
        raise Suspend(deadline, waiting_for=type)

    @staticmethod
    def _received(data: dict) -> ReceivedEvent:
        return ReceivedEvent(
            type=data["type"], payload=data["payload"],
            timestamp=timestamp_to_datetime(data["timestamp"]),
        )

    # -- internals ---------------------------------------------------------

    def _next_seq(self, name: str, count: int | None = None) -> int:
        validate_step_name(name)
        seq = self._counts.get(name, 0) + 1 if count is None else count
        self._counts[name] = max(seq, self._counts.get(name, 0))
        return seq

    # -- what replay used (a determinism warning) ---------------------------

    def _seen(self, name: str, seq: int, kind: str) -> StepRecord | None:
        """The record of step (name, seq), noting that the run asked for it: a settled
        one is used; the first unsettled one (or none) is where the run goes on."""
        record = self._records.get((name, seq))
        if kind != "rollback":
            if record is not None and record.settled:
                self._used.add((name, seq))
            elif self._frontier is None:
                self._frontier = (name, seq)
        return record

    def replayed_locally(self, keys: Any) -> None:
        """Steps the run got from its sandbox's local replay, without asking here."""
        self._used.update(keys)

    def determinism_warning(self) -> str | None:
        """If the run went on to a step the journal does not hold as settled while settled
        steps of the journal were never asked for: a warning naming them (the code
        changed, or is not deterministic). None otherwise."""
        if self._frontier is None:
            return None
        unused = sorted(
            (r.started_at, name, seq) for (name, seq), r in self._records.items()
            if r.settled and r.kind != "rollback" and (name, seq) not in self._used
        )
        if not unused:
            return None
        names = ", ".join(f"{n!r} (count {s})" for _, n, s in unused[:10])
        more = f" and {len(unused) - 10} more" if len(unused) > 10 else ""
        name, seq = self._frontier
        return (f"determinism warning: run() went on to step {name!r} (count {seq}) without "
                f"asking for recorded steps {names}{more}: the code changed since they ran, or "
                "it does not take the same path on replay")

    def _boundary(self, kind: str = "do") -> None:
        if self._pause_requested:
            raise PauseAtBoundary()
        if kind != "rollback":
            self._terminating()

    def _terminating(self) -> None:
        """`terminate(rollback=True)` was asked: no step goes on or waits any more (but
        compensations run); `run()` gets the error, its rollback runs, and it ends."""
        if self.terminating:
            raise InstanceTerminatingError(
                f"instance {self.instance_id!r} is being terminated: its completed steps are "
                "rolled back"
            )

    def _make_record(
        self, name: str, seq: int, status: str, started: float, attempts: int, *,
        kind: str = "do",
        result_json: str | None = None, error: BaseException | None = None,
        next_attempt_at: float | None = None, finished: bool | None = None,
    ) -> StepRecord:
        done = status in (STEP_COMPLETE, STEP_FAILED) if finished is None else finished
        return StepRecord(
            name=name, seq=seq, kind=kind, status=status, result_json=result_json,
            error_name=error_name_of(error) if error is not None else None,
            error_message=str(error) if error is not None else None,
            attempts=attempts, next_attempt_at=next_attempt_at,
            started_at=started, finished_at=self._clock() if done else None,
        )

    async def _record(
        self, name: str, seq: int, status: str, started: float, attempts: int, **kw: Any
    ) -> None:
        await self._write(self._make_record(name, seq, status, started, attempts, **kw))

    async def _write(self, record: StepRecord) -> None:
        """Record a step durably (group-committed with concurrent activations' writes)."""
        logs = self._log.take() if self._log is not None else ()
        try:
            self._pause_requested = await self._journal.grouped.record_step(
                self._pk, self._token, record, self._clock(), self._lease_ttl, logs, self._keep_logs
            )
        except JournalUnavailableError as exc:
            raise JournalFault(exc) from None
