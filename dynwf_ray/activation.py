"""One activation of one instance: load it from the journal, replay, run, record the outcome.

This is the whole life of an instance, free of Ray: an instance host (in a host
process actor) calls `activate`, and tests call it directly with a fake clock.
Where the tenant's `run()` executes is the `Runner`'s business: an instance host
passes a sandbox session (`sandbox/supervisor.py`: tenant code in a jailed
process, every step a message), tests and the tenant-author harness pass the
workflow class itself (`InProcess`: run() in this process, trusted code only).
Either way the `Step` that records the journal lives here, on the trusted side.
An activation ends in exactly one of these outcomes, each written to
the journal under the activation's lease (a lost lease writes nothing):

- `complete`: `run()` returned; its output is stored.
- `errored`: `run()` raised; the error's name and message are stored.
- `suspended`: a sleep, wait or retry delay is not over; the instance
  hibernates with a timer (`wake_at`) and, for a wait, the event type.
- `paused`: a pause was requested; the activation stopped at a step boundary.
- `lease_lost`: the instance was terminated, restarted or claimed by another
  activation meanwhile; this activation stopped without writing.
- `crashed`: the sandbox died for no reason that can be recorded as the
  tenant's; the instance is released to be activated again at once.
- `terminated`: `terminate(rollback=True)` was asked; the compensations of its
  completed steps have run (`rollback.py`), and it ended terminated.
- `journal_unavailable`: a journal write failed because the journal cannot be
  used now (disk full, unreachable, read-only); nothing more is written and the
  caller releases the instance once the journal works (`host.py`). A platform
  fault is never the tenant's failure.

Around it, the activation's telemetry: its span (current while `run()` runs),
the instance's root span when it completes or errors, its captured output,
and its counts (see `tracing.py`, `logs.py`, `metrics.py`).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Literal, Mapping, Protocol

from .entrypoint import WorkflowEntrypoint
from .errors import InvalidInputError, JournalUnavailableError, StepFailedError
from .journal import ActivationState, InstanceInfo, Journal, LeaseLostError
from .logs import PLATFORM_STREAM, LogCapture
from .metrics import ActivityCounts
from .rollback import run_with_rollback
from .step import Abandon, JournalFault, PauseAtBoundary, Step, Suspend, error_name_of
from .tracing import InstanceTrace, Tracing, trace_id_of
from .types import LogLine, WorkflowEvent, timestamp_to_datetime, to_json

Outcome = Literal[
    "complete", "errored", "suspended", "paused", "lease_lost", "crashed", "journal_unavailable",
    "terminated",
]


class Runner(Protocol):
    """Runs the tenant's `run(event, step)` for one activation and returns its output.

    Raises what `run()` raised (an exception with a `tenant_error_name` stands for
    an exception of tenant code that arrived as data), or the step's internal
    control flow (`Suspend`, `PauseAtBoundary`, `Abandon`, `LeaseLostError`)."""

    async def run(
        self, state: ActivationState, event: WorkflowEvent, step: Step, trace: InstanceTrace | None
    ) -> Any: ...


class InProcess:
    """A `Runner` for trusted code: the workflow class runs in this process."""

    def __init__(self, workflow_cls: type[WorkflowEntrypoint], env: Mapping[str, Any] | None = None):
        self.workflow_cls = workflow_cls
        self.env = env

    async def run(
        self, state: ActivationState, event: WorkflowEvent, step: Step, trace: InstanceTrace | None
    ) -> Any:
        def run() -> Any:
            return self.workflow_cls(self.env).run(event, step)

        if trace is not None:
            with trace.use():
                return await run_with_rollback(run, step.compensations, step.undo)
        return await run_with_rollback(run, step.compensations, step.undo)


async def activate(
    journal: Journal,
    pk: int,
    token: int,
    code: type[WorkflowEntrypoint] | Runner,
    *,
    env: Mapping[str, Any] | None = None,
    clock: Callable[[], float] = time.time,
    lease_ttl: float = 30.0,
    tracing: Tracing | None = None,
    capture_logs: bool = False,
    keep_logs: int = 1000,
    counts: ActivityCounts | None = None,
    warm: bool | None = None,
    state: ActivationState | None = None,
    ending: Callable[[], None] | None = None,
) -> Outcome:
    """Run one activation of `code` (a workflow class, run in this process with `env`,
    or a `Runner`). With `tracing`, its spans are emitted; with `capture_logs`, an
    `ActivationLog` collects what it prints and stores it: from this process's output
    where a `LogCapture` is installed, and from a runner that captures output itself
    (a sandbox session adds the lines its sandbox sends to `step._log`). `state`: what
    `Journal.claim_and_load` read for this activation (else it is read here).
    `ending` is called once the run is over and the write that records how it ended
    is queued, before that write commits: the caller may give its slot to the next
    activation, whose claim can then share the commit."""
    runner: Runner = InProcess(code, env) if isinstance(code, type) else code
    if state is None:
        try:
            state = journal.load_activation(pk, token)
        except LeaseLostError:
            return "lease_lost"
        except JournalUnavailableError:
            return "journal_unavailable"
    info = state.info
    counts = counts if counts is not None else ActivityCounts()
    if warm is not None:
        if warm:
            counts.warm += 1
        else:
            counts.cold += 1
    if info.wake_at is not None:
        counts.latencies.append(clock() - info.wake_at)
    trace = tracing.instance(info, clock, warm=warm) if tracing is not None else None
    if trace is not None:  # waits and sleeps the claim ended
        if state.event_taken is not None:
            name, seq, event_type, began, taken = state.event_taken
            trace.wait(name, seq, event_type, began, taken)
        for name, seq, began, ended in state.sleeps_ended:
            trace.sleep(name, seq, began, ended)
    log, log_token = (
        LogCapture.begin(clock, trace_id_of(info.trace_context)) if capture_logs else (None, None)
    )
    outcome: Outcome = "lease_lost"
    error: tuple[str, str] | None = None
    try:
        step = Step(
            journal, state, token, clock=clock, lease_ttl=lease_ttl,
            trace=trace, log=log, keep_logs=keep_logs, counts=counts,
        )
        outcome, error, write = await _run(state, token, runner, clock, step, trace)
        if log is not None:
            LogCapture.end(log_token)
            log_token = None
        if write is not None:
            lines = list(log.take(final=True)) if log is not None else []
            warning = step.determinism_warning()
            if warning is not None:  # in the instance's logs, for the platform to see
                lines.append(LogLine(at=clock(), stream=PLATFORM_STREAM, message=warning,
                                     trace_id=trace_id_of(info.trace_context)))
            try:
                # The outcome, the last lines printed and the crash count: one commit.
                ended = asyncio.ensure_future(journal.grouped.end_activation(
                    write, pk, lines, keep_logs, outcome == "crashed", state.crashes > 0,
                ))
                if ending is not None:
                    ending()
                await ended
            except LeaseLostError:
                outcome, error = "lease_lost", None
            except JournalUnavailableError:
                outcome, error = "journal_unavailable", None
        return outcome
    except LeaseLostError:
        outcome, error = "lease_lost", None
        return outcome
    finally:
        if log_token is not None:
            LogCapture.end(log_token)
        if trace is not None:
            trace.end(outcome, error)
            if outcome in ("complete", "errored", "terminated"):
                trace.end_instance(outcome, error)


async def _run(
    state: ActivationState, token: int, runner: Runner, clock: Callable[[], float], step: Step,
    trace: InstanceTrace | None,
) -> tuple[Outcome, tuple[str, str] | None, tuple | None]:
    """Replay and run `run()`. Returns the outcome, the error, and the journal write that
    records it (see `Journal._end_activation`); raises LeaseLostError when a step found
    the lease lost. An instance being terminated with rollback ends terminated once
    `run()` has ended, however it did (unless its rollback failed)."""
    outcome, error, write = await _run_once(state, token, runner, clock, step, trace)
    if state.terminating and outcome in ("complete", "errored") and (
        error is None or error[0] != "RollbackFailedError"
    ):
        return "terminated", None, ("terminate", token, clock())
    return outcome, error, write


def event_of(info: InstanceInfo) -> WorkflowEvent:
    """What `run(event, step)` receives for this instance."""
    return WorkflowEvent(
        payload=json.loads(info.params_json),
        timestamp=timestamp_to_datetime(info.created_at),
        instance_id=info.instance_id,
        metadata=json.loads(info.metadata_json or "{}"),
    )


async def _run_once(
    state: ActivationState, token: int, runner: Runner, clock: Callable[[], float], step: Step,
    trace: InstanceTrace | None,
) -> tuple[Outcome, tuple[str, str] | None, tuple | None]:
    info = state.info
    where = f"tenant {info.tenant_id!r} instance {info.instance_id!r}: "
    event = event_of(info)
    try:
        output = await runner.run(state, event, step, trace)
    except JournalFault:
        return "journal_unavailable", None, None  # nothing can be written now
    except JournalUnavailableError:  # a binding's journal call failed: the platform's fault
        return "journal_unavailable", None, None
    except Abandon as abandon:
        now = clock()
        return "crashed", ("SandboxCrashedError", where + abandon.reason), ("release", token, now, now)
    except Suspend as suspend:
        return "suspended", None, ("suspend", token, suspend.wake_at, suspend.waiting_for, clock())
    except PauseAtBoundary:
        return "paused", None, ("pause", token, clock())
    except LeaseLostError:
        raise
    except StepFailedError as exc:
        return _fail(token, exc.error_name, where + str(exc), clock())
    except Exception as exc:  # noqa: BLE001 - the tenant's run() failed
        return _fail(token, error_name_of(exc), where + _describe(exc), clock())
    try:
        output_json = to_json(output, f"output of instance {info.instance_id!r}")
    except InvalidInputError as exc:
        return _fail(token, type(exc).__name__, where + str(exc), clock())
    return "complete", None, ("complete", token, output_json, clock())


def _fail(
    token: int, name: str, message: str, now: float
) -> tuple[Outcome, tuple[str, str], tuple]:
    return "errored", (name, message), ("fail", token, name, message, now)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else repr(exc)
