"""dynwf-ray: durable, per-tenant workflows on Ray.

Tenant-facing: `WorkflowEntrypoint`, `NonRetryableError` (and the errors a
step can raise). Platform-facing: `Engine`, `EngineConfig`, `WorkflowBinding`,
`InstanceHandle`, `LogLine` (what `InstanceHandle.logs()` returns) and the error classes.

The platform-facing classes are imported on first use: tenant code imports this
package inside its sandbox, which holds no Ray, no journal and no SQL driver.
"""

from typing import TYPE_CHECKING, Any

from .entrypoint import WorkflowEntrypoint
from .errors import (
    DuplicateInstanceError,
    DynwfError,
    InstanceNotFoundError,
    InstanceTerminatingError,
    InvalidInputError,
    InvalidStateError,
    JournalSchemaError,
    JournalUnavailableError,
    NonRetryableError,
    NotSerializableError,
    PayloadTooLargeError,
    ReplayDivergenceError,
    ResourceLimitError,
    RollbackFailedError,
    SandboxUnavailableError,
    StepFailedError,
    StepTimeoutError,
    UnknownTenantError,
    WorkflowTimeoutError,
)
from .types import InstanceStatus, LogLine, ReceivedEvent, StepContext, WorkflowEvent

if TYPE_CHECKING:
    from .binding import InstanceHandle, WorkflowBinding
    from .config import EngineConfig
    from .engine import Engine

_PLATFORM = {
    "Engine": "engine", "EngineConfig": "config",
    "InstanceHandle": "binding", "WorkflowBinding": "binding",
}


def __getattr__(name: str) -> Any:
    module = _PLATFORM.get(name)
    if module is None:
        raise AttributeError(f"module 'dynwf_ray' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)

__all__ = [
    "DuplicateInstanceError",
    "DynwfError",
    "Engine",
    "EngineConfig",
    "InstanceHandle",
    "InstanceNotFoundError",
    "InstanceStatus",
    "InstanceTerminatingError",
    "InvalidInputError",
    "InvalidStateError",
    "JournalSchemaError",
    "JournalUnavailableError",
    "LogLine",
    "NonRetryableError",
    "NotSerializableError",
    "PayloadTooLargeError",
    "ReceivedEvent",
    "ReplayDivergenceError",
    "ResourceLimitError",
    "RollbackFailedError",
    "SandboxUnavailableError",
    "StepContext",
    "StepFailedError",
    "StepTimeoutError",
    "UnknownTenantError",
    "WorkflowBinding",
    "WorkflowEntrypoint",
    "WorkflowEvent",
    "WorkflowTimeoutError",
]
