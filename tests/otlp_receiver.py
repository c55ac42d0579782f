"""`OtlpReceiver`: a minimal OTLP/HTTP trace receiver on loopback, for tests and benchmarks.

It accepts `POST /v1/traces` with an ExportTraceServiceRequest (protobuf, as
the SDK's OTLP/HTTP exporter sends it), decodes every span, and keeps them in
memory as `ReceivedSpan`s. With `decode_later=True` it keeps the request bodies
and decodes them when asked (`received()`): a benchmark's receiver then does
not compete for the CPU with what it measures, as a remote collector would not.
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    status_code: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any]
    resource: dict[str, Any]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


class OtlpReceiver:
    def __init__(self, decode_later: bool = False) -> None:
        self.spans: list[ReceivedSpan] = []
        self._bodies: list[bytes] | None = [] if decode_later else None
        self.requests = 0
        self.headers: list[dict[str, str]] = []  # each export request's headers (lower-case names)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._add_body(body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _add_body(self, body: bytes) -> None:
        with self._lock:
            if self._bodies is not None:
                self._bodies.append(body)
                return
        self._add(ExportTraceServiceRequest.FromString(body))

    def _add(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        ReceivedSpan(
                            name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                            status_code=s.status.code,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            resource=resource,
                        )
                    )
        with self._lock:
            self.spans.extend(spans)
            self.requests += 1

    def received(self) -> list[ReceivedSpan]:
        with self._lock:
            bodies, self._bodies = self._bodies, ([] if self._bodies is not None else None)
        for body in bodies or ():
            self._add(ExportTraceServiceRequest.FromString(body))
        with self._lock:
            return list(self.spans)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
