"""One activation of one instance: load it from the journal, replay, run, record the outcome.

This is the whole life of an instance inside a process, free of Ray: the
instance host actor calls `activate`, and tests call it directly with a fake
clock. An activation ends in exactly one of these outcomes, each written to
the journal under the activation's lease (a lost lease writes nothing):

- `complete`: `run()` returned; its output is stored.
- `errored`: `run()` raised; the error's name and message are stored.
- `suspended`: a sleep, wait or retry delay is not over; the instance
  hibernates with a timer (`wake_at`) and, for a wait, the event type.
- `paused`: a pause was requested; the activation stopped at a step boundary.
- `lease_lost`: the instance was terminated, restarted or claimed by another
  activation meanwhile; this activation stopped without writing.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Literal, Mapping

from .entrypoint import WorkflowEntrypoint
from .errors import InvalidInputError, StepFailedError
from .journal import Journal, LeaseLostError
from .step import AttemptTracker, PauseAtBoundary, Step, Suspend
from .types import WorkflowEvent, timestamp_to_datetime, to_json

Outcome = Literal["complete", "errored", "suspended", "paused", "lease_lost"]


async def activate(
    journal: Journal,
    pk: int,
    token: int,
    workflow_cls: type[WorkflowEntrypoint],
    *,
    env: Mapping[str, Any] | None = None,
    clock: Callable[[], float] = time.time,
    lease_ttl: float = 30.0,
    tracker: AttemptTracker | None = None,
) -> Outcome:
    try:
        state = journal.load_activation(pk, token)
        info = state.info
        where = f"tenant {info.tenant_id!r} instance {info.instance_id!r}: "
        step = Step(journal, state, token, clock=clock, lease_ttl=lease_ttl, tracker=tracker)
        event = WorkflowEvent(
            payload=json.loads(info.params_json),
            timestamp=timestamp_to_datetime(info.created_at),
            instance_id=info.instance_id,
        )
        try:
            output = await workflow_cls(env).run(event, step)
        except Suspend as suspend:
            journal.suspend(pk, token, suspend.wake_at, suspend.waiting_for, clock())
            return "suspended"
        except PauseAtBoundary:
            journal.pause_now(pk, token, clock())
            return "paused"
        except LeaseLostError:
            raise
        except StepFailedError as exc:
            journal.fail(pk, token, exc.error_name, where + str(exc), clock())
            return "errored"
        except Exception as exc:  # noqa: BLE001 - the tenant's run() failed
            journal.fail(pk, token, type(exc).__name__, where + _describe(exc), clock())
            return "errored"
        try:
            output_json = to_json(output, f"output of instance {info.instance_id!r}")
        except InvalidInputError as exc:
            journal.fail(pk, token, type(exc).__name__, where + str(exc), clock())
            return "errored"
        journal.complete(pk, token, output_json, clock())
        return "complete"
    except LeaseLostError:
        return "lease_lost"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else repr(exc)
