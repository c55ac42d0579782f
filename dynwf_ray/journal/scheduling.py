"""What schedulers and hosts ask: due instances claimed in batches, demand, timers, leases given up, engine sessions, crash counts.

A part of `Journal` (see the package docstring): its methods use the journal's
connection (`self._write()`, `self._read()`) and each other."""

from __future__ import annotations
from ..types import TERMINAL, InstanceStatus

import json
from dataclasses import replace
from typing import Any, Sequence

from sqlalchemy import (
    and_,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection


from .schema import (STEP_WAITING, I, X, N, KEEP_ENDED_SESSIONS, lease_owner_prefix, Claim, SessionInfo, InstanceInfo, StepRecord, ActivationState)
from .statements import (Prepared, _starting, _CLEAR_WAIT, _NEXT_TIMER, _NEXT_LEASE_EXPIRY, _NEXT_TIMER_OF, _NEXT_LEASE_EXPIRY_OF, _claim_statement, _steps_of, _SLEPT)

from .faults import retried



def _end_sleeps(
    slept: Prepared, conn: Connection, pk: int, steps: list[StepRecord], now: float,
) -> tuple[tuple[str, int, float, float], ...]:
    """Record the end of the instance's sleeps whose time has come (their records in
    `steps` replaced; `slept`: `_SLEPT` prepared); returns (name, count, began, ended) of each."""
    ended = []
    for i, r in enumerate(steps):
        if r.kind == "sleep" and r.finished_at is None and r.result_json is not None \
                and json.loads(r.result_json) <= now:
            slept.run(conn, {"b_pk": pk, "b_name": r.name, "b_seq": r.seq, "b_now": now})
            steps[i] = replace(r, finished_at=now)
            ended.append((r.name, r.seq, r.started_at, now))
    return tuple(ended)


class Scheduling:
    # -- scheduling --------------------------------------------------------

    @retried
    def claim_due(
        self, now: float, limit: int, owner: str, lease_ttl: float,
        tenant_id: str | None = None, code_version: str | None = None,
    ) -> list[Claim]:
        """Lease up to `limit` instances that are due and not leased, oldest wake first.

        `tenant_id` / `code_version` restrict the claim (a host takes only
        instances of the code it has loaded).
        """
        with self._write() as conn:
            return self._claim_due(conn, now, limit, owner, lease_ttl, tenant_id, code_version)

    def _claim_due(
        self, conn: Connection, now: float, limit: int, owner: str, lease_ttl: float,
        tenant_id: str | None = None, code_version: str | None = None,
    ) -> list[Claim]:
        rows = self._claim_keeping_waits(conn, now, limit, owner, lease_ttl, tenant_id, code_version)
        self._clear_waits(conn, [info.pk for info, _, _ in rows])
        return [Claim(i.pk, i.lease_token, i.tenant_id, i.instance_id, i.code_version)
                for i, _, _ in rows]

    def _claim_keeping_waits(
        self, conn: Connection, now: float, limit: int, owner: str, lease_ttl: float,
        tenant_id: str | None, code_version: str | None,
    ) -> list[tuple[InstanceInfo, int, bool]]:
        """The claim itself: each claimed row as it is now (still saying which event it
        waits for), its crash count and whether it is being terminated."""
        if limit <= 0:
            return []
        key = (tenant_id is not None, code_version is not None)
        claim = self._prepare(("claim", key), lambda: _claim_statement(*key, skip_locked=not self.is_sqlite))
        params = {"b_now": now, "b_limit": limit, "b_owner": owner, "b_until": now + lease_ttl}
        if tenant_id is not None:
            params["b_tenant"] = tenant_id
        if code_version is not None:
            params["b_version"] = code_version
        return [_starting(row) for row in claim.rows(conn, params)]

    def _clear_waits(self, conn: Connection, pks: list[int]) -> None:
        """Claimed instances wait for nothing any more (until they suspend again)."""
        for pk in pks:
            self._prepared[_CLEAR_WAIT].run(conn, {"b_pk": pk})

    def _claim_and_load(
        self, conn: Connection, now: float, limit: int, owner: str, lease_ttl: float,
        tenant_id: str | None = None, code_version: str | None = None,
    ) -> list[ActivationState]:
        """`claim_due`, and what each claimed activation starts from, in one transaction:
        two statements (the claim returns the rows; one more reads their steps).

        An instance woken by the event its wait expects gets it here: the event moves
        into the wait's step in this transaction, so the activation replays the wait
        as received instead of asking for it (one commit less before its next step).
        Only when exactly one wait of the instance is unfinished, so the event's step
        is certain; else the wait takes it when the run reaches it, as always. Sleeps
        whose time has come are recorded as over here too, for the same reason."""
        claimed = self._claim_keeping_waits(conn, now, limit, owner, lease_ttl, tenant_id, code_version)
        if not claimed:
            return []
        pks = [info.pk for info, _, _ in claimed]
        steps: dict[int, list[StepRecord]] = {pk: [] for pk in pks}
        steps_of = self._prepare(("steps of", len(pks)), lambda: _steps_of(len(pks)))
        for row in steps_of.rows(conn, {f"b_pk{i}": pk for i, pk in enumerate(pks)}):
            steps[row[0]].append(StepRecord(*row[1:]))
        states, waiting = [], []
        for info, crashes, terminating in claimed:
            pk, taken = info.pk, None
            if info.waiting_for is not None:
                waiting.append(pk)
                taken = self._take_awaited(conn, pk, steps[pk], info.waiting_for, now)
                info = replace(info, waiting_for=None)
            ended = _end_sleeps(self._prepared[_SLEPT], conn, pk, steps[pk], now)
            states.append(ActivationState(info, steps[pk], crashes, terminating, taken, ended))
        self._clear_waits(conn, waiting)
        return states

    def _take_awaited(
        self, conn: Connection, pk: int, steps: list[StepRecord], event_type: str, now: float,
    ) -> tuple[str, int, str, float, float] | None:
        """Move the oldest buffered `event_type` event into the instance's one unfinished
        wait (its record in `steps` replaced); returns (name, count, type, began, ended)."""
        waits = [i for i, r in enumerate(steps) if r.kind == "wait" and r.status == STEP_WAITING]
        if len(waits) != 1:
            return None
        wait = steps[waits[0]]
        got = self._take_buffered(conn, pk, wait, event_type, now)
        if got is None:
            return None
        steps[waits[0]] = got[1]
        return (wait.name, wait.seq, event_type, wait.started_at, now)

    def demand(self, now: float) -> dict[tuple[str, str], tuple[int, int]]:
        """Per (tenant, code version) with work: (instances due and not leased, instances
        leased, i.e. being activated). What the scheduler sizes hosts by."""
        due = and_(
            I.c.wake_at <= now, or_(I.c.lease_expires_at.is_(None), I.c.lease_expires_at < now)
        )
        leased = I.c.lease_expires_at >= now
        stmt = (
            select(
                I.c.tenant_id, I.c.code_version,
                func.sum(case((due, 1), else_=0)), func.sum(case((leased, 1), else_=0)),
            )
            .where(or_(I.c.wake_at <= now, I.c.lease_expires_at.is_not(None)))
            .group_by(I.c.tenant_id, I.c.code_version)
        )
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return {
            (t, v): (int(d or 0), int(held or 0))
            for t, v, d, held in rows if d or held
        }

    def next_wake_at(
        self, tenant_id: str | None = None, code_version: str | None = None
    ) -> float | None:
        """When the next instance becomes claimable: its timer, or its lease's expiry
        (of one code version's instances, when both are given).

        Ordered index walks that stop at the first row (a MIN with a filter, or over
        a CASE expression, scans every instance: 25 ms at 100,000 of them).
        """
        timer_q, lease_q, params = _NEXT_TIMER, _NEXT_LEASE_EXPIRY, {}
        if tenant_id is not None and code_version is not None:
            timer_q, lease_q = _NEXT_TIMER_OF, _NEXT_LEASE_EXPIRY_OF
            params = {"b_tenant": tenant_id, "b_version": code_version}
        with self._read() as conn:
            timer = conn.execute(timer_q, params).scalar()
            lease = conn.execute(lease_q, params).scalar()
        return min((t for t in (timer, lease) if t is not None), default=None)

    @retried
    def release(self, pk: int, token: int, wake_at: float | None, now: float) -> bool:
        """Give up a lease (its holder died or is shutting down): due again at wake_at, or
        with `wake_at` None at its place in the queue (the time it was due when claimed,
        which is older than any work that came due since; at the latest now)."""
        with self._write() as conn:
            return self._release(conn, pk, token, wake_at, now)

    def _release(self, conn: Connection, pk: int, token: int, wake_at: float | None, now: float) -> bool:
        return bool(self._release_where(conn, and_(I.c.pk == pk, I.c.lease_token == token), wake_at, now))

    @staticmethod
    def _release_where(conn: Connection, which: Any, wake_at: float | None, now: float) -> list[int]:
        if wake_at is None:  # its place in the queue: claims leave wake_at as it was
            wake_at = case((I.c.wake_at < now, I.c.wake_at), else_=now)
        result = conn.execute(
            update(I)
            # Only a lease still held: an activation that already suspended or
            # finished released it itself, and its new state must stand.
            .where(which, I.c.lease_expires_at.is_not(None), I.c.status.not_in(TERMINAL))
            .values(
                lease_expires_at=None, lease_owner=None, updated_at=now,
                status=case((I.c.pause_requested, InstanceStatus.paused), else_=InstanceStatus.queued),
                wake_at=case((I.c.pause_requested, None), else_=wake_at),
            )
            .returning(I.c.pk)
        )
        return [row[0] for row in result.all()]

    def held_by(self, owner: str) -> list[Claim]:
        """The leases `owner` holds (the instances a host that died was activating)."""
        with self._read() as conn:
            rows = conn.execute(
                select(I.c.pk, I.c.lease_token, I.c.tenant_id, I.c.instance_id, I.c.code_version)
                .where(I.c.lease_owner == owner, I.c.lease_expires_at.is_not(None),
                       I.c.status.not_in(TERMINAL))
            ).all()
        return [Claim(*row) for row in rows]

    def lease_owners(self, epoch: int) -> list[str]:
        """The owners holding leases taken in session `epoch` (hosts, the scheduler)."""
        with self._read() as conn:
            return sorted(row[0] for row in conn.execute(
                select(I.c.lease_owner).distinct()
                .where(I.c.lease_owner.startswith(lease_owner_prefix(epoch), autoescape=True),
                       I.c.lease_expires_at.is_not(None), I.c.status.not_in(TERMINAL))
            ))

    # -- engine sessions (sessions.py decides when one is gone) ----------------

    @retried
    def open_session(
        self, engine_name: str, node: str, machine: str, processes: Sequence[tuple[int, int]],
        loader_id: str | None, now: float,
    ) -> int:
        """Begin a session; returns its epoch (greater than every earlier one's). Sessions
        that ended more than `KEEP_ENDED_SESSIONS` ago are deleted meanwhile."""
        with self._write() as conn:
            conn.execute(delete(N).where(N.c.ended_at < now - KEEP_ENDED_SESSIONS))
            return int(conn.execute(
                insert(N).values(
                    engine_name=engine_name, node=node[:255], machine=machine[:255],
                    processes_json=json.dumps([list(p) for p in processes]),
                    loader_id=loader_id, started_at=now, heartbeat_at=now,
                ).returning(N.c.epoch)
            ).scalar_one())

    @retried
    def heartbeat(self, epoch: int, now: float) -> bool:
        """Say session `epoch` is alive; False if another engine has ended it meanwhile."""
        with self._write() as conn:
            return conn.execute(
                update(N).where(N.c.epoch == epoch, N.c.ended_at.is_(None)).values(heartbeat_at=now)
            ).rowcount == 1

    @retried
    def adopt_session(self, epoch: int, processes: Sequence[tuple[int, int]], now: float) -> bool:
        """A restarted scheduler takes over session `epoch` (its predecessor's, whose hosts
        it adopts): the session's processes become `processes` and it heartbeats now.
        False if the session has ended meanwhile (its leases were given up)."""
        with self._write() as conn:
            return conn.execute(
                update(N).where(N.c.epoch == epoch, N.c.ended_at.is_(None))
                .values(processes_json=json.dumps([list(p) for p in processes]), heartbeat_at=now)
            ).rowcount == 1

    def probe(self) -> None:
        """Whether the journal can be written now: a write that changes nothing (the newest
        session's heartbeat is rewritten with its own value). Raises
        JournalUnavailableError; either way `health` learns the answer."""
        newest = select(func.max(N.c.epoch)).scalar_subquery()
        with self._write() as conn:
            conn.execute(update(N).where(N.c.epoch == newest).values(heartbeat_at=N.c.heartbeat_at))

    def live_sessions(self) -> list[SessionInfo]:
        """Sessions not ended (some may be gone without having said so)."""
        with self._read() as conn:
            rows = conn.execute(
                select(N.c.epoch, N.c.engine_name, N.c.node, N.c.machine, N.c.processes_json,
                       N.c.loader_id, N.c.started_at, N.c.heartbeat_at)
                .where(N.c.ended_at.is_(None)).order_by(N.c.epoch)
            ).all()
        return [
            SessionInfo(r.epoch, r.engine_name, r.node, r.machine,
                        tuple(tuple(p) for p in json.loads(r.processes_json)), r.loader_id,
                        r.started_at, r.heartbeat_at)
            for r in rows
        ]

    @retried
    def end_session(self, epoch: int, reason: str, now: float) -> list[int]:
        """End session `epoch` and give up every lease taken in it, in one transaction:
        its instances are due again at once, at their place in the queue. Returns their pks."""
        with self._write() as conn:
            conn.execute(
                update(N).where(N.c.epoch == epoch, N.c.ended_at.is_(None))
                .values(ended_at=now, ended_reason=reason[:1000])
            )
            which = I.c.lease_owner.startswith(lease_owner_prefix(epoch), autoescape=True)
            return self._release_where(conn, which, None, now)

    # -- crashed activations --------------------------------------------------

    @retried
    def count_crash(self, pk: int) -> int:
        """One more crashed activation of this instance in a row; returns how many now."""
        with self._write() as conn:
            return self._count_crash(conn, pk)

    def _count_crash(self, conn: Connection, pk: int) -> int:
        ins = self._dialect_insert(X).values(instance_pk=pk, crashes=1)
        stmt = ins.on_conflict_do_update(
            index_elements=["instance_pk"], set_={"crashes": X.c.crashes + 1}
        ).returning(X.c.crashes)
        return int(conn.execute(stmt).scalar_one())

    @staticmethod
    def _clear_crashes(conn: Connection, pk: int) -> None:
        conn.execute(delete(X).where(X.c.instance_pk == pk))
