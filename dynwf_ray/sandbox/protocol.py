"""The private channel between a sandbox and its supervisor: framing and message shapes.

Everything a sandbox can do crosses one AF_UNIX stream socket as data (and,
with egress granted, the side channel of `egress.py` for its tunnels): each
message is a 4-byte big-endian length and a JSON object (never pickle, in
either direction). This module is imported on both sides of the trust
boundary, so it holds only the wire format; what each side does with a
message lives in `runtime.py` (the sandbox) and `supervisor.py` (trusted).

Sandbox -> supervisor (`op`), every request carries a fresh `id`:
    ready {}                               the tenant's code imported; waiting for work
    boot_error {name, message}             it did not
    do {id, name, count, retries, timeout} a step that replay could not answer locally;
       with {at_once: true, span}          ... whose callback runs now, without a `call`
                                           (allowed by `activate`; `span`: the stand-in
                                           span id the callback's spans use as parent)
    undo {id, name, count, retries, timeout}   the compensation of step (name, count)
    sleep {id, name, count, seconds} | sleep_until {id, name, count, at}
    wait {id, name, count, type, timeout}
    bind {id, binding, method, args, kwargs}   a call to a platform binding
    result {id, value} | raise {id, name, message, retryable}   answer to a `call`
    log {lines: [[stream, message, call_id|None], ...]}
    spans {spans: [...]}                   the tenant's own OpenTelemetry spans
    return {value, unused} | fail {name, message, unused}  how run() ended; `unused`:
                                           the replayed steps it never asked for
    idle {unused}                          the activation wound down after `end`

Supervisor -> sandbox (`t`):
    activate {event, metadata, env, bindings, replay, trace, steps_at_once, not_replayed}
                                           `steps_at_once`: a step the journal holds
                                           nothing of (in neither `replay` nor
                                           `not_replayed`) may run at once, as `do` says
    call {id, attempt, count, config, span}   run the step callback of request `id`
    ok {id, value, [ask_first]} | err {id, name, message, [step, error_name,
       error_message, attempts]}           answer to a request (`step`...: of a
                                           StepFailedError); `ask_first`: run no
                                           further step at once
    end {}                                 the activation is over (suspended, paused,
                                           a limit hit...): stop and report idle
(A sandbox no longer needed is killed, not told.)

The supervisor never trusts a frame: `read_frame` refuses lengths over the
limit before reading the body, and `check` validates a sandbox message's
shape (types, sizes, names) before anything acts on it.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Iterator

#: Largest message a sandbox may send: a step result (1 MiB) plus room for its frame.
MAX_SANDBOX_FRAME = 1024 * 1024 + 64 * 1024
#: Longest string field other than values (names, messages, log lines).
MAX_TEXT = 64 * 1024
#: Most lines one `log` message may carry.
MAX_LINES = 4096
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A message broke the protocol (size, shape or order). The sandbox is ended."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"a message is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a JSON object, got {type(message).__name__}")
    return message


def frame_length(header: bytes, limit: int) -> int:
    (length,) = _HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"a message of {length} bytes is over the limit of {limit} bytes")
    return length


def cut_frames(buffer: bytearray, limit: int) -> Iterator[bytes]:
    """The bodies of the whole frames at the start of `buffer` (bytes received as they
    came), each removed from it before it is yielded; a frame not yet whole stays.
    Raises ProtocolError at a header over `limit`, before its body arrives."""
    while len(buffer) >= _HEADER.size:
        end = _HEADER.size + frame_length(bytes(buffer[:_HEADER.size]), limit)
        if len(buffer) < end:
            return
        body = bytes(buffer[_HEADER.size:end])
        del buffer[:end]
        yield body


# -- blocking I/O (what a sandbox sends; one reply a host waits for when it validates code) --


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def recv(sock: socket.socket, limit: int = 1 << 31) -> dict[str, Any] | None:
    """The next message, or None when the peer closed the channel."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    body = _recv_exactly(sock, frame_length(header, limit))
    if body is None:
        return None
    return decode(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(n - len(chunks), 1 << 20))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


# -- validation of what a sandbox sends (the trusted side) ---------------------------

_REQUESTS = {"do", "undo", "sleep", "sleep_until", "wait", "bind"}
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "ready": {},
    "boot_error": {"name": (str,), "message": (str,)},
    "do": {"id": (int,), "name": (str,), "count": (int,)},
    "undo": {"id": (int,), "name": (str,), "count": (int,)},
    "sleep": {"id": (int,), "name": (str,), "count": (int,)},
    "sleep_until": {"id": (int,), "name": (str,), "count": (int,), "at": (int, float)},
    "wait": {"id": (int,), "name": (str,), "count": (int,), "type": (str,)},
    "bind": {"id": (int,), "binding": (str,), "method": (str,), "args": (list,), "kwargs": (dict,)},
    "result": {"id": (int,)},
    "raise": {"id": (int,), "name": (str,), "message": (str,), "retryable": (bool,)},
    "log": {"lines": (list,)},
    "spans": {"spans": (list,)},
    "return": {},
    "fail": {"name": (str,), "message": (str,)},
    "idle": {},
}


def check(message: dict[str, Any]) -> str:
    """Validate a sandbox message's shape; returns its op. Raises ProtocolError."""
    op = message.get("op")
    fields = _FIELDS.get(op) if isinstance(op, str) else None
    if fields is None:
        raise ProtocolError(f"unknown message op {op!r}")
    for key, types in fields.items():
        value = message.get(key)
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise ProtocolError(f"message {op!r}: field {key!r} is missing or not {types[0].__name__}")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise ProtocolError(f"message {op!r}: field {key!r} is longer than {MAX_TEXT} characters")
        if key in ("id", "count") and not 0 < value < 1 << 53:
            raise ProtocolError(f"message {op!r}: field {key!r} is out of range")
    if op == "log":
        if len(message["lines"]) > MAX_LINES:
            raise ProtocolError(f"message 'log' holds more than {MAX_LINES} lines")
        for line in message["lines"]:
            if not (
                isinstance(line, list) and len(line) == 3
                and line[0] in ("stdout", "stderr", "INFO", "WARNING", "ERROR", "CRITICAL", "DEBUG")
                and isinstance(line[1], str) and len(line[1]) <= MAX_TEXT
                and (line[2] is None or isinstance(line[2], int) and not isinstance(line[2], bool))
            ):
                raise ProtocolError("message 'log': a line is not [stream, text, call id]")
    return op


def is_request(op: str) -> bool:
    return op in _REQUESTS
