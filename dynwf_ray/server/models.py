"""The API's request and response bodies (pydantic): what the OpenAPI document publishes.

Requests refuse unknown fields, so a misspelt field is an error instead of being
ignored. Responses are built from the journal's records by the `*_of` helpers."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..journal import InstanceInfo, StepRecord
from ..tracing import parse_traceparent
from ..types import (
    ID_PATTERN, MAX_BATCH, MAX_EVENT_TYPE_LENGTH, MAX_ID_LENGTH, MAX_STEP_NAME_LENGTH,
    InstanceError, LogLine,
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateRequest(_Request):
    id: str | None = Field(default=None, pattern=ID_PATTERN, max_length=MAX_ID_LENGTH,
                           description="the instance id; a random one when absent")
    params: Any = Field(default=None, description="JSON params handed to run() (at most 1 MiB)")


class BatchItem(BaseModel):
    """An item of a batch: checked by the engine item by item, so that a bad one is
    reported in its own result ("invalid") instead of failing the others."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    params: Any = None


class BatchRequest(_Request):
    items: list[BatchItem] = Field(max_length=MAX_BATCH)


class EventRequest(_Request):
    type: str = Field(pattern=ID_PATTERN, max_length=MAX_EVENT_TYPE_LENGTH)
    payload: Any = None


class TerminateRequest(_Request):
    rollback: bool = Field(default=False, description="run the completed steps' compensations first")


class StepRef(_Request):
    name: str = Field(min_length=1, max_length=MAX_STEP_NAME_LENGTH)
    count: int = Field(ge=1, description="which occurrence of the step name (1: the first)")


class RestartRequest(_Request):
    from_step: StepRef | None = None


class Created(BaseModel):
    tenant: str
    id: str | None
    outcome: str = Field(description='"created", "existed" or "invalid"')
    error: str | None = None


class BatchCreated(BaseModel):
    items: list[Created]


class Accepted(BaseModel):
    tenant: str
    id: str
    status: str


class InstanceSummary(BaseModel):
    tenant: str
    id: str
    status: str
    version: str
    created_at: float
    updated_at: float
    error: InstanceError | None = None


class InstanceDetail(InstanceSummary):
    params: Any = None
    output: Any = None
    condition: str | None = None
    warning: str | None = None
    rollback: list[dict[str, Any]] = []
    wake_at: float | None = None
    waiting_for: str | None = None
    pause_requested: bool = False
    activations: int = 0
    trace_id: str | None = None
    trace_url: str | None = None


class InstancePage(BaseModel):
    instances: list[InstanceSummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: no more")


class Step(BaseModel):
    name: str
    count: int = Field(description="the occurrence of this step name (1: the first)")
    kind: str
    status: str
    attempts: int
    result: Any = None
    error: InstanceError | None = None
    started_at: float
    finished_at: float | None = None
    next_attempt_at: float | None = None


class Steps(BaseModel):
    steps: list[Step]


class LogPage(BaseModel):
    lines: list[LogLine]
    next_after: int = Field(description="pass as `after` for newer lines")


class Tenant(BaseModel):
    tenant: str
    latest_version: str
    updated_at: float


class Tenants(BaseModel):
    tenants: list[Tenant]


class Version(BaseModel):
    version: str
    kind: str
    created_at: float
    latest: bool


class Versions(BaseModel):
    versions: list[Version]


class Pushed(BaseModel):
    tenant: str
    version: str


class WhoAmI(BaseModel):
    admin: bool
    tenant: str | None
    token_id: str


class Stats(BaseModel):
    now: float
    by_tenant: dict[str, dict[str, int]]
    activations: int | None = Field(description="activations since the engine started (admin only)")
    cold_starts: int | None = Field(description="hosts started cold (admin only)")
    hosts: int | None = Field(description="live hosts (admin only)")
    sandboxes: int = Field(description="live sandboxes the caller's tenants have")
    sandboxes_by_tenant: dict[str, int]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    journal: dict[str, Any]


class ClientConfig(BaseModel):
    trace_url: str | None = Field(description="URL template of a trace: {trace_id}, {tenant}")


def _error(name: str | None, message: str | None) -> InstanceError | None:
    return InstanceError(name=name, message=message or "") if name else None


def summary_of(info: InstanceInfo) -> InstanceSummary:
    return InstanceSummary(
        tenant=info.tenant_id, id=info.instance_id, status=info.status, version=info.code_version,
        created_at=info.created_at, updated_at=info.updated_at,
        error=_error(info.error_name, info.error_message),
    )


def trace_id_of(info: InstanceInfo) -> str | None:
    ctx = parse_traceparent(info.trace_context)
    return f"{ctx.trace_id:032x}" if ctx is not None else None


def step_of(s: StepRecord) -> Step:
    return Step(
        name=s.name, count=abs(s.seq), kind=s.kind, status=s.status, attempts=s.attempts,
        result=json.loads(s.result_json) if s.result_json is not None else None,
        error=_error(s.error_name, s.error_message), started_at=s.started_at,
        finished_at=s.finished_at, next_attempt_at=s.next_attempt_at,
    )
