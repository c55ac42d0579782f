"""Replay check: would an instance's recorded history replay on another code version?

`check_replay(state, version, runner)` runs the candidate code's `run()` against the
instance's journal without running anything new: a `CheckStep` answers each step
from the records (results, failures, events received, sleeps ended) and stops the
run at the first step the journal does not hold as finished, the *frontier*,
where the instance would go on. It never runs a step callback, a sleep or a wait.

The history replays cleanly when the run reaches its frontier (or ends) having used
every finished step of the journal, each under the same name, count and kind. It
diverges, and `ReplayDivergenceError` says where, when the code asks for a step of
another kind than the one recorded under that name and count, or stops (at its
frontier or by ending) while finished steps of the journal were never asked for.

In an engine the check runs in a sandbox of the candidate version (a host the loader
starts for it, without bindings: a `run()` that calls them outside a step would act
for real); the sandbox gets no local replay, so every step it asks for is seen here.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any, Callable

from .activation import event_of
from .errors import ReplayDivergenceError, StepFailedError, WorkflowTimeoutError
from .journal import STEP_FAILED, ActivationState, StepRecord
from .rollback import Compensations
from .step import Suspend
from .types import ReceivedEvent, timestamp_to_datetime, validate_step_name


class _Stop(Suspend):
    """Internal: the run reached its frontier, or diverged; it stops here (a `Suspend`,
    so that every runner ends the activation without writing anything)."""

    def __init__(self, name: str, count: int, kind: str, diverged: str | None = None):
        super().__init__(0.0)
        self.name, self.count, self.kind, self.diverged = name, count, kind, diverged


class CheckStep:
    """A `step` that answers only from the journal (see the module docstring)."""

    #: A sandbox asks for every step, so a new one stops the check before it runs.
    new_steps_at_once = False

    def __init__(self, state: ActivationState, clock: Callable[[], float]):
        self._records = {(r.name, r.seq): r for r in state.steps}
        self._counts: dict[str, int] = {}
        self._clock = clock
        self.used: set[tuple[str, int]] = set()
        self.compensations = Compensations()
        self.instance_id = state.info.instance_id
        self._log = None  # what the run prints is not kept

    def now(self) -> float:
        return self._clock()

    def replayed_locally(self, keys: Any) -> None:
        """What the sandbox answered itself (nothing: it gets no local replay here)."""
        self.used.update(keys)

    def _record(self, name: str, count: int | None, kind: str) -> StepRecord:
        validate_step_name(name)
        seq = self._counts.get(name, 0) + 1 if count is None else count
        self._counts[name] = max(seq, self._counts.get(name, 0))
        record = self._records.get((name, seq))
        if record is not None and record.kind != kind:
            raise _Stop(name, seq, kind, f"the code asks for a {kind} step where the journal "
                                         f"holds a {record.kind} step")
        if record is None or not record.settled:
            raise _Stop(name, seq, kind)
        self.used.add((name, seq))
        return record

    async def do(self, name: str, fn: Any = None, *, retries: Any = None, timeout: Any = None,
                 rollback: Any = None, rollback_retries: Any = None, rollback_timeout: Any = None,
                 count: int | None = None, kind: str = "do") -> Any:
        record = self._record(name, count, kind)
        if record.status == STEP_FAILED:
            raise StepFailedError(name, record.error_name or "", record.error_message or "",
                                  record.attempts)
        result = json.loads(record.result_json) if record.result_json else None
        if rollback is not None:
            self.compensations.register(name, record.seq, rollback, result,
                                        {"retries": rollback_retries, "timeout": rollback_timeout})
        return result

    async def undo(self, name: str, count: int, fn: Any, options: dict) -> Any:
        return await self.do(name, fn, count=-count, kind="rollback")

    async def sleep(self, name: str, duration: Any = None, *, count: int | None = None) -> None:
        self._record(name, count, "sleep")

    async def sleep_until(self, name: str, when: Any = None, *, count: int | None = None) -> None:
        self._record(name, count, "sleep")

    async def wait_for_event(self, name: str, *, type: str, timeout: Any = None,
                             count: int | None = None) -> ReceivedEvent:
        record = self._record(name, count, "wait")
        if record.status == STEP_FAILED:
            raise WorkflowTimeoutError(record.error_message or "")
        data = json.loads(record.result_json)
        return ReceivedEvent(type=data["type"], payload=data["payload"],
                             timestamp=timestamp_to_datetime(data["timestamp"]))


async def check_replay(
    state: ActivationState, version: str, runner: Any, clock: Callable[[], float] = time.time,
) -> None:
    """Replay `state` on `runner` (the candidate `version`'s code); raise
    ReplayDivergenceError if it would not replay cleanly."""
    step = CheckStep(state, clock)
    stop: _Stop | None = None
    ending = "run() ended"
    try:
        await runner.run(replace(state, steps=[]), event_of(state.info), step, None)
    except _Stop as reached:
        stop = reached
    except Exception as exc:  # noqa: BLE001 - run() raised: where it ends, a fine place to stop
        ending = f"run() raised {getattr(exc, 'tenant_error_name', None) or type(exc).__name__}"
    info = state.info
    where = f"instance {info.instance_id!r} would not replay on version {version!r}: "
    if stop is not None and stop.diverged:
        raise ReplayDivergenceError(
            where + f"at step {stop.name!r} (count {stop.count}) {stop.diverged}",
            step=stop.name, count=stop.count,
        )
    unused = sorted(
        (r.started_at, r.name, r.seq) for r in state.steps
        if r.settled and (r.name, r.seq) not in step.used and r.kind != "rollback"
    )
    if unused:
        at = (f"at step {stop.name!r} (count {stop.count}), which the journal does not hold"
              if stop is not None else ending)
        names = ", ".join(f"{n!r} (count {s})" for _, n, s in unused[:10])
        more = f" and {len(unused) - 10} more" if len(unused) > 10 else ""
        raise ReplayDivergenceError(
            where + f"{at}, with recorded steps never asked for: {names}{more}",
            step=stop.name if stop is not None else None, count=stop.count if stop else None,
        )
