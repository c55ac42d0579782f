"""Tenant code: how a workflow class becomes a stored, versioned code blob and back.

A code version is content-addressed: the version string is derived from the
blob, so registering the same code twice yields the same version. Kinds:

- `pickled-class`: a `WorkflowEntrypoint` subclass registered directly by the
  platform (`Engine.register`), stored with cloudpickle. Classes from
  importable modules are stored by reference (the module must be importable
  where instances run), so their version names the class, not its code:
  editing the module changes what in-flight instances replay with. Classes
  defined in `__main__` are stored by value, code included.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ray import cloudpickle

from .entrypoint import WorkflowEntrypoint
from .errors import InvalidInputError

PICKLED_CLASS = "pickled-class"


def package_class(cls: Any) -> tuple[str, str, bytes]:
    """(version, kind, blob) for a workflow class registered directly."""
    if not (isinstance(cls, type) and issubclass(cls, WorkflowEntrypoint)):
        raise InvalidInputError(
            f"workflow class must be a subclass of WorkflowEntrypoint, got {cls!r}"
        )
    if cls.run is WorkflowEntrypoint.run:
        raise InvalidInputError(f"{cls.__qualname__} does not implement run(event, step)")
    blob = cloudpickle.dumps(cls)
    return _version(blob), PICKLED_CLASS, blob


def load_class(tenant_id: str, version: str, kind: str, blob: bytes) -> type[WorkflowEntrypoint]:
    """The workflow class of a stored code version."""
    if kind != PICKLED_CLASS:
        raise InvalidInputError(
            f"tenant {tenant_id!r} version {version!r}: unknown code kind {kind!r}"
        )
    cls = cloudpickle.loads(blob)
    if not (isinstance(cls, type) and issubclass(cls, WorkflowEntrypoint)):
        raise InvalidInputError(
            f"tenant {tenant_id!r} version {version!r} does not hold a WorkflowEntrypoint"
        )
    return cls


def runtime_env_for(kind: str, blob: bytes) -> dict | None:
    """The Ray runtime_env an instance host of this code needs (none for registered classes)."""
    return None


def _version(blob: bytes) -> str:
    return "v-" + hashlib.sha256(blob).hexdigest()[:16]
