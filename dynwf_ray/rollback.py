"""Rollback (saga): compensations registered by completed steps, run newest first when
`run()` fails.

`step.do(name, fn, rollback=undo)` registers `undo` once the step has completed, on
the first run as on every replay. If `run()` then raises, `run_with_rollback` runs
the compensations of the completed steps, newest first, each a durable step of its
own: recorded under the step's name with its count negated and kind "rollback",
retried under the step's `rollback_retries` / `rollback_timeout`, and answered from
the journal on replay. Then the instance ends errored with `run()`'s error. A
compensation that fails for good ends it errored with `RollbackFailedError`, naming
both errors and the step. A compensation waiting for a retry suspends the instance
like any step: the next activation replays `run()` to the same failure and goes on
with the compensations not yet recorded.

`undo` is called as `undo(result)` (the step's recorded result) when it has a required
positional parameter, else as `undo()`; it may be async.

Both step implementations use this, the trusted `Step` (tenant code run in-process)
and the sandbox's step proxy, so it imports nothing of the platform.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from .errors import InvalidInputError, RollbackFailedError, StepFailedError
from .types import takes_context

#: What a step implementation offers to run one compensation durably:
#: undo_step(name, count, callback, options) -> its result.
UndoStep = Callable[[str, int, Callable[[], Any], dict], Awaitable[Any]]


class Compensations:
    """The compensations one activation's completed steps registered, oldest first."""

    def __init__(self) -> None:
        self._done: list[tuple[str, int, Callable[..., Any], Any, dict]] = []

    def register(self, name: str, count: int, undo: Any, result: Any, options: dict) -> None:
        if not callable(undo):
            raise InvalidInputError(f"step {name!r}: rollback must be a callable, got {undo!r}")
        self._done.append((name, count, undo, result, options))

    async def run(self, error: Exception, undo_step: UndoStep) -> None:
        """Run every compensation, newest first; then raise `error` (or, if one fails
        for good, `RollbackFailedError`)."""
        for name, count, undo, result, options in reversed(self._done):
            call = (lambda u=undo, r=result: u(r)) if takes_context(undo) else undo
            try:
                await undo_step(name, count, call, options)
            except StepFailedError as failed:
                raise RollbackFailedError(error, name, count, failed) from None
        raise error


async def run_with_rollback(
    run: Callable[[], Awaitable[Any]], compensations: Compensations, undo_step: UndoStep
) -> Any:
    """`run()`, and if it raises, the compensations (see the module docstring)."""
    try:
        return await run()
    except Exception as error:  # noqa: BLE001 - the tenant's failure: roll back, then re-raise
        if not compensations._done:
            raise
        await compensations.run(error, undo_step)
