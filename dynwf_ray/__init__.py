"""dynwf-ray: durable, per-tenant workflows on Ray.

Tenant-facing: `WorkflowEntrypoint`, `NonRetryableError` (and the errors a
step can raise). Platform-facing: `Engine`, `EngineConfig`, `WorkflowBinding`,
`InstanceHandle`, `LogLine` (what `InstanceHandle.logs()` returns) and the error classes.
"""

from .binding import InstanceHandle, WorkflowBinding
from .config import EngineConfig
from .engine import Engine
from .entrypoint import WorkflowEntrypoint
from .errors import (
    DuplicateInstanceError,
    DynwfError,
    InstanceNotFoundError,
    InvalidInputError,
    InvalidStateError,
    JournalSchemaError,
    NonRetryableError,
    NotSerializableError,
    PayloadTooLargeError,
    StepFailedError,
    StepTimeoutError,
    UnknownTenantError,
    WorkflowTimeoutError,
)
from .types import LogLine, ReceivedEvent, StepContext, WorkflowEvent

__all__ = [
    "DuplicateInstanceError",
    "DynwfError",
    "Engine",
    "EngineConfig",
    "InstanceHandle",
    "InstanceNotFoundError",
    "InvalidInputError",
    "InvalidStateError",
    "JournalSchemaError",
    "LogLine",
    "NonRetryableError",
    "NotSerializableError",
    "PayloadTooLargeError",
    "ReceivedEvent",
    "StepContext",
    "StepFailedError",
    "StepTimeoutError",
    "UnknownTenantError",
    "WorkflowBinding",
    "WorkflowEntrypoint",
    "WorkflowEvent",
    "WorkflowTimeoutError",
]
