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


from .schema import (STEP_WAITING, I, S, E, X, N, KEEP_ENDED_SESSIONS, lease_owner_prefix, Claim, SessionInfo, InstanceInfo, StepRecord, ActivationState, TERMINATE_EVENT)
from .statements import (_INFO_COLS, _STEP_COLS, _NEXT_TIMER, _NEXT_LEASE_EXPIRY, _claim_statement)

from .faults import retried


def _end_sleeps(
    conn: Connection, pk: int, steps: list[StepRecord], now: float,
) -> tuple[tuple[str, int, float, float], ...]:
    """Record the end of the instance's sleeps whose time has come (their records in
    `steps` replaced); returns (name, count, began, ended) of each."""
    ended = []
    for i, r in enumerate(steps):
        if r.kind == "sleep" and r.finished_at is None and r.result_json is not None \
                and json.loads(r.result_json) <= now:
            conn.execute(update(S).where(S.c.instance_pk == pk, S.c.name == r.name, S.c.seq == r.seq)
                         .values(finished_at=now))
            steps[i] = replace(r, finished_at=now)
            ended.append((r.name, r.seq, r.started_at, now))
    return tuple(ended)


def _clear_waits(conn: Connection, pks: list[int]) -> None:
    """A claimed instance waits for nothing any more (until it suspends again)."""
    if pks:
        conn.execute(update(I).where(I.c.pk.in_(pks), I.c.waiting_for.is_not(None)).values(waiting_for=None))


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
        claims = self._claim_keeping_waits(conn, now, limit, owner, lease_ttl, tenant_id, code_version)
        _clear_waits(conn, [c.pk for c in claims])
        return claims

    def _claim_keeping_waits(
        self, conn: Connection, now: float, limit: int, owner: str, lease_ttl: float,
        tenant_id: str | None, code_version: str | None,
    ) -> list[Claim]:
        """The claim itself; the claimed rows still say which event they wait for."""
        if limit <= 0:
            return []
        key = (tenant_id is not None, code_version is not None)
        stmt = self._claims.get(key)
        if stmt is None:
            stmt = self._claims[key] = _claim_statement(*key, skip_locked=not self.is_sqlite)
        params = {
            "b_now": now, "b_limit": limit, "b_owner": owner, "b_until": now + lease_ttl,
            "b_tenant": tenant_id, "b_version": code_version,
        }
        return [Claim(*row) for row in conn.execute(stmt, params).all()]

    def _claim_and_load(
        self, conn: Connection, now: float, limit: int, owner: str, lease_ttl: float,
        tenant_id: str | None = None, code_version: str | None = None,
    ) -> list[ActivationState]:
        """`claim_due`, and what each claimed activation starts from, in one transaction.

        An instance woken by the event its wait expects gets it here: the event moves
        into the wait's step in this transaction, so the activation replays the wait
        as received instead of asking for it (one commit less before its next step).
        Only when exactly one wait of the instance is unfinished, so the event's step
        is certain; else the wait takes it when the run reaches it, as always. Sleeps
        whose time has come are recorded as over here too, for the same reason."""
        claims = self._claim_keeping_waits(conn, now, limit, owner, lease_ttl, tenant_id, code_version)
        if not claims:
            return []
        pks = [c.pk for c in claims]
        infos = {row.pk: InstanceInfo(*row) for row in conn.execute(
            select(*_INFO_COLS).where(I.c.pk.in_(pks)))}
        steps: dict[int, list[StepRecord]] = {pk: [] for pk in pks}
        for row in conn.execute(select(S.c.instance_pk, *_STEP_COLS).where(S.c.instance_pk.in_(pks))):
            steps[row[0]].append(StepRecord(*row[1:]))
        taken: dict[int, tuple[str, int, str, float, float]] = {}
        waiting = [pk for pk in pks if infos[pk].waiting_for is not None]
        for pk in waiting:
            event_type = infos[pk].waiting_for
            infos[pk] = replace(infos[pk], waiting_for=None)
            waits = [i for i, r in enumerate(steps[pk]) if r.kind == "wait" and r.status == STEP_WAITING]
            if len(waits) != 1:
                continue
            wait = steps[pk][waits[0]]
            got = self._take_buffered(conn, pk, wait, event_type, now)
            if got is not None:
                steps[pk][waits[0]] = got[1]
                taken[pk] = (wait.name, wait.seq, event_type, wait.started_at, now)
        _clear_waits(conn, waiting)
        ended = {pk: _end_sleeps(conn, pk, steps[pk], now) for pk in pks}
        crashes = dict(conn.execute(
            select(X.c.instance_pk, X.c.crashes).where(X.c.instance_pk.in_(pks))).all())
        terminating = set(conn.execute(
            select(E.c.instance_pk).where(E.c.instance_pk.in_(pks), E.c.type == TERMINATE_EVENT)
        ).scalars())
        return [ActivationState(infos[pk], steps[pk], crashes.get(pk, 0), pk in terminating,
                                taken.get(pk), ended[pk])
                for pk in pks]

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
        timer_q, lease_q = _NEXT_TIMER, _NEXT_LEASE_EXPIRY
        if tenant_id is not None and code_version is not None:
            same = and_(I.c.tenant_id == tenant_id, I.c.code_version == code_version)
            timer_q, lease_q = timer_q.where(same), lease_q.where(same)
        with self._read() as conn:
            timer = conn.execute(timer_q).scalar()
            lease = conn.execute(lease_q).scalar()
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
