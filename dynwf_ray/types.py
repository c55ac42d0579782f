"""Validated shapes and limits shared by the tenant- and platform-facing APIs.

Everything a caller hands us goes through one of these: durations ("10 seconds",
numbers of seconds, timedelta), instance/tenant ids, step names, event types,
step retry configuration and JSON payloads with their size limits. Errors name
the argument that was wrong. The event and status shapes handed back to callers
live here too.
"""

from __future__ import annotations

import inspect
import json
import re
from datetime import datetime, timedelta, timezone
from enum import Enum, StrEnum
from functools import lru_cache
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InvalidInputError, NotSerializableError, PayloadTooLargeError

# Limits (Cloudflare Workflows' documented ones, which we match).
MAX_ID_LENGTH = 100
MAX_STEP_NAME_LENGTH = 256
MAX_EVENT_TYPE_LENGTH = 100
MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_SLEEP = timedelta(days=365)
MAX_BATCH = 100
DEFAULT_WAIT_TIMEOUT = timedelta(hours=24)

#: Ids of tenants and instances, and event types (the whole string must match).
ID_PATTERN = r"^[a-zA-Z0-9_][a-zA-Z0-9\-_]*$"
_ID_RE = re.compile(ID_PATTERN)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UNITS = {
    "ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")


def parse_duration(value: Any, what: str = "duration") -> float:
    """Seconds from "10 seconds" / "2 minutes" / "1 day", a number of seconds or a timedelta."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise InvalidInputError(f"{what}: expected a duration, got {value!r}")
    elif isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = float("inf")
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        unit = match and _UNITS.get(match.group(2).lower())
        if not unit:
            raise InvalidInputError(
                f"{what}: cannot parse {value!r}; use e.g. '10 seconds', '2 minutes', "
                "'1 day', a number of seconds or a timedelta"
            )
        seconds = float(match.group(1)) * unit
    else:
        raise InvalidInputError(f"{what}: expected a duration, got {type(value).__name__}")
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise InvalidInputError(f"{what}: must be a finite, non-negative duration, got {str(value)[:40]!r}")
    return seconds


def validate_id(value: Any, what: str = "instance id") -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_LENGTH or not _ID_RE.fullmatch(value):
        raise InvalidInputError(
            f"{what} {value[:120]!r} is invalid: 1-{MAX_ID_LENGTH} characters of "
            "letters, digits, '-' and '_', not starting with '-'"
        )
    return value


def validate_step_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"step name must be a non-empty string, got {value!r}")
    if len(value) > MAX_STEP_NAME_LENGTH:
        raise InvalidInputError(
            f"step name {value[:40]!r}... is {len(value)} characters; the limit is "
            f"{MAX_STEP_NAME_LENGTH}"
        )
    if _CONTROL_RE.search(value):
        raise InvalidInputError(f"step name {value!r} contains control characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidInputError(f"step name {value!r} is not valid Unicode (a lone surrogate)") from None
    return value


def validate_event_type(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_EVENT_TYPE_LENGTH
        or not _ID_RE.fullmatch(value)
    ):
        raise InvalidInputError(
            f"event type {value!r} is invalid: 1-{MAX_EVENT_TYPE_LENGTH} characters "
            "matching ^[a-zA-Z0-9_][a-zA-Z0-9-_]*$"
        )
    return value


def to_json(value: Any, what: str) -> str:
    """Serialize for the journal, enforcing JSON-ability, the nesting limit (what reads
    it back, the HTTP API included, must be able to) and the 1 MiB limit."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise NotSerializableError(f"{what} is not JSON-serializable: {exc}") from None
    except RecursionError:
        raise NotSerializableError(
            f"{what} is not JSON-serializable: nested more than {MAX_JSON_DEPTH} levels deep") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        raise NotSerializableError(
            f"{what} is not JSON-serializable: nested more than {MAX_JSON_DEPTH} levels deep")
    if "\\ud" in text:  # an escaped surrogate: a pair is a character, one alone is not text
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise NotSerializableError(
                f"{what} is not JSON-serializable: it holds a lone surrogate (text that is "
                "not valid Unicode)") from None
    if len(text) > MAX_PAYLOAD_BYTES and len(text.encode()) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLargeError(
            f"{what} is {len(text.encode())} bytes serialized; the limit is "
            f"{MAX_PAYLOAD_BYTES} bytes (1 MiB)"
        )
    return text


#: How deeply JSON values may nest (lists and objects): what reads them back, the HTTP
#: API's encoder among them, stops short of 256.
MAX_JSON_DEPTH = 128


def _depth(value: Any) -> int:
    """How deeply `value`'s lists and dicts nest (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, (list, tuple)):
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in item)
    return deepest


def timestamp_to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


class Backoff(str, Enum):
    constant = "constant"
    linear = "linear"
    exponential = "exponential"


class RetryConfig(BaseModel):
    """`retries=` of `step.do`: how many retries, and how long between them."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    #: Retries after the first attempt; None retries for as long as the instance lives
    #: (until it is terminated or restarted, or the step raises NonRetryableError).
    limit: int | None = Field(default=5, ge=0)
    delay: float = 10.0
    backoff: Backoff = Backoff.exponential

    @field_validator("delay", mode="before")
    @classmethod
    def _delay(cls, v: Any) -> float:
        seconds = parse_duration(v, "retries.delay")
        if seconds > MAX_SLEEP.total_seconds():
            raise InvalidInputError(f"retries.delay: {seconds:g} s is longer than 365 days")
        return seconds


class StepConfig(BaseModel):
    """The options of one `step.do` call, validated."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    retries: RetryConfig = RetryConfig()
    timeout: float = 600.0

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> float:
        seconds = parse_duration(v, "timeout")
        if seconds <= 0:
            raise InvalidInputError("timeout must be greater than zero")
        return seconds


DEFAULT_STEP_CONFIG = StepConfig()


class WorkflowEvent(BaseModel):
    """What `run(event, step)` receives: the instance's params and identity."""

    model_config = ConfigDict(frozen=True)
    payload: Any = None
    timestamp: datetime
    instance_id: str
    #: The envelope's routing metadata (tenant id, code version, what the platform
    #: added). Read-only: a hint for routing, never authorization.
    metadata: dict[str, Any] = Field(default_factory=dict)


class ReceivedEvent(BaseModel):
    """What `step.wait_for_event` returns."""

    model_config = ConfigDict(frozen=True)
    type: str
    payload: Any = None
    timestamp: datetime


class StepContext(BaseModel):
    """Passed to a `step.do` callback that has a required positional parameter (or *args):
    which step and attempt this is, and the step's effective options (`config`: its
    `retries` and `timeout` after defaults)."""

    model_config = ConfigDict(frozen=True)
    step: str
    count: int
    attempt: int
    config: StepConfig = DEFAULT_STEP_CONFIG


class InstanceStatus(StrEnum):
    """An instance's status: Cloudflare's vocabulary. Each member is its own string
    ("waitingForPause" included), so it compares equal to, and is stored as, the plain
    value. "unknown": the journal could not be read (`status()` then says why)."""

    queued = "queued"
    running = "running"
    waiting = "waiting"
    paused = "paused"
    waitingForPause = "waitingForPause"
    complete = "complete"
    errored = "errored"
    terminated = "terminated"
    unknown = "unknown"


#: The statuses an instance never leaves on its own (restart() aside).
TERMINAL = (InstanceStatus.complete, InstanceStatus.errored, InstanceStatus.terminated)


class InstanceError(BaseModel):
    name: str
    message: str


class StatusReport(BaseModel):
    """`instance.status()`: Cloudflare's status shape."""

    model_config = ConfigDict(use_enum_values=True)
    status: InstanceStatus
    error: InstanceError | None = None
    output: Any = None


class Retention(BaseModel):
    """How long finished instances are kept, per final status, from when they finished:
    seconds, a duration ("7 days") or a timedelta; None keeps them for good. Expired ones
    are deleted with their steps, events and logs (`EngineConfig.retention`,
    `Engine.set_retention`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    complete: float | None = None
    errored: float | None = None
    terminated: float | None = None

    @field_validator("complete", "errored", "terminated", mode="before")
    @classmethod
    def _duration(cls, v: Any, info: Any) -> float | None:
        return None if v is None else parse_duration(v, f"retention of {info.field_name} instances")


class LogLine(BaseModel):
    """One line tenant code printed or logged (`instance.logs()`, `dynwf logs`).

    `id` increases within an instance: pass the last one seen as `after` to get
    only newer lines. `step`, `count` and `attempt` say which step attempt
    printed it (None: `run()` itself, outside any step)."""

    model_config = ConfigDict(frozen=True)
    id: int | None = None
    at: float
    stream: str
    step: str | None = None
    count: int | None = None
    attempt: int | None = None
    trace_id: str | None = None
    span_id: str | None = None
    message: str


class CreateOptions(BaseModel):
    """One item of `create` / `create_batch`."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    params: Any = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        return None if v is None else validate_id(v)


# -- step callbacks ------------------------------------------------------------


def takes_context(fn: Callable[..., Any]) -> bool:
    """Whether a callback wants the StepContext: it has a required positional parameter."""
    code = getattr(fn, "__code__", None)
    if code is not None:
        defaults = len(getattr(fn, "__defaults__", None) or ())
        return _code_takes_context(code, defaults, inspect.ismethod(fn))
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        or p.kind is p.VAR_POSITIONAL
        for p in params
    )


@lru_cache(maxsize=4096)
def _code_takes_context(code: Any, defaults: int, bound: bool) -> bool:
    required = code.co_argcount - defaults - (1 if bound else 0)
    return required > 0 or bool(code.co_flags & inspect.CO_VARARGS)
