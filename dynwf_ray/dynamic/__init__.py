"""dynwf_ray.dynamic: route one registered workflow class to many tenants' code.

For platforms that load tenant code their own way instead of through the
engine's built-in routing (the counterpart of Cloudflare's `dynamic-workflows`):

1. Hand each tenant `wrap_workflow_binding(raw_binding, {"tenant_id": ...})`
   instead of the raw binding. Every `create` / `create_batch` through it stores
   `{"metadata": ..., "params": ...}` as the new instance's params.
2. Register one class, `create_dynamic_workflow_entrypoint(load_runner)`, as the
   workflow. Its `run` unwraps the envelope, calls `load_runner(metadata, env)`
   for the tenant's runner and forwards `run(event, step)` to it; the tenant sees
   only its own params. `dispatch_workflow` is that logic alone, for writing
   your own dispatcher class.

An instance created without a wrapped binding fails with
`MissingDispatcherMetadataError`. Metadata is stored with the instance and
readable by tenant code: a routing hint, never a secret or authorization.
"""

from .binding import DynamicWorkflowBinding, wrap_workflow_binding
from .entrypoint import create_dynamic_workflow_entrypoint, dispatch_workflow
from .types import (
    DispatcherMetadata,
    LoadWorkflowRunner,
    MissingDispatcherMetadataError,
    WorkflowRunner,
)

__all__ = [
    "DispatcherMetadata",
    "DynamicWorkflowBinding",
    "LoadWorkflowRunner",
    "MissingDispatcherMetadataError",
    "WorkflowRunner",
    "create_dynamic_workflow_entrypoint",
    "dispatch_workflow",
    "wrap_workflow_binding",
]
