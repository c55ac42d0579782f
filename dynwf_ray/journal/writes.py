"""What an activation writes, every write fenced by its lease token: steps, events taken, its end.

A part of `Journal` (see the package docstring): its methods use the journal's
connection (`self._write()`, `self._read()`) and each other."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Sequence

from sqlalchemy import delete
from sqlalchemy.engine import Connection

from ..types import LogLine

from .schema import (STEP_COMPLETE, E, LeaseLostError, StepRecord, ActivationState, TERMINATE_EVENT)
from .statements import (_STEP_FIELDS, _FENCE, _RENEW, _LOAD_INSTANCE, _LOAD_STEPS, _starting, _SUSPEND, _BUFFERED, _CONSUME, _RECEIVED, _WAKE_NOW, _COMPLETE, _FAIL, _PAUSE, _TERMINATE)


class ActivationWrites:
    # -- what an activation writes (all fenced by the lease token) ---------

    def _fence(self, conn: Connection, pk: int, token: int, now: float, lease_ttl: float,
               renew: bool = False) -> bool:
        """Check that the lease is still ours, and extend it (`renew`: always; else only
        when less than half of it is left); returns pause_requested."""
        params = {"b_pk": pk, "b_token": token}
        if not renew:
            row = self._prepared[_FENCE].run(conn, params).fetchone()
            renew = row is not None and row[1] < now + lease_ttl / 2
        if renew:
            row = self._prepared[_RENEW].run(conn, {**params, "b_until": now + lease_ttl}).fetchone()
        if row is None:
            raise LeaseLostError(f"instance pk={pk}: lease token {token} is no longer current")
        return bool(row[0])

    def load_activation(self, pk: int, token: int) -> ActivationState:
        with self._read() as conn:
            row = conn.execute(_LOAD_INSTANCE, {"b_pk": pk}).first()
            if row is None or row.lease_token != token:
                raise LeaseLostError(f"instance pk={pk}: lease token {token} is not current")
            steps = conn.execute(_LOAD_STEPS, {"b_pk": pk}).all()
        info, crashes, terminating = _starting(row)
        return ActivationState(info, [StepRecord(*s) for s in steps], crashes, terminating)

    def renew_leases(self, leases: Sequence[tuple[int, int]], now: float, lease_ttl: float) -> None:
        """Extend several held leases at once (those lost or given up are left alone)."""
        with self._write() as conn:
            self._renew_leases(conn, leases, now, lease_ttl)

    @staticmethod
    def _renew_leases(
        conn: Connection, leases: Sequence[tuple[int, int]], now: float, lease_ttl: float
    ) -> None:
        for pk, token in leases:
            conn.execute(_RENEW, {"b_pk": pk, "b_token": token, "b_until": now + lease_ttl})

    def record_step(
        self, pk: int, token: int, step: StepRecord, now: float, lease_ttl: float,
        logs: Sequence[LogLine] = (), keep_logs: int = 0,
    ) -> bool:
        """Durably record a step's state (fenced), with the log lines printed since the
        last write, in the same commit. Returns pause_requested."""
        with self._write() as conn:
            return self._record_step(conn, pk, token, step, now, lease_ttl, logs, keep_logs)

    def _record_step(
        self, conn: Connection, pk: int, token: int, step: StepRecord, now: float,
        lease_ttl: float, logs: Sequence[LogLine] = (), keep_logs: int = 0,
    ) -> bool:
        values = {f: getattr(step, f) for f in _STEP_FIELDS}
        values["instance_pk"] = pk
        pause = self._fence(conn, pk, token, now, lease_ttl)
        self._prepared_upsert_step.run(conn, values)
        if logs:
            self._insert_logs(conn, pk, logs, keep_logs)
        return pause

    def take_event(
        self, pk: int, token: int, step: StepRecord, event_type: str, now: float, lease_ttl: float
    ) -> tuple[str, str, float] | None:
        """Consume the oldest buffered event of this type into the waiting step.

        Returns (type, payload_json, created_at), or None when nothing is buffered.
        """
        with self._write() as conn:
            return self._take_event(conn, pk, token, step, event_type, now, lease_ttl)

    def _take_event(
        self, conn: Connection, pk: int, token: int, step: StepRecord, event_type: str,
        now: float, lease_ttl: float,
    ) -> tuple[str, str, float] | None:
        self._fence(conn, pk, token, now, lease_ttl)
        taken = self._take_buffered(conn, pk, step, event_type, now)
        return None if taken is None else taken[0]

    def _take_buffered(
        self, conn: Connection, pk: int, step: StepRecord, event_type: str, now: float,
    ) -> tuple[tuple[str, str, float], StepRecord] | None:
        """Move the oldest buffered event of this type into the waiting step (the caller
        holds the lease). Returns ((type, payload_json, created_at), the step as recorded
        now), or None when nothing is buffered."""
        row = self._prepared[_BUFFERED].run(conn, {"b_pk": pk, "b_type": event_type}).fetchone()
        if row is None:
            return None
        event_pk, payload_json, created_at = row
        self._prepared[_CONSUME].run(conn, {"b_event": event_pk})
        result = (
            f'{{"type":{json.dumps(event_type)},"payload":{payload_json},'
            f'"timestamp":{json.dumps(created_at)}}}'
        )
        self._prepared[_RECEIVED].run(conn, {"b_pk": pk, "b_name": step.name, "b_seq": step.seq,
                                             "b_result": result, "b_now": now})
        recorded = replace(step, status=STEP_COMPLETE, result_json=result, finished_at=now)
        return (event_type, payload_json, created_at), recorded

    def suspend(
        self, pk: int, token: int, wake_at: float | None, waiting_for: str | None, now: float
    ) -> None:
        """Release the lease with a timer (sleep end / wait deadline / retry time).

        If a pause was requested the instance becomes `paused` instead. If it waits
        for an event that is already buffered, it is due at once (no lost wake-up).
        """
        with self._write() as conn:
            self._suspend(conn, pk, token, wake_at, waiting_for, now)

    def _suspend(
        self, conn: Connection, pk: int, token: int, wake_at: float | None,
        waiting_for: str | None, now: float,
    ) -> None:
        params = {
            "b_pk": pk, "b_token": token, "b_wake_at": wake_at,
            "b_waiting_for": waiting_for, "b_now": now,
        }
        if not self._prepared[_SUSPEND].run(conn, params).rowcount:
            raise LeaseLostError(f"instance pk={pk}: lease lost before suspending")
        if waiting_for is not None:
            if self._prepared[_BUFFERED].run(conn, {"b_pk": pk, "b_type": waiting_for}).fetchone():
                self._prepared[_WAKE_NOW].run(conn, {"b_pk": pk, "b_now": now})

    def pause_now(self, pk: int, token: int, now: float) -> None:
        """The activation stopped at a step boundary because a pause was requested."""
        with self._write() as conn:
            self._finish(conn, _PAUSE, pk, token, now)

    def complete(self, pk: int, token: int, output_json: str, now: float) -> None:
        with self._write() as conn:
            self._finish(conn, _COMPLETE, pk, token, now, b_output=output_json)

    def fail(self, pk: int, token: int, error_name: str, message: str, now: float) -> None:
        with self._write() as conn:
            self._finish(conn, _FAIL, pk, token, now, b_error_name=error_name, b_error_message=message)

    def _finish(self, conn: Connection, stmt: Any, pk: int, token: int, now: float, **params: Any) -> None:
        params = {"b_pk": pk, "b_token": token, "b_now": now, **params}
        if not self._prepared[stmt].run(conn, params).rowcount:
            raise LeaseLostError(f"instance pk={pk}: lease lost before finishing")

    def _end_activation(
        self, conn: Connection, outcome: tuple, pk: int, logs: Sequence[LogLine], keep_logs: int,
        crashed: bool, had_crashes: bool,
    ) -> None:
        """What ends an activation, in one commit: its outcome (("complete", token, output,
        now), ("fail", token, name, message, now), ("suspend", token, wake_at, waiting_for,
        now), ("pause", token, now), ("release", token, wake_at, now) or ("terminate", token,
        now)), its last log
        lines, and its count of crashes in a row (one more, or none after one that did
        not crash)."""
        kind, token, *args = outcome
        if kind == "complete":
            self._finish(conn, _COMPLETE, pk, token, args[1], b_output=args[0])
        elif kind == "fail":
            self._finish(conn, _FAIL, pk, token, args[2], b_error_name=args[0], b_error_message=args[1])
        elif kind == "suspend":
            self._suspend(conn, pk, token, args[0], args[1], args[2])
        elif kind == "pause":
            self._finish(conn, _PAUSE, pk, token, args[0])
        elif kind == "release":
            if not self._release(conn, pk, token, args[0], args[1]) and (
                    self._prepared[_FENCE].run(conn, {"b_pk": pk, "b_token": token}).fetchone() is None):
                return  # another activation holds the instance now, or it is gone: nothing more
        elif kind == "terminate":  # its rollback is done
            self._finish(conn, _TERMINATE, pk, token, args[0])
            conn.execute(delete(E).where(E.c.instance_pk == pk, E.c.type == TERMINATE_EVENT))
        self._insert_logs(conn, pk, logs, keep_logs)
        if crashed:
            self._count_crash(conn, pk)
        elif had_crashes:
            self._clear_crashes(conn, pk)
