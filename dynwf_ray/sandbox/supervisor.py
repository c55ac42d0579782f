"""The trusted side of a sandbox: runs activations in it and answers every message.

A `SandboxSession` owns one live sandbox process of one (tenant, code version)
and is the `Runner` (see `activation.py`) of the activations it hosts, one at
a time. It treats the sandbox as hostile:

- every message is size-checked before it is read and shape-checked before
  it is used (`protocol.check`); request ids must be new, answers must match
  a `call` that is outstanding, nothing may arrive between activations. A
  message that breaks these rules ends the sandbox and errors the instance
  with `SandboxProtocolError` naming the violation;
- the journal is written only here, through the activation's `Step`, so a
  sandbox can neither record a step nor make one look recorded; errors of the
  platform (a failed commit, a lost lease) end the activation on this side
  and never reach tenant code;
- limits are enforced from outside: CPU seconds per step attempt (and per
  stretch of `run()` between steps), wall time of `run()` between steps, log
  volume per activation, and the jail's own (memory, processes, files). Going
  over one kills the sandbox; the step attempt in flight fails with
  `ResourceLimitError` naming the limit (its retry policy decides what
  follows), or, outside a step, the instance errors with it;
- a sandbox that dies for another reason (killed, crashed) abandons the
  activation: the instance is released and activated again.

Bindings the platform gives the tenant (`env`) live here: a `bind` request
names one and a public method of it, with JSON arguments; the answer is JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import (
    DynwfError, JournalUnavailableError, NonRetryableError, ResourceLimitError, StepFailedError,
)
from ..journal import STEP_COMPLETE, STEP_FAILED, ActivationState, LeaseLostError
from ..step import Abandon, JournalFault, PauseAtBoundary, Step, Suspend
from ..tracing import InstanceTrace, current_ids, traceparent
from ..types import WorkflowEvent, to_json
from . import protocol
from .policy import SandboxLimits

log = logging.getLogger("dynwf_ray.sandbox")

#: Seconds a new sandbox gets to import the tenant's code and say it is ready.
BOOT_TIMEOUT = 60.0
#: Seconds a sandbox gets to wind an activation down after `end`.
END_GRACE = 2.0
#: Longest `run()` may go between two steps without asking for anything (wall clock).
RUN_SEGMENT_TIMEOUT = 600.0
#: Recorded results sent ahead with `activate` so replay needs no round trips.
REPLAY_BUDGET_CHARS = 4 * 1024 * 1024
#: What each captured line counts against the log limit beyond its characters.
LOG_LINE_OVERHEAD = 64
#: Most keys of steps `activate` lists as held but not replayed; beyond, no step runs at once.
MAX_NOT_REPLAYED = 10_000
#: How often CPU time and deadlines are checked while the sandbox runs.
_WATCH_EVERY = 0.1


class TenantError(Exception):
    """An exception of tenant code, received as data (its name and message)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.tenant_error_name = name


class TenantNonRetryableError(NonRetryableError):
    """A `NonRetryableError` (or a result that can never be stored) from a sandbox."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.tenant_error_name = name


class _Lost(BaseException):
    """Internal: the sandbox is gone (killed by us for a limit, or it died)."""

    def __init__(self, reason: str, limit: bool):
        super().__init__(reason)
        self.reason = reason
        self.limit = limit


@dataclass
class _Activation:
    step: Step
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    requests: dict[int, asyncio.Task] = field(default_factory=dict)
    calls: dict[int, asyncio.Future] = field(default_factory=dict)  # request id -> answer
    call_steps: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    call_ids: dict[int, tuple[str, str] | None] = field(default_factory=dict)  # its span
    ids: tuple[str, str] | None = None  # the activation span's (trace id, span id)
    last_id: int = 0
    log_chars: int = 0
    cpu_mark: float = 0.0
    cpu_stale: bool = True  # the sandbox did something: take a new CPU baseline
    wall_mark: float = 0.0
    replayed: dict[str, Any] = field(default_factory=dict)  # what the sandbox may answer itself
    # Steps the sandbox ran at once (`do` with `at_once`): until the step takes such a
    # call, no further message is read (`claiming`: its id, and a future the step's
    # taking or refusing it resolves), so its lines and spans find their step.
    claiming: tuple[int, asyncio.Future] | None = None
    stand_ins: dict[int, str] = field(default_factory=dict)  # request id -> stand-in span id
    span_ids: dict[str, str] = field(default_factory=dict)  # stand-in span id -> the attempt's
    dropped: set[int] = field(default_factory=set)  # calls run at once that no step took


class _Frames(asyncio.Protocol):
    """Internal: cuts what the sandbox sends into messages as it arrives and hands each
    to its session (`_received`), with no task of its own; then why reading ended: the
    sandbox closed its channel (`_Lost`), or broke the framing (a ProtocolError)."""

    def __init__(self, session: "SandboxSession"):
        self._session = session
        self._buffer = bytearray()  # the start of a frame not yet whole
        self.done = False  # nothing more is handed on

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self._buffer += data
        try:
            for body in protocol.cut_frames(self._buffer, protocol.MAX_SANDBOX_FRAME):
                self._hand(protocol.decode(body))
                if self.done:
                    return
        except protocol.ProtocolError as exc:
            self._hand(exc)

    def eof_received(self) -> None:
        self.connection_lost(None)  # and the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self._hand(_Lost(self._session._death_reason(), limit=False))

    def _hand(self, item: dict[str, Any] | BaseException) -> None:
        if not self._session._received(item) or isinstance(item, BaseException):
            self.done = True


class SandboxSession:
    """One live sandbox and the activations it runs (one at a time)."""

    def __init__(
        self,
        sandbox: Any,
        *,
        tenant_id: str,
        limits: SandboxLimits,
        bindings: Mapping[str, Any] | None = None,
        values: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        tracing: Any = None,
    ):
        self.sandbox = sandbox
        self.tenant_id = tenant_id
        self.limits = limits
        self.bindings = dict(bindings or {})
        self.values = {**(values or {}), **(secrets or {})}
        self._secrets = [v for v in (secrets or {}).values() if v]
        self._tracing = tracing
        self.healthy = True
        self.activations = 0
        self._transport: asyncio.Transport | None = None
        self._frames: _Frames | None = None
        self._boot: asyncio.Queue | None = None  # what arrives before `ready`
        self._current: _Activation | None = None
        self._closed_reason: str | None = None

    # -- life ----------------------------------------------------------------

    async def start(self) -> None:
        """Wait until the sandbox imported the tenant's code. Raises TenantError if it
        did not (the message names the cause)."""
        await self._connect()
        try:
            message = await asyncio.wait_for(self._boot_reply(), BOOT_TIMEOUT)
        except (asyncio.TimeoutError, _Lost, protocol.ProtocolError) as exc:
            self.close()
            reason = exc.reason if isinstance(exc, _Lost) else str(exc) or "no answer"
            raise TenantError(
                "SandboxStartError", f"tenant {self.tenant_id!r}: its sandbox did not start: {reason}"
            ) from None
        if message.get("op") == "boot_error":
            self.close()
            raise TenantError(
                "CodeImportError",
                f"tenant {self.tenant_id!r}: its code does not import: "
                f"{str(message.get('name'))[:200]}: {str(message.get('message'))[:2000]}",
            )
        if message.get("op") != "ready":
            self.close()
            raise TenantError("SandboxProtocolError", f"expected 'ready', got {message.get('op')!r}")
        early, self._boot = self._boot, None
        if not early.empty():
            self.close("a message arrived while no activation ran")

    async def _connect(self) -> None:
        self._boot = asyncio.Queue()
        self._frames = _Frames(self)
        self._transport, _ = await asyncio.get_running_loop().create_unix_connection(
            lambda: self._frames, sock=self.sandbox.sock
        )

    async def _boot_reply(self) -> dict[str, Any]:
        """The sandbox's `ready` or `boot_error`; what the tenant's code printed while it
        was imported belongs to no activation and is dropped (at most 1,000 messages)."""
        assert self._boot is not None
        for _ in range(1000):
            message = await self._boot.get()
            if isinstance(message, BaseException):
                raise message
            if message.get("op") not in ("log", "spans"):
                return message
        raise protocol.ProtocolError("too many messages before 'ready'")

    def close(self, reason: str = "closed") -> None:
        """End the sandbox (idempotent)."""
        self.healthy = False
        if self._closed_reason is None:
            self._closed_reason = reason
        try:
            self.sandbox.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self._frames is not None:
            self._frames.done = True
        if self._transport is not None:
            self._transport.close()

    def _received(self, item: dict[str, Any] | BaseException) -> bool:
        """A message from the sandbox, or why no more can be read (`_Lost`, or a
        ProtocolError). Returns whether to read on."""
        if self._boot is not None:
            self._boot.put_nowait(item)
            return True
        current = self._current
        if current is None:
            self.close("a message arrived while no activation ran")
            return False
        current.queue.put_nowait(("message", item))
        return not isinstance(item, BaseException)

    def _death_reason(self) -> str:
        try:
            self.sandbox.wait(0.5)
            reason = self.sandbox.exit_reason()
        except Exception:  # noqa: BLE001
            reason = None
        return reason or "the sandbox process ended"

    def _send(self, message: dict[str, Any]) -> None:
        """Send a message. While nothing is queued, the frame goes to the socket at once
        with `socket.send`, which lets go of the GIL during the system call (the event
        loop's transport may hold it while the kernel wakes the sandbox); what does not
        fit is queued on the transport behind it, so the order holds."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        frame = protocol.encode(message)
        if not transport.get_write_buffer_size():
            try:
                frame = frame[self.sandbox.sock.send(frame, socket.MSG_NOSIGNAL):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # the sandbox is gone: the reader finds out and says why
                return
        if frame:
            transport.write(frame)

    # -- one activation --------------------------------------------------------

    async def run(
        self, state: ActivationState, event: WorkflowEvent, step: Step, trace: InstanceTrace | None
    ) -> Any:
        if not self.healthy:
            raise Abandon(self._closed_reason or "the sandbox is gone")
        act = _Activation(step)
        act.replayed = _replay(state)
        not_replayed = [k for k in (f"{r.name}\x00{r.seq}" for r in state.steps) if k not in act.replayed]
        at_once = step.new_steps_at_once and len(not_replayed) <= MAX_NOT_REPLAYED
        if trace is not None:
            ctx = trace.activation.context
            act.ids = (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
        act.wall_mark = time.monotonic()
        self._current = act
        self.activations += 1
        ticker = asyncio.ensure_future(_tick(act.queue))
        try:
            self._send({
                "t": "activate",
                "event": {"payload": event.payload, "timestamp": event.timestamp.timestamp(),
                          "instance_id": event.instance_id},
                "metadata": event.metadata,
                "env": self.values,
                "bindings": sorted(self.bindings),
                "replay": act.replayed,
                "steps_at_once": at_once,
                "not_replayed": not_replayed if at_once else [],
                "trace": _traceparent_of(trace.activation.context) if trace is not None else None,
            })
            return await self._serve(act)
        finally:
            ticker.cancel()
            self._current = None
            for task in act.requests.values():
                task.cancel()

    async def _serve(self, act: _Activation) -> Any:
        while True:
            kind, item = await act.queue.get()
            if kind == "tick":
                self._watch(act)
                continue
            if kind == "ended":  # a request ended the activation (suspend, pause, lease...)
                await self._wind_down(act)
                raise item
            if isinstance(item, _Lost):
                if self._closed_reason is None:  # it died on its own (we did not end it)
                    self._lost(act, item)  # raises unless steps in flight end the activation
                continue
            if isinstance(item, protocol.ProtocolError):
                self._violation(str(item))
            try:
                done = self._dispatch(act, protocol.check(item), item)
            except protocol.ProtocolError as exc:
                self._violation(str(exc))
            if done is not None:
                return done()
            if act.claiming is not None:
                await act.claiming[1]
                act.claiming = None

    def _dispatch(self, act: _Activation, op: str, message: dict[str, Any]) -> Any:
        """Act on one message; returns a thunk that ends the activation, or None."""
        if protocol.is_request(op):
            rid = message["id"]
            if rid <= act.last_id:
                raise protocol.ProtocolError(f"request id {rid} was used before")
            act.last_id = rid
            if op == "bind":  # not a step boundary: the CPU of the attempt goes on counting
                act.wall_mark = time.monotonic()
            else:
                _active(act)
            if op == "do" and message.get("at_once") is True:
                self._ran_at_once(act, message)
            act.requests[rid] = asyncio.ensure_future(self._request(act, op, message))
        elif op in ("result", "raise"):
            future = act.calls.pop(message["id"], None)
            if future is None and message["id"] in act.dropped:
                act.dropped.discard(message["id"])  # run at once, but the step did not go on
                _active(act)
                return None
            if future is None:
                raise protocol.ProtocolError(f"an answer to call {message['id']}, which is not running")
            _active(act)
            if not future.done():
                future.set_result(message)
        elif op == "log":
            self._log(act, message["lines"])
        elif op == "spans":
            self._spans(act, message["spans"])
        elif op in ("return", "fail"):
            self._replayed_locally(act, message)
            if act.calls:
                raise protocol.ProtocolError(f"run() ended while step call {next(iter(act.calls))} ran")
            if op == "fail":
                name, text = message["name"][:200], message["message"]
                return lambda: _raise(TenantError(name, self._redact(text)))
            value = message.get("value")
            return lambda: value
        elif op == "idle":
            raise protocol.ProtocolError("'idle' while the activation was running")
        else:
            raise protocol.ProtocolError(f"unexpected {op!r} during an activation")
        return None

    def _ran_at_once(self, act: _Activation, message: dict[str, Any]) -> None:
        """A new step whose callback the sandbox runs without waiting for `call`: its
        answer is taken as that of a call made now. Whether it is recorded is still the
        step's decision (`_request` runs it as for any `do`)."""
        loop = asyncio.get_running_loop()
        act.calls[message["id"]] = loop.create_future()
        span = message.get("span")
        if isinstance(span, str) and len(span) == 16 and all(c in "0123456789abcdef" for c in span):
            act.stand_ins[message["id"]] = span
            if act.ids is not None:
                act.span_ids[span] = act.ids[1]  # until the step's attempt span exists
        act.claiming = (message["id"], loop.create_future())

    async def _request(self, act: _Activation, op: str, message: dict[str, Any]) -> None:
        rid = message["id"]
        try:
            value = await self._answer(act, op, message)
        except (Suspend, PauseAtBoundary, LeaseLostError, Abandon, _Lost) as exc:
            act.queue.put_nowait(("ended", exc))
            return
        except JournalUnavailableError as exc:  # a binding's journal call: never the tenant's
            act.queue.put_nowait(("ended", JournalFault(exc)))
            return
        except StepFailedError as exc:
            if not self.healthy:  # the sandbox died in the attempt: replay from the journal
                act.queue.put_nowait(("ended", Suspend(act.step.now())))
                return
            self._send({"t": "err", "id": rid, "name": "StepFailedError", "step": exc.step,
                        "error_name": exc.error_name, "error_message": self._redact(exc.message),
                        "attempts": exc.attempts, "message": self._redact(str(exc))})
        except DynwfError as exc:  # bad input, a wait that timed out...: the tenant's to handle
            if not self.healthy:
                act.queue.put_nowait(("ended", Suspend(act.step.now())))
                return
            self._send({"t": "err", "id": rid, "name": type(exc).__name__,
                        "message": self._redact(str(exc))})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a fault of the platform: never the tenant's
            act.queue.put_nowait(("ended", exc))
            return
        else:
            if not self.healthy:
                act.queue.put_nowait(("ended", Suspend(act.step.now())))
                return
            reply = {"t": "ok", "id": rid, "value": value}
            if not act.step.new_steps_at_once:  # a pause was asked for meanwhile
                reply["ask_first"] = True  # the sandbox runs no further step at once
            self._send(reply)
        finally:
            act.requests.pop(rid, None)
            unclaimed = act.calls.pop(rid, None)
            if unclaimed is not None:  # run at once, but the step refused (a pause, bad options)
                act.dropped.add(rid)
                if unclaimed.done() and not unclaimed.cancelled():
                    unclaimed.exception()  # retrieved: nothing awaits it
            _claimed(act, rid)

    async def _answer(self, act: _Activation, op: str, m: dict[str, Any]) -> Any:
        step, name, count = act.step, m.get("name"), m.get("count")
        if op in ("do", "undo"):
            rid = m["id"]

            async def in_sandbox(ctx: Any) -> Any:  # a plain function: cheap for Step to inspect
                return await self._remote(act, rid, ctx)

            if op == "undo":  # recorded at (name, -count), kind "rollback" (rollback.py)
                return await step.do(name, in_sandbox, retries=m.get("retries"),
                                     timeout=m.get("timeout"), count=-count, kind="rollback")
            return await step.do(
                name, in_sandbox, retries=m.get("retries"), timeout=m.get("timeout"), count=count,
            )
        if op == "sleep":
            return await step.sleep(name, m.get("seconds"), count=count)
        if op == "sleep_until":
            return await step.sleep_until(name, m["at"], count=count)
        if op == "wait":
            event = await step.wait_for_event(name, type=m["type"], timeout=m.get("timeout"), count=count)
            return {"type": event.type, "payload": event.payload, "timestamp": event.timestamp.timestamp()}
        # On a thread: a platform binding may be slow (an HTTP call); the host's loop
        # must keep answering its sandbox (and the CPU watch) meanwhile.
        return await asyncio.to_thread(self._bind, m["binding"], m["method"], m["args"], m["kwargs"])

    def _bind(self, binding: str, method: str, args: list, kwargs: dict) -> Any:
        target = self.bindings.get(binding)
        if target is None:
            raise DynwfError(f"no binding named {binding!r}")
        call = getattr(target, "sandbox_call", None)
        if call is not None:  # a binding that routes its own methods (WORKFLOWS)
            return call(method, args, kwargs)
        if method.startswith("_") or method not in _public_methods(type(target)):
            raise DynwfError(f"binding {binding!r} has no method {method!r}")
        try:
            result = getattr(target, method)(*args, **kwargs)
        except DynwfError:
            raise
        except Exception as exc:  # noqa: BLE001 - the tenant's call failed: it gets the name only
            raise DynwfError(
                f"binding {binding!r}: {method}() raised {type(exc).__name__}: {exc}"
            ) from None
        return json.loads(to_json(result, f"result of {binding}.{method}()"))

    # -- step callbacks ---------------------------------------------------------

    def _call(self, act: _Activation, rid: int, ctx: Any) -> asyncio.Future:
        """The future of the answer to step attempt `ctx` of request `rid`: asked for
        with `call`, unless the sandbox runs it already (`_ran_at_once`)."""
        act.call_steps[rid] = (ctx.step, ctx.count, ctx.attempt)
        ids = act.call_ids[rid] = current_ids()
        _active(act)
        future = act.calls.get(rid)
        if future is not None:
            stand_in = act.stand_ins.pop(rid, None)
            if stand_in is not None and ids is not None:
                act.span_ids[stand_in] = ids[1]
            _claimed(act, rid)
            return future
        if not self.healthy:  # ended before its callback was asked for: nothing to wait for
            raise Abandon(self._closed_reason or "the sandbox is gone")
        future = act.calls[rid] = asyncio.get_running_loop().create_future()
        self._send({"t": "call", "id": rid, "count": ctx.count, "attempt": ctx.attempt,
                    "config": ctx.config.model_dump(mode="json"),
                    "span": f"00-{ids[0]}-{ids[1]}-01" if ids else None})
        return future

    async def _remote(self, act: _Activation, rid: int, ctx: Any) -> Any:
        """One attempt of a sandboxed step (what `Step.do` calls): the callback runs in
        the sandbox; its answer, or the sandbox's end, becomes this call's outcome."""
        future = self._call(act, rid, ctx)
        try:
            answer = await future
        except _Lost as lost:
            if lost.limit:
                raise ResourceLimitError(f"step {ctx.step!r}: the sandbox went over its {lost.reason}") from None
            raise Abandon(lost.reason) from None
        except asyncio.CancelledError:  # the step's timeout: the callback is still running there
            self.close(f"step {ctx.step!r} went over its timeout")
            raise
        finally:
            act.calls.pop(rid, None)
        if answer["op"] == "result":
            return answer.get("value")
        name, text = answer["name"][:200], self._redact(answer["message"])
        if name == "ResourceLimitError":  # reported by the sandbox itself (MemoryError)
            raise ResourceLimitError(f"step {ctx.step!r}: {text}; the limit is {self.limits.memory_mb} MiB")
        if not answer["retryable"]:
            raise TenantNonRetryableError(name, text)
        raise TenantError(name, text)

    # -- limits and endings -------------------------------------------------------

    def _cpu(self) -> float:
        try:
            return self.sandbox.cpu_seconds()
        except Exception:  # noqa: BLE001 - gone: the reader finds out
            return 0.0

    def _watch(self, act: _Activation) -> None:
        """Every tick: CPU used since the sandbox last did something (a baseline is
        taken at the first tick after it), and how long run() went without a step."""
        cpu = self._cpu()
        if act.cpu_stale:
            act.cpu_mark, act.cpu_stale = cpu, False
        elif cpu - act.cpu_mark > self.limits.cpu_seconds:
            self._over(act, f"CPU time limit of {self.limits.cpu_seconds:g} s per step attempt")
        if not act.calls and not act.requests and time.monotonic() - act.wall_mark > RUN_SEGMENT_TIMEOUT:
            self._over(act, f"run() went {RUN_SEGMENT_TIMEOUT:g} s without a step")

    def _over(self, act: _Activation, limit: str) -> None:
        """A limit was hit: end the sandbox; fail the attempt in flight, or the instance."""
        self.close(limit)
        self._lost(act, _Lost(limit, limit=True))

    def _lost(self, act: _Activation, lost: _Lost) -> None:
        self.healthy = False
        if act.calls:  # an attempt was running: it fails (or, if we can't tell why, is abandoned)
            for future in act.calls.values():
                if not future.done():
                    future.set_exception(lost)
            act.calls.clear()
            return
        if act.requests:  # requests are in flight: they end the activation when they finish
            return
        if lost.limit:
            raise TenantError("ResourceLimitError", f"the sandbox went over its {lost.reason}")
        raise Abandon(lost.reason)

    def _violation(self, what: str) -> None:
        self.close(f"protocol violation: {what}")
        raise TenantError("SandboxProtocolError", f"the sandbox broke its channel protocol: {what}")

    async def _wind_down(self, act: _Activation) -> None:
        """Tell the sandbox the activation is over and wait for it to settle."""
        for task in list(act.requests.values()):
            task.cancel()
        if not self.healthy:
            return
        self._send({"t": "end"})
        deadline = time.monotonic() + END_GRACE
        while (left := deadline - time.monotonic()) > 0:
            try:
                kind, item = await asyncio.wait_for(act.queue.get(), left)
            except asyncio.TimeoutError:
                break
            if kind == "message" and isinstance(item, dict) and item.get("op") == "idle":
                self._replayed_locally(act, item)
                return
            if kind == "message" and isinstance(item, dict) and item.get("op") == "log":
                continue  # the last lines of an ending activation are not kept
            if isinstance(item, BaseException):
                break
        self.close("it did not settle after its activation ended")

    # -- output ---------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[secret]")
        return text

    @staticmethod
    def _replayed_locally(act: _Activation, message: dict) -> None:
        """Tell the step which replayed steps the sandbox answered itself: those sent
        but not reported unused (the sandbox says, at the end of the activation)."""
        unused = message.get("unused")
        unused = {k for k in unused[:10_000] if isinstance(k, str)} if isinstance(unused, list) else set()
        keys = []
        for key in act.replayed.keys() - unused:
            name, _, count = key.rpartition("\x00")
            keys.append((name, int(count)))
        act.step.replayed_locally(keys)

    def _log(self, act: _Activation, lines: list) -> None:
        log_ = act.step._log
        for stream, text, call in lines:
            act.log_chars += len(text) + LOG_LINE_OVERHEAD  # an empty line is not free either
            if act.log_chars > self.limits.log_kib * 1024:
                self._over(act, f"log volume limit of {self.limits.log_kib} KiB per activation")
                return
            if log_ is not None:
                log_.add(
                    stream, self._redact(text), step=act.call_steps.get(call) if call else None,
                    ids=act.call_ids.get(call) if call else act.ids,
                )

    def _spans(self, act: _Activation, spans: list) -> None:
        if self._tracing is None:
            return
        for span in spans[:1000]:
            # Spans count against the log volume limit: they are queued for export in the
            # host process, which hosts of other tenants share.
            act.log_chars += len(json.dumps(span, separators=(",", ":"), default=str))
            if act.log_chars > self.limits.log_kib * 1024:
                self._over(act, f"log volume limit of {self.limits.log_kib} KiB per activation "
                                "(log lines and spans)")
                return
            try:
                parent = act.span_ids.get(span.get("parent_id"))
                if parent is not None:  # made in a callback run at once: under its attempt
                    span = {**span, "parent_id": parent}
                self._tracing.emit_tenant_span(span, self._redact)
            except Exception:  # noqa: BLE001 - a malformed span is dropped, nothing more
                log.debug("dropped a malformed span from tenant %s", self.tenant_id)


def _claimed(act: _Activation, rid: int) -> None:
    """Request `rid`'s step took (or refused) the call run at once: read on."""
    if act.claiming is not None and act.claiming[0] == rid and not act.claiming[1].done():
        act.claiming[1].set_result(None)


def _active(act: _Activation) -> None:
    """The sandbox did something: run()'s clock and the CPU baseline start again."""
    act.wall_mark = time.monotonic()
    act.cpu_stale = True


async def _tick(queue: asyncio.Queue) -> None:
    """Wakes the activation's loop to check limits (cheaper than a timeout per message)."""
    while True:
        await asyncio.sleep(_WATCH_EVERY)
        queue.put_nowait(("tick", None))


def _raise(exc: BaseException) -> Any:
    raise exc


def _public_methods(cls: type) -> set[str]:
    return {
        n for klass in cls.__mro__ if klass is not object
        for n, v in vars(klass).items() if not n.startswith("_") and callable(v)
    }


def _traceparent_of(ctx: Any) -> str:
    return traceparent(ctx.trace_id, ctx.span_id, int(ctx.trace_flags))


def _replay(state: ActivationState) -> dict[str, Any]:
    """Finished steps the sandbox may answer itself: "name\\x00count" -> outcome."""
    out: dict[str, Any] = {}
    budget = REPLAY_BUDGET_CHARS
    for r in state.steps:
        key = f"{r.name}\x00{r.seq}"
        if r.kind in ("do", "rollback") and r.status == STEP_COMPLETE:
            budget -= len(r.result_json or "")
            if budget < 0:
                break
            out[key] = ["ok", json.loads(r.result_json) if r.result_json else None]
        elif r.kind in ("do", "rollback") and r.status == STEP_FAILED:
            error = StepFailedError(r.name, r.error_name or "", r.error_message or "", r.attempts)
            out[key] = ["failed", {
                "t": "err", "name": "StepFailedError", "step": r.name, "error_name": r.error_name,
                "error_message": r.error_message, "attempts": r.attempts, "message": str(error),
            }]
        elif r.kind == "sleep" and r.finished_at is not None:
            out[key] = ["ok", None]
        elif r.kind == "wait" and r.status == STEP_COMPLETE:
            out[key] = ["ok", json.loads(r.result_json)]
        elif r.kind == "wait" and r.status == STEP_FAILED:
            out[key] = ["failed", {"t": "err", "name": "WorkflowTimeoutError",
                                   "message": r.error_message or ""}]
    return out
