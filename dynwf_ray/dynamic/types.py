"""Shapes shared by the two halves of `dynwf_ray.dynamic`.

The outbound half (`binding.py`) writes an envelope into every new instance's
params; the inbound half (`entrypoint.py`) reads it back. This module owns the
envelope's shape, the error raised when a payload is not an envelope, and the
protocols for what a platform's loader returns and is. Helpers whose name starts
with an underscore are internal: only the two halves of this package use them,
and the envelope layout is an implementation detail, not a stored-data contract
callers should parse by hand.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Mapping, Protocol, Union, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import DynwfError, InvalidInputError
from ..types import to_json

#: What a platform attaches to each instance: a JSON object of routing hints
#: (tenant id, code version, region...). Readable by tenant code: never put
#: secrets in it and never treat it as authorization.
DispatcherMetadata = dict[str, Any]


class DispatcherEnvelope(BaseModel):
    """`{"metadata": {...}, "params": ...}`: what a wrapped binding stores as params.

    Exactly these two keys; `params` is whatever the tenant passed (None when it
    passed nothing), `metadata` is the platform's JSON object.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    metadata: DispatcherMetadata
    params: Any


class MissingDispatcherMetadataError(DynwfError, ValueError):
    """A dispatcher workflow received a payload that is not a dispatcher envelope.

    Usually the instance was created through the raw binding rather than one
    returned by `wrap_workflow_binding`, so nothing says which tenant's code to run.
    """


@runtime_checkable
class WorkflowRunner(Protocol):
    """A tenant's workflow: anything with `async run(event, step)`.

    A `WorkflowEntrypoint` instance satisfies it.
    """

    async def run(self, event: Any, step: Any) -> Any: ...


class LoadWorkflowRunner(Protocol):
    """The platform's callback: `load_runner(metadata, env)` -> runner (or awaitable of one).

    `metadata` is what was given to `wrap_workflow_binding` when the instance was
    created; `env` is the dispatcher entrypoint's own `env` mapping.
    """

    def __call__(
        self, metadata: DispatcherMetadata, env: Mapping[str, Any]
    ) -> Union[WorkflowRunner, Awaitable[WorkflowRunner]]: ...


def _freeze_metadata(metadata: Any) -> str:
    """Internal. Validate metadata (a JSON object) and return its JSON text.

    Kept as text so that later changes to the caller's dict cannot leak into
    envelopes, and each envelope gets its own copy.
    """
    if not isinstance(metadata, Mapping):
        raise InvalidInputError(
            f"dispatcher metadata must be a JSON object (a mapping), got {type(metadata).__name__}"
        )
    bad = [k for k in metadata if not isinstance(k, str)]
    if bad:
        raise InvalidInputError(f"dispatcher metadata keys must be strings, got {bad[0]!r}")
    return to_json(dict(metadata), "dispatcher metadata")


def _wrap_params(params: Any, metadata_json: str) -> dict[str, Any]:
    """Internal. The envelope stored as an instance's params (a fresh dict each call)."""
    return {"metadata": json.loads(metadata_json), "params": params}


def _unwrap_params(payload: Any) -> DispatcherEnvelope:
    """Internal. The envelope in `payload`, or MissingDispatcherMetadataError saying why not."""
    if not isinstance(payload, Mapping):
        raise MissingDispatcherMetadataError(
            "dispatcher workflow: event.payload is not a dispatcher envelope "
            f"(expected a dict with 'metadata' and 'params', got {type(payload).__name__}); "
            "was the instance created through a binding wrapped with wrap_workflow_binding()?"
        )
    try:
        return DispatcherEnvelope.model_validate(dict(payload))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "payload"
        raise MissingDispatcherMetadataError(
            f"dispatcher workflow: event.payload is not a dispatcher envelope "
            f"({where}: {err.get('msg')}; keys present: {sorted(map(str, payload))[:5]}); "
            "was the instance created through a binding wrapped with wrap_workflow_binding()?"
        ) from None
