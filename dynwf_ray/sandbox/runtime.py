"""Inside the sandbox: runs the tenant's `run(event, step)` and talks to the supervisor.

This is the only dynwf-ray code a sandbox runs, after the jail is in place
(`template.py` forks the process and calls `serve`). It imports the tenant's
code once, then serves activations one at a time on its channel:

- `step` is a proxy (`_Step`). A step the journal already holds as finished
  (sent in `activate` as `replay`) is answered here without a round trip, so
  replaying a long history is cheap; any other step is a request to the
  supervisor, which decides (replay, pause, retry state) and writes the
  journal. When a callback must run, the supervisor sends `call`; the
  callback runs here and its result or exception goes back as data. A step
  the journal holds nothing of, while no pause is pending, needs no `call`:
  the sandbox says `do` with `at_once` and runs its callback at once (one
  round trip per step instead of two); the supervisor still times it, and
  decides what is recorded.
- `self.env` holds the platform's plain values and binding proxies; every
  binding method call is a `bind` request answered by the trusted side
  (`env["WORKFLOWS"]` is one of them, scoped to this tenant there).
- `print`, `sys.stderr` and `logging` are captured as lines tagged with the
  step call that printed them, and spans the tenant makes with the
  OpenTelemetry API are sent as data to be exported by the trusted side.

Nothing here is trusted: tenant code shares this process and can change any
of it. It can only hurt its own activation; the supervisor validates every
message and decides what is recorded.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import os
import select
import socket
import sys
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from ..entrypoint import WorkflowEntrypoint
from .. import errors
from ..rollback import Compensations, run_with_rollback
from ..types import (
    DEFAULT_STEP_CONFIG, ReceivedEvent, StepConfig, StepContext, WorkflowEvent, takes_context, to_json,
)
from . import protocol

_CALL: contextvars.ContextVar[int | None] = contextvars.ContextVar("dynwf_call", default=None)
#: Flush captured lines once this many characters are pending.
_LOG_FLUSH_CHARS = 64 * 1024


class _Over(BaseException):
    """The supervisor ended this activation (a sleep, a wait, a pause, a limit)."""


class _Channel:
    """Requests and replies over the socket. Any thread sends. The event loop reads
    (`_on_readable`), except while a blocking request reads its own reply
    (`request_sync`): whoever reads holds `_reading`, and routes every message it
    receives to whoever waits for it."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.sock = sock
        self.loop = loop
        self._send_lock = threading.Lock()
        self._next_id = 0
        self._pending: dict[int, Any] = {}  # id -> asyncio.Future | [threading.Event, reply]
        self._reading = threading.Lock()
        self._received = bytearray()  # bytes of a frame not yet whole
        self._loop_thread: int | None = None
        self.lines: list[list[Any]] = []
        self._chars = 0
        self.spans: list[dict[str, Any]] = []
        self.on_message: Callable[[dict[str, Any]], None] = lambda m: None
        self.ask_first = False  # an answer said so (a pause is pending): no step runs at once

    def new_id(self) -> int:
        with self._send_lock:
            self._next_id += 1
            return self._next_id

    def send(self, message: dict[str, Any]) -> None:
        with self._send_lock:
            self._flush_locked()
            protocol.send(self.sock, message)

    def add_line(self, stream: str, text: str) -> None:
        with self._send_lock:
            self.lines.append([stream, text[: protocol.MAX_TEXT], _CALL.get()])
            self._chars += len(text)
            if self._chars >= _LOG_FLUSH_CHARS or len(self.lines) >= protocol.MAX_LINES:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self.lines:
            lines, self.lines, self._chars = self.lines, [], 0
            protocol.send(self.sock, {"op": "log", "lines": lines})
        if self.spans:
            spans, self.spans = self.spans, []
            protocol.send(self.sock, {"op": "spans", "spans": spans})

    async def request(
        self, message: dict[str, Any], on_call: Callable | None = None, at_once: Callable | None = None,
    ) -> Any:
        """Send a request; its `call` (if any) runs `on_call`; returns the `ok` value.
        `at_once`: run it (a step callback that sends its own answer) before waiting."""
        future = self.loop.create_future()
        future.on_call = on_call  # type: ignore[attr-defined]
        self._pending[message["id"]] = future
        self.send(message)
        try:
            if at_once is not None:
                await at_once()
            return await future
        finally:
            self._pending.pop(message["id"], None)

    def request_sync(self, message: dict[str, Any]) -> Any:
        """A blocking request (binding calls are synchronous for tenant code). Its
        thread reads the channel until the reply comes: the event loop may be the one
        blocked, or be waiting for this thread."""
        waiter: list[Any] = [threading.Event(), None]
        self._pending[message["id"]] = waiter
        self.send(message)
        on_loop = threading.get_ident() == self._loop_thread
        try:
            while not waiter[0].is_set():
                with self._reading:
                    if not waiter[0].is_set():
                        self._receive(_INLINE if on_loop else _ELSEWHERE)
        finally:
            self._pending.pop(message["id"], None)
            if not on_loop:  # the loop may have stopped reading while this thread did
                self.loop.call_soon_threadsafe(self.start_reading)
        return _reply_value(waiter[1])

    def fail_pending(self) -> None:
        for waiter in list(self._pending.values()):
            if isinstance(waiter, list):
                waiter[1] = {"t": "end"}
                waiter[0].set()
            elif not waiter.done():
                waiter.set_exception(_Over())
        self._pending.clear()

    def start_reading(self) -> None:
        """(On the event loop's thread.) Read the channel whenever it has data."""
        self._loop_thread = threading.get_ident()
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        if not self._reading.acquire(blocking=False):
            # A blocking request on another thread reads; it hands back when answered.
            self.loop.remove_reader(self.sock.fileno())
            return
        try:
            self._receive(_ON_LOOP)
        finally:
            self._reading.release()

    def _receive(self, where: int) -> None:
        """Read what the socket holds (waiting for it, except on the loop: it was told
        there is some) and route each whole message received."""
        try:
            if where == _ON_LOOP:
                data = self.sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
            elif where == _ELSEWHERE and not select.select([self.sock], [], [], _RECHECK_S)[0]:
                return  # nothing yet: the caller looks whether it was answered meanwhile
            else:
                data = self.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the supervisor is gone: so is our purpose
            os._exit(0)
        self._received += data
        for body in protocol.cut_frames(self._received, 1 << 32):
            self._route(protocol.decode(body), where)

    def _route(self, message: dict[str, Any], where: int) -> None:
        """Hand a message to whoever waits for it: a blocked thread at once; the event
        loop at once when it is the reader, else soon (its thread may be busy)."""
        kind = message.get("t")
        if message.get("ask_first") is True:
            self.ask_first = True
        if kind in ("ok", "err", "call"):
            waiter = self._pending.get(message.get("id"))
            if isinstance(waiter, list):
                waiter[1] = message
                waiter[0].set()
            elif waiter is not None:
                self._on_loop(where, _deliver, waiter, message)
        else:
            self._on_loop(where, self.on_message, message)

    def _on_loop(self, where: int, fn: Callable[..., None], *args: Any) -> None:
        if where == _ON_LOOP:
            fn(*args)
        elif where == _INLINE:
            self.loop.call_soon(fn, *args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)


#: Who reads the channel (`_Channel._receive`): the event loop, when it has data; a
#: blocking request on the loop's thread; one on another thread.
_ON_LOOP, _INLINE, _ELSEWHERE = 0, 1, 2
_READ_SIZE = 1 << 16
#: How often a thread waiting for its reply looks whether it came another way (the
#: activation ended, or the loop's reader answered it).
_RECHECK_S = 0.05


def _deliver(future: asyncio.Future, message: dict[str, Any]) -> None:
    if future.done():
        return
    if message["t"] == "call":
        on_call = getattr(future, "on_call", None)
        if on_call is not None:
            asyncio.ensure_future(on_call(message))
        return
    try:
        future.set_result(_reply_value(message))
    except BaseException as exc:  # noqa: BLE001 - an error reply becomes the tenant's exception
        future.set_exception(exc)


def _reply_value(message: dict[str, Any]) -> Any:
    if message["t"] == "ok":
        return message.get("value")
    if message["t"] == "end":
        raise _Over()
    raise _error(message)


def _error(message: dict[str, Any]) -> BaseException:
    name, text = message.get("name", "DynwfError"), message.get("message", "")
    if name == "StepFailedError":
        return errors.StepFailedError(
            message.get("step", ""), message.get("error_name", ""), message.get("error_message", ""),
            message.get("attempts", 0),
        )
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.DynwfError):
        return cls(text)
    return errors.DynwfError(f"{name}: {text}")


# -- what tenant code holds --------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


class _Step:
    """The `step` argument of `run(event, step)` inside a sandbox."""

    def __init__(self, channel: _Channel, activation: dict[str, Any]):
        self._channel = channel
        # "name\x00count" -> ["ok", value] | ["failed", {...}]
        self._replay: dict[str, Any] = activation.get("replay") or {}
        self._at_once = activation.get("steps_at_once") is True
        # Keys of steps the journal holds that `replay` does not answer (unfinished, or
        # past its size budget): such a step always asks.
        self._not_replayed = set(activation.get("not_replayed") or ())
        trace = activation.get("trace")
        self._trace_id = trace.split("-")[1] if isinstance(trace, str) and trace.count("-") == 3 else None
        self._counts: dict[str, int] = {}
        self.compensations = Compensations()

    def _next(self, name: Any) -> tuple[int, Any]:
        if not isinstance(name, str):
            raise errors.InvalidInputError(f"step name must be a string, got {name!r}")
        count = self._counts.get(name, 0) + 1
        self._counts[name] = count
        return count, self._replay.pop(f"{name}\x00{count}", None)

    async def do(self, name: str, fn: Callable[..., Any] | None = None, *,
                 retries: Any = None, timeout: Any = None, rollback: Any = None,
                 rollback_retries: Any = None, rollback_timeout: Any = None) -> Any:
        count, known = self._next(name)
        if known is not None:
            if known[0] != "ok":
                raise _error(known[1])
            result = known[1]
        else:
            if not callable(fn):
                raise errors.InvalidInputError(f"step {name!r}: step.do needs a callable, got {fn!r}")
            message = {
                "op": "do", "id": self._channel.new_id(), "name": name, "count": count,
                "retries": _jsonable(retries), "timeout": _jsonable(timeout),
            }
            own = self._call_at_once(message)
            result = await self._channel.request(
                message, lambda call: _run_callback(self._channel, fn, name, call),
                None if own is None else lambda: _run_callback(self._channel, fn, name, own),
            )
        if rollback is not None:
            self.compensations.register(name, count, rollback, result, {
                "retries": _jsonable(rollback_retries), "timeout": _jsonable(rollback_timeout)})
        return result

    def _call_at_once(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """The `call` of a new step this sandbox may run without asking (and marks
        `message` so): the journal holds nothing of it, no pause is pending and its
        options are valid. None: ask first (the supervisor decides)."""
        key = f"{message['name']}\x00{message['count']}"
        if not self._at_once or self._channel.ask_first or key in self._not_replayed:
            return None
        options = {k: message[k] for k in ("retries", "timeout") if message[k] is not None}
        try:
            config = StepConfig(**options) if options else DEFAULT_STEP_CONFIG
        except Exception:  # noqa: BLE001 - bad options: the supervisor names what is wrong
            return None
        # The attempt's span is the supervisor's; it learns this stand-in id and
        # files the tenant's spans made in the callback under the real one.
        span = f"{int.from_bytes(os.urandom(8), 'big') or 1:016x}"
        message["at_once"], message["span"] = True, span
        return {"id": message["id"], "count": message["count"], "attempt": 1, "config": config,
                "span": f"00-{self._trace_id}-{span}-01" if self._trace_id else None}

    async def _undo(self, name: str, count: int, fn: Callable[[], Any], options: dict) -> Any:
        """One compensation (rollback.py): answered from replay, else asked for."""
        known = self._replay.pop(f"{name}\x00{-count}", None)
        if known is not None:
            if known[0] != "ok":
                raise _error(known[1])
            return known[1]
        message = {"op": "undo", "id": self._channel.new_id(), "name": name, "count": count,
                   "retries": options["retries"], "timeout": options["timeout"]}
        return await self._channel.request(message, lambda call: _run_callback(self._channel, fn, name, call))

    async def sleep(self, name: str, duration: Any) -> None:
        count, known = self._next(name)
        if known is not None:
            return None
        await self._channel.request({
            "op": "sleep", "id": self._channel.new_id(), "name": name, "count": count,
            "seconds": _jsonable(duration),
        })

    async def sleep_until(self, name: str, when: datetime | float) -> None:
        count, known = self._next(name)
        if known is not None:
            return None
        if isinstance(when, datetime):
            when = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
        if not isinstance(when, (int, float)) or isinstance(when, bool):
            raise errors.InvalidInputError(
                f"sleep_until {name!r}: expected a datetime or timestamp, got {when!r}"
            )
        await self._channel.request({
            "op": "sleep_until", "id": self._channel.new_id(), "name": name, "count": count,
            "at": float(when),
        })

    async def wait_for_event(self, name: str, *, type: str, timeout: Any = None) -> ReceivedEvent:
        count, known = self._next(name)
        if known is None:
            message = {
                "op": "wait", "id": self._channel.new_id(), "name": name, "count": count,
                "type": type, "timeout": _jsonable(timeout),
            }
            known = ["ok", await self._channel.request(message)]
        if known[0] != "ok":
            raise _error(known[1])
        event = known[1]
        return ReceivedEvent(
            type=event["type"], payload=event["payload"],
            timestamp=datetime.fromtimestamp(event["timestamp"], tz=timezone.utc),
        )


async def _run_callback(channel: _Channel, fn: Callable[..., Any], name: str, call: dict) -> None:
    """Run one attempt of a step callback (the supervisor asked) and answer it."""
    token = _CALL.set(call["id"])
    span_token = _attach_span(call.get("span"))
    reply: dict[str, Any]
    try:
        if takes_context(fn):
            config = call["config"]
            config = config if isinstance(config, StepConfig) else StepConfig(**config)
            args: tuple = (StepContext(step=name, count=call["count"], attempt=call["attempt"], config=config),)
        else:
            args = ()
        value = fn(*args)
        if inspect.isawaitable(value):
            value = await value
        reply = {"op": "result", "id": call["id"], "value": json.loads(to_json(value, f"result of step {name!r}"))}
    except _Over:
        raise
    except MemoryError:
        reply = _raised(call["id"], "ResourceLimitError", "the sandbox ran out of memory (its memory limit)", True)
    except errors.InvalidInputError as exc:  # not JSON, too large: retrying cannot help
        reply = _raised(call["id"], type(exc).__name__, str(exc), False)
    except BaseException as exc:  # noqa: BLE001 - the tenant's exception becomes data
        reply = _raised(call["id"], type(exc).__name__, str(exc) or repr(exc),
                        not isinstance(exc, errors.NonRetryableError))
    finally:
        _detach_span(span_token)
        _CALL.reset(token)
    channel.send(reply)


def _raised(call_id: int, name: str, message: str, retryable: bool) -> dict[str, Any]:
    return {"op": "raise", "id": call_id, "name": name[:200], "message": message[:protocol.MAX_TEXT],
            "retryable": retryable}


class _Binding:
    """A platform binding: every method call is a request answered by the trusted side."""

    def __init__(self, channel: _Channel, name: str):
        self._channel = channel
        self._name = name

    def __repr__(self) -> str:
        return f"<binding {self._name}>"

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self._call(method, *args, **kwargs)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        message = {
            "op": "bind", "id": self._channel.new_id(), "binding": self._name, "method": method,
            "args": [_jsonable(a) for a in args], "kwargs": {k: _jsonable(v) for k, v in kwargs.items()},
        }
        return self._channel.request_sync(message)


class _Workflows(_Binding):
    """`env["WORKFLOWS"]`: this tenant's instances (scoped on the trusted side)."""

    def create(self, id: str | None = None, params: Any = None) -> "_Instance":
        return _Instance(self, self._call("create", id=id, params=params))

    def create_batch(self, items: list[dict[str, Any]]) -> list["_Instance"]:
        return [_Instance(self, r["id"], r["outcome"], r["error"])
                for r in self._call("create_batch", items=list(items))]

    def get(self, id: str) -> "_Instance":
        return _Instance(self, self._call("get", id=id))


class _Instance:
    def __init__(self, binding: _Workflows, instance_id: str, outcome: str = "created",
                 error: str | None = None):
        self._binding = binding
        self.id = instance_id
        self.outcome = outcome
        self.error = error

    def __repr__(self) -> str:
        return f"InstanceHandle(id={self.id!r})"

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self._binding._call(f"instance.{method}", self.id, *args, **kwargs)


# -- capture ------------------------------------------------------------------------------


class _Lines:
    """sys.stdout / sys.stderr: complete lines go to the supervisor."""

    def __init__(self, channel: _Channel, stream: str):
        self._channel = channel
        self._stream = stream
        self._partial = ""
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        text = self._partial + str(text)
        *complete, self._partial = text.split("\n")
        for line in complete:
            self._channel.add_line(self._stream, line)
        if len(self._partial) > protocol.MAX_TEXT:
            self._channel.add_line(self._stream, self._partial)
            self._partial = ""
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._channel.add_line(self._stream, self._partial)
            self._partial = ""

    def isatty(self) -> bool:
        return False


class _LogHandler(logging.Handler):
    def __init__(self, channel: _Channel):
        super().__init__(logging.INFO)
        self._channel = channel
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001
            text = str(record.msg)
        for line in text.split("\n"):
            self._channel.add_line(record.levelname if record.levelname in _LEVELS else "INFO", line)


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# -- the tenant's own spans ------------------------------------------------------------

_otel: Any = None  # (context, trace, SpanContext, NonRecordingSpan, TraceFlags) once available


def _install_tracing(channel: _Channel) -> None:
    global _otel
    try:
        from opentelemetry import context, trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SpanProcessor
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    except ImportError:
        return

    class _ToSupervisor(SpanProcessor):
        def on_end(self, span: Any) -> None:
            ctx, parent = span.context, span.parent
            channel.spans.append({
                "name": str(span.name)[:256], "trace_id": f"{ctx.trace_id:032x}",
                "span_id": f"{ctx.span_id:016x}",
                "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
                "start": span.start_time, "end": span.end_time,
                "attributes": {str(k): v for k, v in (span.attributes or {}).items()
                               if isinstance(v, (str, int, float, bool))},
                "error": span.status.description if span.status.status_code.name == "ERROR" else None,
                "kind": span.kind.name,
            })

    provider = TracerProvider()
    provider.add_span_processor(_ToSupervisor())
    trace.set_tracer_provider(provider)
    _otel = (context, trace, SpanContext, NonRecordingSpan, TraceFlags)


def _attach_span(traceparent: Any) -> Any:
    if _otel is None or not isinstance(traceparent, str):
        return None
    context, trace, SpanContext, NonRecordingSpan, TraceFlags = _otel
    try:
        _, trace_id, span_id, flags = traceparent.split("-")
        ctx = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                          trace_flags=TraceFlags(int(flags, 16)))
    except ValueError:
        return None
    return context.attach(trace.set_span_in_context(NonRecordingSpan(ctx)))


def _detach_span(token: Any) -> None:
    if token is not None:
        _otel[0].detach(token)


# -- the activation loop ------------------------------------------------------------------


def resolve_entrypoint(entrypoint: str) -> tuple[str, type[WorkflowEntrypoint]]:
    """Import a tenant entrypoint ("module" or "module:Class") and resolve it to
    ("module:Class", the class). Raises InvalidInputError naming what is wrong."""
    import importlib

    module_name, _, class_name = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # noqa: BLE001 - any import failure is the tenant's
        raise errors.InvalidInputError(
            f"module {module_name!r} does not import: {type(exc).__name__}: {exc}"
        ) from None
    if class_name:
        cls = getattr(module, class_name, None)
        if cls is None:
            raise errors.InvalidInputError(f"module {module_name!r} has no attribute {class_name!r}")
        check_class(cls, entrypoint)
        return entrypoint, cls
    found = [
        obj for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, WorkflowEntrypoint)
        and obj is not WorkflowEntrypoint and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        names = ", ".join(c.__name__ for c in found) or "none"
        raise errors.InvalidInputError(
            f"module {module_name!r} must define exactly one WorkflowEntrypoint subclass "
            f"(found {names}); name one with entrypoint = \"{module_name}:Class\" in dynwf.toml"
        )
    check_class(found[0], f"{module_name}:{found[0].__name__}")
    return f"{module_name}:{found[0].__name__}", found[0]


def check_class(cls: Any, where: str) -> None:
    if not (inspect.isclass(cls) and issubclass(cls, WorkflowEntrypoint)):
        raise errors.InvalidInputError(f"{where} is not a subclass of WorkflowEntrypoint")
    if cls.run is WorkflowEntrypoint.run:
        raise errors.InvalidInputError(f"{where} does not implement run(event, step)")


def _load_class(boot: dict[str, Any]) -> type[WorkflowEntrypoint]:
    if boot.get("pickled_class") is not None:
        import base64
        import pickle

        cls = pickle.loads(base64.b64decode(boot["pickled_class"]))
        check_class(cls, repr(cls))
        return cls
    return resolve_entrypoint(boot["entrypoint"])[1]


class _Runtime:
    def __init__(self, sock: socket.socket, boot: dict[str, Any]):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.channel = _Channel(sock, self.loop)
        self.channel.on_message = self._on_message
        self.boot = boot
        self.cls: type[WorkflowEntrypoint] | None = None
        self.task: asyncio.Task | None = None
        self.ended = False

    def start(self) -> None:
        sys.stdout = _Lines(self.channel, "stdout")  # type: ignore[assignment]
        sys.stderr = _Lines(self.channel, "stderr")  # type: ignore[assignment]
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(_LogHandler(self.channel))
        root.setLevel(logging.INFO)
        _install_tracing(self.channel)
        if self.boot.get("egress_port"):
            from .egress import start_forwarder
            start_forwarder(self.boot["_extra"][0], int(self.boot["egress_port"]))
        try:
            self.cls = _load_class(self.boot)
        except BaseException as exc:  # noqa: BLE001 - the tenant's code does not import
            self.channel.send({"op": "boot_error", "name": type(exc).__name__,
                               "message": (str(exc) or repr(exc))[: protocol.MAX_TEXT]})
            return
        self.channel.start_reading()
        self.channel.send({"op": "ready"})
        self.loop.run_forever()

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "activate":
            self.ended = False
            self.task = self.loop.create_task(self._activation(message))
        elif kind == "end":
            self.ended = True
            self.channel.fail_pending()
            if self.task is None or self.task.done():
                self.channel.send({"op": "idle", "unused": self._unused()})

    async def _activation(self, message: dict[str, Any]) -> None:
        event = WorkflowEvent(
            payload=message["event"]["payload"],
            timestamp=datetime.fromtimestamp(message["event"]["timestamp"], tz=timezone.utc),
            instance_id=message["event"]["instance_id"],
            metadata=message.get("metadata") or {},
        )
        env: dict[str, Any] = dict(message.get("env") or {})
        for name in message.get("bindings") or ():
            env[name] = _Workflows(self.channel, name) if name == "WORKFLOWS" else _Binding(self.channel, name)
        self.channel.ask_first = False
        step = self.step = _Step(self.channel, message)
        token = _attach_span(message.get("trace"))
        reply: dict[str, Any] | None
        try:
            output = await run_with_rollback(
                lambda: self.cls(env).run(event, step), step.compensations, step._undo
            )
            try:
                reply = {"op": "return", "value": json.loads(to_json(output, "output of run()"))}
            except errors.InvalidInputError as exc:
                reply = {"op": "fail", "name": type(exc).__name__, "message": str(exc)}
        except _Over:
            reply = None
        except errors.StepFailedError as exc:
            reply = {"op": "fail", "name": exc.error_name[:200], "message": str(exc)[: protocol.MAX_TEXT]}
        except BaseException as exc:  # noqa: BLE001 - run() raised: the instance's error
            reply = {"op": "fail", "name": type(exc).__name__[:200],
                     "message": (str(exc) or repr(exc))[: protocol.MAX_TEXT]}
        finally:
            _detach_span(token)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - tenant code may have replaced them
                    pass
            current = asyncio.current_task()
            for task in asyncio.all_tasks(self.loop):
                if task is not current:
                    task.cancel()  # what the tenant left running dies with the activation
        if self.ended or reply is None:
            if self.ended:
                self.channel.send({"op": "idle", "unused": self._unused()})
        else:
            self.channel.send({**reply, "unused": self._unused()})

    def _unused(self) -> list[str]:
        """The replayed steps this activation never asked for (a determinism warning)."""
        step = getattr(self, "step", None)
        return list(step._replay)[:1000] if step is not None else []


def validate(sock: socket.socket, boot: dict[str, Any], extra: list[socket.socket] | None = None) -> int:
    """The sandbox's main function when a push is validated: import the tenant's
    entrypoint, answer once with what it resolved to (or why it failed), exit."""
    sys.stdout = sys.stderr = _Discard()  # type: ignore[assignment]
    try:
        entrypoint, _ = resolve_entrypoint(boot["entrypoint"])
        reply = {"op": "ready", "entrypoint": entrypoint}
    except BaseException as exc:  # noqa: BLE001 - what the platform is told
        reply = {"op": "boot_error", "name": type(exc).__name__,
                 "message": (str(exc) or repr(exc))[: protocol.MAX_TEXT]}
    protocol.send(sock, reply)
    return 0


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def serve(sock: socket.socket, boot: dict[str, Any], extra: list[socket.socket] | None = None) -> int:
    """The sandbox's main function (called by the template in the jailed child)."""
    boot = {**boot, "_extra": list(extra or [])}
    _Runtime(sock, boot).start()
    return 0
