"""Outbound half: a WORKFLOWS binding that tags every new instance with metadata.

A platform that loads tenant code its own way registers one dispatcher workflow
class with the engine and hands each tenant's code a wrapped binding instead of
the raw one. Whenever the tenant calls `create` / `create_batch`, the wrapper
stores `{"metadata": <the platform's metadata>, "params": <the tenant's params>}`
as the instance's params, so the dispatcher (`entrypoint.py`) can later route
the instance back to the right tenant's code. `get` is forwarded unchanged.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from .types import DispatcherMetadata, _freeze_metadata, _wrap_params


class DynamicWorkflowBinding:
    """A binding-shaped wrapper: `create`, `create_batch` and `get`.

    Build it with `wrap_workflow_binding`. Results of the inner binding (instance
    handles, or awaitables of them if the inner binding is async) are returned
    as they are.
    """

    def __init__(self, binding: Any, metadata: Mapping[str, Any]):
        if isinstance(binding, DynamicWorkflowBinding):
            binding = binding._binding  # re-wrapping replaces the metadata, never nests
        self._binding = binding
        self._metadata_json = _freeze_metadata(metadata)

    @property
    def metadata(self) -> DispatcherMetadata:
        """A copy of the metadata this binding attaches."""
        return json.loads(self._metadata_json)

    def __repr__(self) -> str:
        return f"DynamicWorkflowBinding({self._binding!r}, metadata={self._metadata_json})"

    def create(self, id: str | None = None, params: Any = None) -> Any:
        """Create an instance whose params are the envelope around `params`."""
        return self._binding.create(id=id, params=_wrap_params(params, self._metadata_json))

    def create_batch(self, items: Iterable[Mapping[str, Any]]) -> Any:
        """Create several instances; every item's params are wrapped. Items are copied; one
        that is not a mapping is passed on as it is (the inner binding says it is invalid)."""
        return self._binding.create_batch(
            [
                {**item, "params": _wrap_params(item.get("params"), self._metadata_json)}
                if isinstance(item, Mapping) else item
                for item in items
            ]
        )

    def get(self, id: str) -> Any:
        """The inner binding's handle of instance `id`, unchanged."""
        return self._binding.get(id)


def wrap_workflow_binding(binding: Any, metadata: Mapping[str, Any]) -> DynamicWorkflowBinding:
    """Wrap `binding` so each instance it creates carries `metadata` (a JSON object).

    `binding` is the dispatcher's raw WORKFLOWS binding (anything with `create`,
    `create_batch` and `get`). Wrapping a binding that is already wrapped does not
    nest envelopes: the new wrapper sits on the same raw binding and carries only
    the new `metadata` (the old one is replaced, not merged). Metadata is a
    routing hint, never authorization: tenant code can read it back.
    Raises InvalidInputError if `metadata` is not a JSON-serializable mapping.
    """
    return DynamicWorkflowBinding(binding, metadata)
