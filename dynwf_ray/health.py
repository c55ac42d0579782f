"""Journal health: can the journal be written now, since when, and how often did it fail.

A `JournalHealth` watches one process's journal: every write transaction tells it
how it went (`Journal._write`), a commit marks the journal working and a failure
that `JournalUnavailableError` describes (disk full, unreachable, read-only...)
marks it failing, with its cause. It logs each transition once (working ->
failing -> working), never once per retry, and counts failures by cause.

The scheduler merges the health its host processes report with its own into the
engine's (`merge`, `Engine.health()`, the metrics). `backoff(n)` is how long the
platform waits before its n-th retry of work a journal fault interrupted.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from .errors import JournalUnavailableError

log = logging.getLogger("dynwf_ray.journal")

#: Waits between retries of work a journal fault interrupted: 0.5 s doubling to 10 s,
#: with up to 0.5 s of jitter so that hosts do not retry in step.
_RETRY_WAIT = wait_exponential_jitter(multiplier=0.5, max=10.0, jitter=0.5)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...)."""
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = max(1, attempt)
    return float(_RETRY_WAIT(state))


class JournalHealth:
    """One process's view of its journal (see the module docstring). `level`: the level
    of its transition log lines (the scheduler's merged view logs as a warning)."""

    def __init__(self, what: str = "journal", *, level: int = logging.INFO,
                 clock: Callable[[], float] = time.time):
        self._what = what
        self._level = level
        self._clock = clock
        self.ok = True
        self.cause: str | None = None
        self.detail: str | None = None
        self.since = clock()
        self.observed_at = float("-inf")  # last write seen, either way
        self.failures: dict[str, int] = {}

    def succeeded(self) -> None:
        self.observed_at = now = self._clock()
        if not self.ok:
            log.log(self._level, "%s writes work again, after %.1f s of %s",
                    self._what, now - self.since, self.cause)
            self.ok, self.cause, self.detail, self.since = True, None, None, now

    def failed(self, error: JournalUnavailableError) -> None:
        self.observed_at = now = self._clock()
        self.failures[error.cause] = self.failures.get(error.cause, 0) + 1
        if self.ok or self.cause != error.cause:
            log.log(self._level, "%s writes are failing: %s (%s); work is retried until they "
                    "succeed", self._what, error.cause, error.detail)
            if self.ok:
                self.since = now
            self.ok, self.cause, self.detail = False, error.cause, error.detail

    def condition(self) -> str | None:
        """What blocks instances now: None while the journal works."""
        return None if self.ok else f"journal unavailable: {self.cause} ({self.detail})"

    def snapshot(self) -> dict[str, Any]:
        """{"ok", "cause", "detail", "since", "failures": {cause: count}} (JSON-able)."""
        return {"ok": self.ok, "cause": self.cause, "detail": self.detail,
                "since": self.since, "failures": dict(self.failures)}

    def observe(self, snapshot: dict[str, Any]) -> None:
        """Take a merged snapshot (the scheduler's view): log a transition, if any."""
        if snapshot["ok"]:
            self.succeeded()
        else:
            self.failed(JournalUnavailableError(snapshot["cause"], snapshot["detail"] or ""))
        self.failures = dict(snapshot["failures"])


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' health as one: failing while any of them fails (the cause of
    the one failing longest), failures summed by cause."""
    snapshots = list(snapshots)
    failing = sorted((s for s in snapshots if not s["ok"]), key=lambda s: s["since"])
    failures: dict[str, int] = {}
    for s in snapshots:
        for cause, n in s["failures"].items():
            failures[cause] = failures.get(cause, 0) + n
    if failing:
        first = failing[0]
        return {"ok": False, "cause": first["cause"], "detail": first["detail"],
                "since": first["since"], "failures": failures}
    return {"ok": True, "cause": None, "detail": None,
            "since": max((s["since"] for s in snapshots), default=0.0), "failures": failures}
