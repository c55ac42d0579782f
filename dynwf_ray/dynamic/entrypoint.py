"""Inbound half: the one workflow class that runs every tenant's code.

The platform registers the class from `create_dynamic_workflow_entrypoint` with
the engine. When the engine runs an instance, that class reads the envelope that
the wrapped binding (`binding.py`) stored as params, asks the platform's
`load_runner(metadata, env)` for the tenant's runner, and hands it
`run(event, step)` with an event whose payload is only the tenant's params.
The step handle is passed through untouched; errors are not caught.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from ..entrypoint import WorkflowEntrypoint
from ..types import WorkflowEvent
from .types import LoadWorkflowRunner, _unwrap_params


async def dispatch_workflow(
    env: Mapping[str, Any] | None,
    event: Any,
    step: Any,
    load_runner: LoadWorkflowRunner,
) -> Any:
    """Unwrap `event.payload`, load the tenant's runner and return what its `run` returns.

    `env` is the dispatcher's own env (what `load_runner` receives as its second
    argument); `load_runner` may be sync or async. Raises
    MissingDispatcherMetadataError if the payload is not an envelope; exceptions
    from `load_runner` and from the runner's `run` propagate unchanged. Use it to
    write your own dispatcher class (e.g. with logging around `run`).
    """
    envelope = _unwrap_params(event.payload)
    inner = WorkflowEvent(
        payload=envelope.params, timestamp=event.timestamp, instance_id=event.instance_id
    )
    runner = load_runner(envelope.metadata, env)
    if inspect.isawaitable(runner):
        runner = await runner
    run = getattr(runner, "run", None)
    if not callable(run):
        raise TypeError(
            f"load_runner returned {runner!r}, which has no run(event, step) method"
        )
    result = run(inner, step)
    if inspect.isawaitable(result):
        result = await result
    return result


def create_dynamic_workflow_entrypoint(load_runner: LoadWorkflowRunner) -> type[WorkflowEntrypoint]:
    """A `WorkflowEntrypoint` subclass whose `run` calls `dispatch_workflow`.

    Register the returned class with the engine as the dispatcher workflow;
    `load_runner(metadata, env)` is called on every `run` (every activation), so
    cache inside it if loading is expensive.
    """
    if not callable(load_runner):
        raise TypeError(f"load_runner must be callable, got {load_runner!r}")

    class DynamicWorkflowEntrypoint(WorkflowEntrypoint):
        async def run(self, event: Any, step: Any) -> Any:
            return await dispatch_workflow(self.env, event, step, load_runner)

    DynamicWorkflowEntrypoint.__qualname__ = "DynamicWorkflowEntrypoint"

    return DynamicWorkflowEntrypoint
