"""`WorkflowEntrypoint`: the class a tenant subclasses to write a workflow.

```python
class MyWorkflow(WorkflowEntrypoint):
    async def run(self, event, step):
        ...
```

`self.env` is a mapping of what the platform grants the workflow (plain values,
secrets, bindings); it holds
`"WORKFLOWS"`, the tenant's own binding, when the engine provides one.
"""

from __future__ import annotations

from typing import Any, Mapping


class WorkflowEntrypoint:
    """Base class of every tenant workflow. Override `async def run(self, event, step)`."""

    def __init__(self, env: Mapping[str, Any] | None = None):
        self.env: Mapping[str, Any] = dict(env or {})

    async def run(self, event: Any, step: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement async run(event, step)")
