"""Instance logs: what tenant code prints or logs during an activation, kept per step.

Tenant code in a sandbox prints there: the sandbox's runtime sends the lines as
`log` messages, and its supervisor adds them to the activation's `ActivationLog`.
Where tenant code runs in this process (the test harness, `testing.py`),
`LogCapture` is installed once: it wraps `sys.stdout` and `sys.stderr` (what is
written still reaches them) and adds a handler to the root logger. While an
activation runs, everything written from its task is also
collected as `LogLine`s that say which step, count and attempt printed it and
carry the current trace and span ids. The step path hands the collected lines
to the journal in the same commit as the step they belong to (nothing extra to
commit when a step printed nothing); lines printed by `run()` after its last
step are stored when the activation ends. The journal keeps the newest
`log_lines_per_instance` lines of each instance, each cut to `MAX_LINE_CHARS`.

The platform adds its own lines under the stream `PLATFORM_STREAM` ("dynwf"),
such as a determinism warning (`Step.determinism_warning`).

Only the activation's own task is captured (a context variable marks it):
threads the tenant starts itself, and the engine's and Ray's loggers, are not.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any, Callable, TextIO

from . import tracing
from .types import LogLine

#: A longer line is cut to this many characters (and marked so).
MAX_LINE_CHARS = 4096
#: The stream of lines the platform adds to an instance's log (a determinism warning).
PLATFORM_STREAM = "dynwf"
#: Lines an activation holds before it drops the oldest (the journal keeps fewer anyway).
MAX_PENDING = 10_000

_CURRENT: contextvars.ContextVar["ActivationLog | None"] = contextvars.ContextVar(
    "dynwf_activation_log", default=None
)
_IGNORED_LOGGERS = ("ray", "dynwf_ray")


class ActivationLog:
    """The lines one activation produced that are not stored yet."""

    def __init__(self, clock: Callable[[], float] = time.time, trace_id: str | None = None):
        self._clock = clock
        self._trace_id = trace_id  # the instance's, for lines printed with no current span
        self._lines: list[LogLine] = []
        self._partial: dict[str, str] = {}
        self.step: tuple[str, int, int] | None = None  # (name, count, attempt) running now

    def write(self, stream: str, text: str) -> None:
        text = self._partial.pop(stream, "") + text
        *complete, rest = text.split("\n")
        for line in complete:
            self.add(stream, line)
        if rest:
            self._partial[stream] = rest

    def add(self, stream: str, message: str, step: Any = ..., ids: Any = ...) -> None:
        """One line; `step` ((name, count, attempt) or None) and `ids` ((trace id, span
        id) or None) default to the step and span current now (a sandbox's lines say
        which step printed them)."""
        if len(message) > MAX_LINE_CHARS:
            message = message[:MAX_LINE_CHARS] + f" [cut: {len(message)} characters]"
        ids = tracing.current_ids() if ids is ... else ids
        step = self.step if step is ... else step
        self._lines.append(
            LogLine(
                at=self._clock(), stream=stream, message=message,
                step=step[0] if step else None, count=step[1] if step else None,
                attempt=step[2] if step else None,
                trace_id=ids[0] if ids else self._trace_id, span_id=ids[1] if ids else None,
            )
        )
        if len(self._lines) > MAX_PENDING:
            del self._lines[0]

    def take(self, *, final: bool = False) -> list[LogLine]:
        """The lines collected since the last take (with unfinished lines when final)."""
        if final:
            for stream, rest in list(self._partial.items()):
                self.add(stream, rest)
            self._partial.clear()
        lines, self._lines = self._lines, []
        return lines


class _Tee:
    """A text stream that also hands writes to the current activation's log."""

    def __init__(self, name: str, target: TextIO):
        self._name = name
        self._target = target

    def write(self, text: str) -> int:
        log = _CURRENT.get()
        if log is not None and text:
            log.write(self._name, text)
        return self._target.write(text)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target, attr)


class _Handler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.stderr: TextIO | None = None  # the process's stderr before capture

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_IGNORED_LOGGERS):
            return  # the engine's and Ray's own loggers have handlers of their own
        if record.levelno >= logging.WARNING and self.stderr is not None and len(logging.getLogger().handlers) == 1:
            # We are the root's only handler, so logging's last resort (warnings to
            # stderr) no longer fires: keep printing them where they went before.
            self.stderr.write(self.format(record) + "\n")
        log = _CURRENT.get()
        if log is None:
            return
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 - a bad format string must not fail the step
            message = str(record.msg)
        for line in message.split("\n"):
            log.add(record.levelname, line)


class LogCapture:
    """Captures the output of activations in this process (install once per process)."""

    def __init__(self) -> None:
        self._handler = _Handler()
        self._handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self._saved: tuple[Any, Any, int] | None = None

    def install(self) -> "LogCapture":
        root = logging.getLogger()
        self._saved = (sys.stdout, sys.stderr, root.level)
        self._handler.stderr = sys.stderr
        sys.stdout = _Tee("stdout", sys.stdout)  # type: ignore[assignment]
        sys.stderr = _Tee("stderr", sys.stderr)  # type: ignore[assignment]
        root.addHandler(self._handler)
        if root.level > logging.INFO:
            root.setLevel(logging.INFO)  # tenant code's logger.info() reaches the handler
        return self

    def uninstall(self) -> None:
        if self._saved is not None:
            sys.stdout, sys.stderr, level = self._saved
            root = logging.getLogger()
            root.removeHandler(self._handler)
            root.setLevel(level)
            self._saved = None

    @staticmethod
    def begin(
        clock: Callable[[], float] = time.time, trace_id: str | None = None
    ) -> tuple[ActivationLog, contextvars.Token]:
        log = ActivationLog(clock, trace_id)
        return log, _CURRENT.set(log)

    @staticmethod
    def end(token: contextvars.Token) -> None:
        _CURRENT.reset(token)
