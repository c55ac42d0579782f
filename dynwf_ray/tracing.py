"""Tracing: one OpenTelemetry trace per workflow instance, across all its activations.

What this module owns:

- **Trace identity.** When an instance is created, `new_trace_context` mints
  the span id of its root span and picks its trace id: the caller's trace
  when `create` runs inside a span (e.g. the platform's HTTP request), else a
  new one. Both travel in the journal with the instance (`trace_context`,
  W3C traceparent form, and `trace_caller`), so any process, on any node, a
  day later, adds spans to the same trace.
- **Spans** (`InstanceTrace`, one per activation): the activation span, a
  span per step attempt (its error recorded), sleep and event-wait spans
  (which straddle hibernation, so they hang off the root span and are
  emitted when they end), and the root span itself, emitted with its minted
  id when the instance finishes (complete, errored, terminated,
  restarted, or deleted unfinished). Until then a backend shows the instance's spans under a root
  it has not received yet.
- **Export settings**, read from the standard OpenTelemetry variables
  (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
  `..._HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
  `OTEL_TRACES_EXPORTER`, `OTEL_SDK_DISABLED`). Three layers are merged per
  tenant (`merge_otel_env`): the platform's (its process environment when the
  engine starts), the tenant's (OTEL_* in its `dynwf.toml` `[env]`), and the
  platform's per-tenant setting (`TenantTelemetry`, stored in the journal).
  A layer that names an endpoint replaces the endpoint and headers of the
  layers below it, so a tenant's spans go only where its settings say.
- **Off means off.** With no exporter configured `tracing_for` returns None
  and the step path does no tracing work at all.

Exporting is OTLP over HTTP/protobuf through a batching span processor.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from collections import OrderedDict
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, Any, Callable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanProcessor,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import invalid

if TYPE_CHECKING:
    from .journal import InstanceInfo, Journal

log = logging.getLogger("dynwf_ray.tracing")

#: Variables that say where spans go, and the credentials that go with that place; a
#: layer naming an endpoint replaces them all below it (a tenant's endpoint never gets
#: the platform's headers or client certificate).
ENDPOINT_KEYS = tuple(
    f"OTEL_EXPORTER_OTLP_{signal}{name}"
    for name in ("ENDPOINT", "HEADERS", "CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE")
    for signal in ("", "TRACES_")
)
#: Bounds on the batching settings (OTEL_BSP_*), a tenant's or the platform's: the spans
#: a host process queues for export are memory its other hosts share.
BSP_LIMITS = {"OTEL_BSP_MAX_QUEUE_SIZE": 2048, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512,
              "OTEL_BSP_SCHEDULE_DELAY": 30_000, "OTEL_BSP_EXPORT_TIMEOUT": 30_000}
SCOPE = "dynwf_ray"

# Attribute names (OpenTelemetry semantic-convention style: namespaced, dotted).
TENANT = "dynwf.tenant.id"
INSTANCE = "dynwf.instance.id"
VERSION = "dynwf.code.version"
STEP_NAME = "dynwf.step.name"
STEP_COUNT = "dynwf.step.count"
STEP_ATTEMPT = "dynwf.step.attempt"
STEP_KIND = "dynwf.step.kind"


# -- trace identity -------------------------------------------------------------


def traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def parse_traceparent(text: str | None) -> SpanContext | None:
    """The span context of a W3C traceparent string (None when absent or malformed)."""
    if not text:
        return None
    parts = text.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        ctx = SpanContext(
            int(parts[1], 16), int(parts[2], 16), is_remote=True,
            trace_flags=TraceFlags(int(parts[3], 16)),
        )
    except ValueError:
        return None
    return ctx if ctx.is_valid else None


def trace_id_of(trace_context: str | None) -> str | None:
    """The hex trace id of an instance's stored trace context."""
    ctx = parse_traceparent(trace_context)
    return f"{ctx.trace_id:032x}" if ctx else None


def new_trace_context() -> tuple[str, str | None]:
    """(trace_context, trace_caller) for a new instance: its root span's traceparent, in
    the current span's trace when there is one (whose traceparent is then the caller)."""
    caller = trace.get_current_span().get_span_context()
    span_id = random.getrandbits(64) or 1
    if caller.is_valid:
        return (
            traceparent(caller.trace_id, span_id, caller.trace_flags),
            traceparent(caller.trace_id, caller.span_id, caller.trace_flags),
        )
    return traceparent(random.getrandbits(128) or 1, span_id, TraceFlags.SAMPLED), None


# -- export settings ------------------------------------------------------------


def otel_environ() -> dict[str, str]:
    """The OTEL_* variables of this process (the platform's layer), those taken out of
    its environment before an exporter was made (`_hide_exporter_environ`) included."""
    with _HIDDEN_LOCK:
        return {**_HIDDEN, **{k: v for k, v in os.environ.items() if k.startswith("OTEL_")}}


_HIDDEN: dict[str, str] = {}
_HIDDEN_LOCK = threading.Lock()


def _hide_exporter_environ() -> None:
    """Take the OTEL_EXPORTER_OTLP_* variables out of this process's environment (into
    `_HIDDEN`, which `otel_environ` still reports). The OTLP exporter adds the headers,
    certificates and compression it finds there to what it is given: the platform's
    credentials would go to a tenant's endpoint. Every exporter here is given its
    settings explicitly (`_otlp_exporter`)."""
    with _HIDDEN_LOCK:
        for key in [k for k in os.environ if k.startswith("OTEL_EXPORTER_OTLP_")]:
            _HIDDEN[key] = os.environ.pop(key)


def merge_otel_env(*layers: Mapping[str, str]) -> dict[str, str]:
    """Later layers win; one that names an endpoint drops the endpoints and headers below."""
    merged: dict[str, str] = {}
    for layer in layers:
        if any(k in layer for k in ENDPOINT_KEYS):
            for key in ENDPOINT_KEYS:
                merged.pop(key, None)
        merged.update(layer)
    return merged


class TenantTelemetry(BaseModel):
    """The platform's per-tenant telemetry setting (`Engine.set_tenant_telemetry`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: OTLP/HTTP base URL (spans go to <endpoint>/v1/traces), e.g. http://collector:4318.
    endpoint: str | None = None
    #: Headers sent with every export (e.g. an API key of the tenant's backend).
    headers: dict[str, str] = Field(default_factory=dict)
    #: `service.name` of the tenant's spans.
    service_name: str | None = None
    #: More resource attributes of the tenant's spans (e.g. a backend's project name).
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    #: False turns tracing off for this tenant.
    enabled: bool = True

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        url = urlsplit(v)
        if url.scheme not in ("http", "https") or not url.hostname or any(c.isspace() for c in v):
            raise ValueError(f"endpoint {v[:100]!r} must be an http:// or https:// URL with a host")
        return v

    @field_validator("headers", "resource_attributes")
    @classmethod
    def _pairs(cls, v: dict[str, str]) -> dict[str, str]:
        # They travel as OTEL_* variables, "k1=v1,k2=v2": a ',' in either or a '=' in a
        # name would split a pair, and a line break would end a header.
        for key, value in v.items():
            if not key or any(c in key for c in ",= ") or "," in value \
                    or any(c in "\r\n" for c in key + value):
                raise ValueError(f"{key[:60]!r}: names must be non-empty without ',', '=' or "
                                 "spaces; values without ',' or line breaks")
        return v

    def env(self) -> dict[str, str]:
        """This setting as OTEL_* variables (the top layer of `merge_otel_env`)."""
        if not self.enabled:
            return {"OTEL_TRACES_EXPORTER": "none"}
        env: dict[str, str] = {}
        if self.endpoint:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.endpoint
            env["OTEL_TRACES_EXPORTER"] = "otlp"
        if self.headers:
            env["OTEL_EXPORTER_OTLP_HEADERS"] = ",".join(f"{k}={v}" for k, v in self.headers.items())
        if self.service_name:
            env["OTEL_SERVICE_NAME"] = self.service_name
        if self.resource_attributes:
            env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(
                f"{k}={v}" for k, v in self.resource_attributes.items()
            )
        return env


def parse_pairs(text: str | None) -> dict[str, str]:
    """`k1=v1,k2=v2` (OTEL_EXPORTER_OTLP_HEADERS / OTEL_RESOURCE_ATTRIBUTES)."""
    pairs: dict[str, str] = {}
    for item in (text or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            pairs[key.strip()] = value.strip()
    return pairs


def _exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = env.get("OTEL_TRACES_EXPORTER")
    if names is None:
        configured = any(k in env for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        names = "otlp" if configured else "none"
    exporters: list[SpanExporter] = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name == "otlp":
            exporters.append(_otlp_exporter(env))
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name not in ("none", ""):
            log.warning("OTEL_TRACES_EXPORTER=%r: unknown exporter %r ignored", names, name)
    return exporters


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not supported; exporting over http/protobuf", protocol)
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
        endpoint = base.rstrip("/") + "/v1/traces"
    headers = parse_pairs(env.get("OTEL_EXPORTER_OTLP_HEADERS"))
    headers.update(parse_pairs(env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")))

    def setting(name: str) -> str | None:
        return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")

    timeout, compression = setting("TIMEOUT"), setting("COMPRESSION")
    try:
        compressed = Compression(compression.strip().lower()) if compression else Compression.NoCompression
    except ValueError:
        log.warning("OTLP compression %r is not supported; exporting uncompressed", compression)
        compressed = Compression.NoCompression
    _hide_exporter_environ()  # so that the exporter takes only what it is given here
    return OTLPSpanExporter(
        endpoint=endpoint, headers=headers,
        timeout=float(timeout) / 1000 if timeout else None,
        certificate_file=setting("CERTIFICATE"), client_key_file=setting("CLIENT_KEY"),
        client_certificate_file=setting("CLIENT_CERTIFICATE"), compression=compressed,
    )


def _batching(exporter: SpanExporter, env: Mapping[str, str]) -> SpanProcessor:
    """A batching processor with the OTEL_BSP_* settings of `env` (not os.environ)."""

    def number(key: str) -> float | None:
        value = env.get(key)
        try:
            number = float(value) if value else None
        except ValueError:
            log.warning("%s=%r is not a number; using the default", key, value)
            return None
        if number is not None and not 0 < number <= BSP_LIMITS[key]:
            log.warning("%s=%r is out of bounds (1 to %d); using the bound", key, value, BSP_LIMITS[key])
            return float(BSP_LIMITS[key]) if number > 0 else None
        return number

    size = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
    queue = number("OTEL_BSP_MAX_QUEUE_SIZE")
    return BatchSpanProcessor(
        exporter,
        max_queue_size=int(queue) if queue else None,
        schedule_delay_millis=number("OTEL_BSP_SCHEDULE_DELAY"),
        max_export_batch_size=int(size) if size else None,
        export_timeout_millis=number("OTEL_BSP_EXPORT_TIMEOUT"),
    )


#: Distinct settings a process keeps a `Tracing` for (a platform process emitting root
#: spans for many tenants with endpoints of their own; a host process with hosts of many
#: tenants); the least recently used beyond this are flushed and shut down. Hosts in a
#: process number at most `max_hosts`: keep this above it.
MAX_PROVIDERS = 1024
_PROVIDERS: "OrderedDict[tuple, Tracing | None]" = OrderedDict()
_PROVIDERS_LOCK = threading.Lock()


def tracing_for(
    env: Mapping[str, str], tenant_id: str | None = None, code_version: str | None = None
) -> "Tracing | None":
    """The process's `Tracing` for these settings; None = tracing off. `tenant_id` and
    `code_version` become resource attributes (each host serves one of each)."""
    key = (tenant_id, code_version, tuple(sorted(env.items())))
    evicted: list[Tracing] = []
    with _PROVIDERS_LOCK:
        if key in _PROVIDERS:
            _PROVIDERS.move_to_end(key)
            return _PROVIDERS[key]
        exporters = _exporters(env)
        tracing = (
            Tracing([_batching(e, env) for e in exporters], env, tenant_id, code_version)
            if exporters else None
        )
        _PROVIDERS[key] = tracing
        while len(_PROVIDERS) > MAX_PROVIDERS:
            old = _PROVIDERS.popitem(last=False)[1]
            if old is not None:
                evicted.append(old)
    for old in evicted:  # flushes what it holds, ends its export thread
        threading.Thread(target=old.shutdown, daemon=True).start()
    return tracing


def flush_all(timeout_s: float = 5.0) -> None:
    """Flush every provider of this process (before it is ended)."""
    with _PROVIDERS_LOCK:
        tracings = [t for t in _PROVIDERS.values() if t is not None]
    for t in tracings:
        t.flush(timeout_s)


# -- spans --------------------------------------------------------------------


class _OpenSpan:
    """Internal: a span being timed. It is built as a finished `ReadableSpan` when it
    ends and handed straight to the span processors: the SDK's live `Span` costs about
    ten times more per step than this does (see bench/tracing_overhead.py)."""

    __slots__ = ("name", "context", "parent", "start", "attributes", "events", "status")

    def __init__(
        self, name: str, context: SpanContext, parent: SpanContext | None, start: int,
        attributes: dict[str, Any],
    ):
        self.name = name
        self.context = context
        self.parent = parent
        self.start = start
        self.attributes = attributes
        self.events: list[Event] = []
        self.status = _UNSET

    def fail(self, error: BaseException | tuple[str, str], at: int) -> None:
        """Mark the span failed: `error.type`, status ERROR, and an `exception` event."""
        if isinstance(error, BaseException):
            kind, message = type(error).__name__, str(error)
        else:
            kind, message = error
        self.attributes["error.type"] = kind
        self.status = Status(StatusCode.ERROR, message[:1000])
        self.events.append(
            Event("exception", {"exception.type": kind, "exception.message": message[:4000]}, at)
        )


_UNSET = Status(StatusCode.UNSET)


class _FrozenResource(Resource):
    """Internal: a Resource whose hash is computed once. The OTLP encoder groups spans
    by resource and hashes it for every span; the SDK's hash serializes the attributes
    to JSON each time, a sixth of the encoding cost of a step span."""

    def __init__(self, resource: Resource):
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or super().__eq__(other)


class Tracing:
    """Where one tenant's spans go from this process: its span processors and resource.

    `provider` is a tracer provider on the same processors, used to flush and shut
    them down; the spans tenant code makes in its sandbox arrive as data
    (`emit_tenant_span`).
    """

    def __init__(
        self, processors: list[SpanProcessor], env: Mapping[str, str] | None = None,
        tenant_id: str | None = None, code_version: str | None = None,
    ):
        env = env or {}
        attributes: dict[str, Any] = parse_pairs(env.get("OTEL_RESOURCE_ATTRIBUTES"))
        attributes["service.name"] = env.get("OTEL_SERVICE_NAME") or attributes.get(
            "service.name", "dynwf"
        )
        if tenant_id:
            attributes[TENANT] = tenant_id
        if code_version:
            attributes[VERSION] = code_version
        attributes["process.pid"] = os.getpid()
        self.resource = _FrozenResource(Resource.create(attributes))
        self._processors = list(processors)
        self._scope = InstrumentationScope(SCOPE)
        self.provider = TracerProvider(resource=self.resource)
        for processor in processors:
            self.provider.add_span_processor(processor)

    def instance(
        self, info: "InstanceInfo", clock: Callable[[], float], *, warm: bool | None = None
    ) -> "InstanceTrace | None":
        """Spans for one activation of an instance (None: no trace context, or the
        instance's trace is not sampled)."""
        root = parse_traceparent(info.trace_context)
        if root is None or not root.trace_flags.sampled:
            return None
        return InstanceTrace(self, info, root, clock, warm)

    def end_instance(
        self, info: "InstanceInfo", status: str, ended_at: float,
        error: tuple[str, str] | None = None,
    ) -> None:
        """Emit the instance's root span (it finished, was terminated or restarted)."""
        root = parse_traceparent(info.trace_context)
        if root is None or not root.trace_flags.sampled:
            return
        span = _OpenSpan(
            f"workflow {info.tenant_id}", _local(root), parse_traceparent(info.trace_caller),
            _ns(info.created_at),
            {
                **_instance_attrs(info), "dynwf.instance.status": status,
                "dynwf.instance.activations": info.activations,
            },
        )
        if error is not None:
            span.fail(error, _ns(ended_at))
        self.emit(span, _ns(ended_at))

    def open(
        self, name: str, parent: SpanContext, start: int, attributes: dict[str, Any]
    ) -> _OpenSpan:
        context = SpanContext(
            parent.trace_id, random.getrandbits(64) or 1, is_remote=False,
            trace_flags=parent.trace_flags,
        )
        return _OpenSpan(name, context, parent, start, attributes)

    def emit(self, span: _OpenSpan, end: int) -> None:
        finished = ReadableSpan(
            name=span.name, context=span.context, parent=span.parent, resource=self.resource,
            attributes=span.attributes, events=span.events, kind=SpanKind.INTERNAL,
            status=span.status, start_time=span.start, end_time=end,
            instrumentation_scope=self._scope,
        )
        for processor in self._processors:
            processor.on_end(finished)

    def emit_tenant_span(self, data: Mapping[str, Any], redact: Callable[[str], str]) -> None:
        """Export a span tenant code made in its sandbox (it arrives as data: `data` is
        untrusted, so every field is checked and cut to size)."""
        parent = data.get("parent_id")
        trace_id, span_id = int(data["trace_id"], 16), int(data["span_id"], 16)
        if not trace_id or not span_id:
            raise ValueError("invalid span ids")
        flags = TraceFlags(TraceFlags.SAMPLED)
        context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags)
        parent_ctx = (
            SpanContext(trace_id, int(parent, 16), is_remote=True, trace_flags=flags)
            if isinstance(parent, str) else None
        )
        attributes = {  # dynwf.* is the platform's: a tenant's span cannot pass as its own
            str(k)[:128]: redact(v[:4096]) if isinstance(v, str) else v
            for k, v in list(dict(data.get("attributes") or {}).items())[:64]
            if isinstance(v, (str, int, float, bool)) and not str(k).startswith("dynwf.")
        }
        span = _OpenSpan(redact(str(data["name"])[:256]), context, parent_ctx, int(data["start"]), attributes)
        if data.get("error") is not None:
            span.status = Status(StatusCode.ERROR, redact(str(data["error"])[:1000]))
        self.emit(span, int(data["end"]))

    def flush(self, timeout_s: float = 5.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        self.provider.shutdown()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _local(ctx: SpanContext) -> SpanContext:
    return SpanContext(ctx.trace_id, ctx.span_id, is_remote=False, trace_flags=ctx.trace_flags)


def _instance_attrs(info: "InstanceInfo") -> dict[str, Any]:
    return {TENANT: info.tenant_id, INSTANCE: info.instance_id, VERSION: info.code_version}


class _Current:
    """Internal: makes a span the current one (tenant spans nest under it) for a `with`
    block; attach/detach directly, a third of the cost of `trace.use_span`."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: _OpenSpan):
        self._span = span

    def __enter__(self) -> None:
        self._token = otel_context.attach(
            trace.set_span_in_context(NonRecordingSpan(self._span.context))
        )

    def __exit__(self, *exc: Any) -> None:
        otel_context.detach(self._token)



class InstanceTrace:
    """The spans of one activation of one instance."""

    def __init__(
        self, tracing: Tracing, info: "InstanceInfo", root: SpanContext,
        clock: Callable[[], float], warm: bool | None,
    ):
        self._tracing = tracing
        self._info = info
        self._clock = clock
        self._root = root
        self._attrs = _instance_attrs(info)
        attrs = {**self._attrs, "dynwf.activation.number": info.activations}
        if warm is not None:
            attrs["dynwf.activation.warm"] = warm
        self.activation = tracing.open("activation", root, _ns(clock()), attrs)

    def use(self) -> Any:
        """Make the activation span current while `run()` runs."""
        return _Current(self.activation)

    def end(self, outcome: str, error: tuple[str, str] | None = None) -> None:
        now = _ns(self._clock())
        self.activation.attributes["dynwf.activation.outcome"] = outcome
        if error is not None:
            self.activation.fail(error, now)
        self._tracing.emit(self.activation, now)

    def end_instance(self, status: str, error: tuple[str, str] | None = None) -> None:
        self._tracing.end_instance(self._info, status, self._clock(), error)

    # -- steps --------------------------------------------------------------

    def attempt(self, name: str, count: int, attempt: int) -> _OpenSpan:
        # The hot path: only what tells attempts apart. Tenant and code version are
        # on the activation span and in a host's resource (one per host process);
        # every attribute costs about 4 us to encode for OTLP.
        attrs = {INSTANCE: self._info.instance_id, STEP_NAME: name, STEP_COUNT: count, STEP_ATTEMPT: attempt}
        return self._tracing.open(f"step {name}", self.activation.context, _ns(self._clock()), attrs)

    def use_span(self, span: _OpenSpan) -> Any:
        """Make an attempt's span current while its callback runs."""
        return _Current(span)

    def attempt_failed(
        self, span: _OpenSpan, exc: BaseException | tuple[str, str], retry_at: float | None
    ) -> None:
        span.fail(exc, _ns(self._clock()))
        span.attributes["dynwf.step.will_retry"] = retry_at is not None
        if retry_at is not None:
            span.attributes["dynwf.step.retry_at"] = retry_at

    def end_span(self, span: _OpenSpan) -> None:
        self._tracing.emit(span, _ns(self._clock()))

    def sleep(self, name: str, count: int, started: float, ended: float) -> None:
        """A sleep that is over (it began in an earlier activation, usually)."""
        span = self._tracing.open(
            f"sleep {name}", self._root, _ns(started),
            {**self._attrs, STEP_NAME: name, STEP_COUNT: count, STEP_KIND: "sleep"},
        )
        self._tracing.emit(span, _ns(ended))

    def wait(
        self, name: str, count: int, event_type: str, started: float, ended: float,
        error: BaseException | None = None,
    ) -> None:
        """An event wait that ended: the event arrived, or its timeout passed."""
        span = self._tracing.open(
            f"wait_for_event {name}", self._root, _ns(started),
            {
                **self._attrs, STEP_NAME: name, STEP_COUNT: count, STEP_KIND: "wait",
                "dynwf.event.type": event_type,
            },
        )
        if error is not None:
            span.fail(error, _ns(ended))
        self._tracing.emit(span, _ns(ended))


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span, hex, if there is a valid one."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def tenant_telemetry(**kwargs: Any) -> TenantTelemetry:
    """A validated per-tenant setting; bad values raise InvalidInputError naming them."""
    try:
        return TenantTelemetry(**kwargs)
    except ValidationError as exc:
        raise invalid("invalid tenant telemetry setting", exc) from None


def tenant_env(journal: "Journal", defaults: Mapping[str, str], tenant_id: str, version: str) -> dict[str, str]:
    """The merged OTEL_* settings for a tenant's code version (see the module docstring)."""
    manifest = json.loads(journal.code_manifest(version) or "{}")
    tenant_layer = {k: v for k, v in manifest.get("env", {}).items() if k.startswith("OTEL_")}
    setting = journal.tenant_telemetry(tenant_id)
    platform_layer = TenantTelemetry(**json.loads(setting)).env() if setting else {}
    return merge_otel_env(defaults, tenant_layer, platform_layer)


def end_instance_trace(
    journal: "Journal", defaults: Mapping[str, str], info: "InstanceInfo", status: str,
    ended_at: float, error: tuple[str, str] | None = None,
) -> None:
    """Emit an instance's root span from a process that serves many tenants (the platform
    terminating or restarting it, the scheduler giving up on it), routed like its steps."""
    try:
        tracing = tracing_for(tenant_env(journal, defaults, info.tenant_id, info.code_version))
        if tracing is not None:
            tracing.end_instance(info, status, ended_at, error)
    except Exception:  # noqa: BLE001 - telemetry must never fail the operation
        log.exception("could not emit the root span of %s/%s", info.tenant_id, info.instance_id)
