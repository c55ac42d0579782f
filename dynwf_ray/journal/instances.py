"""Instances as the platform sees them: create, read, list, and what it does to one (events, pause, resume, terminate, restart, move, delete, sweep).

A part of `Journal` (see the package docstring): its methods use the journal's
connection (`self._write()`, `self._read()`) and each other."""

from __future__ import annotations
from ..types import TERMINAL, InstanceStatus

import json
from typing import Any, Callable, Sequence

from sqlalchemy import (
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection

from ..errors import (
    DuplicateInstanceError,
    InstanceNotFoundError,
    InvalidInputError,
    InvalidStateError,
    UnknownTenantError,
)

from .schema import (STEP_COMPLETE, MAX_ROW_ID, I, S, E, C, L, X, InstanceInfo, StepRecord, ActivationState, TERMINATE_EVENT)
from .statements import (_INFO_COLS, _STEP_COLS, _LOAD_STEPS, _GET_INSTANCE, _LOCK_INSTANCE, _LOAD_ROLLBACKS, _WAKE_NOW, _INSERT_INSTANCE, _LATEST_VERSION)

from .faults import retried


#: The columns a new instance's row is written with (the others start NULL).
CREATED_COLUMNS = (
    "tenant_id", "instance_id", "code_version", "params_json", "metadata_json", "status",
    "created_at", "updated_at", "wake_at", "pause_requested", "lease_token", "activations",
    "trace_context", "trace_caller",
)


class Instances:
    # -- creating and reading instances ------------------------------------

    @retried
    def create_instances(
        self,
        tenant_id: str,
        code_version: str,
        items: Sequence[tuple[str, str, str, str | None, str | None]],
        now: float,
        *,
        skip_existing: bool,
    ) -> list[str]:
        """Insert (instance_id, params_json, metadata_json, trace_context, trace_caller)
        rows, queued and due now.

        With skip_existing, ids the tenant already has are left alone (create_batch);
        otherwise an existing id raises DuplicateInstanceError. Returns the ids inserted.
        """
        if not items:
            return []
        with self._write() as conn:
            return self._insert_instances(conn, tenant_id, code_version, items, now, skip_existing)

    @retried
    def create_on_latest(
        self,
        tenant_id: str,
        items: Callable[[str], Sequence[tuple[str, str, str, str | None, str | None]]],
        now: float,
        *,
        skip_existing: bool,
    ) -> tuple[str, list[str]]:
        """`create_instances` on the tenant's newest code version, read in the same
        transaction (what a binding's `create` does: one transaction, not a read and then
        a write). `items(version)` gives the rows; it runs inside the transaction, so it
        should be cheap. Returns (the version, the ids inserted); UnknownTenantError when
        the tenant has no code."""
        with self._write() as conn:
            row = self._prepared[_LATEST_VERSION].run(conn, {"b_tenant": tenant_id}).fetchone()
            if row is None or row[0] is None:
                raise UnknownTenantError(
                    f"tenant {tenant_id!r} has no workflow code; register or push it first"
                )
            version = row[0]
            rows = items(version)
            return version, (
                self._insert_instances(conn, tenant_id, version, rows, now, skip_existing) if rows else []
            )

    def _insert_instances(
        self, conn: Connection, tenant_id: str, code_version: str,
        items: Sequence[tuple[str, str, str, str | None, str | None]], now: float,
        skip_existing: bool,
    ) -> list[str]:
        rows = [
            dict(zip(CREATED_COLUMNS, (
                tenant_id, iid, code_version, params, meta, InstanceStatus.queued,
                now, now, now, False, 0, 0, trace_context, trace_caller,
            )))
            for iid, params, meta, trace_context, trace_caller in items
        ]
        if skip_existing:
            existing = set(
                conn.execute(
                    select(I.c.instance_id).where(
                        I.c.tenant_id == tenant_id,
                        I.c.instance_id.in_([r["instance_id"] for r in rows]),
                    )
                ).scalars()
            )
            seen: set[str] = set()
            fresh = []
            for r in rows:
                if r["instance_id"] not in existing and r["instance_id"] not in seen:
                    seen.add(r["instance_id"])
                    fresh.append(r)
            rows = fresh
            if rows:
                conn.execute(_INSERT_INSTANCE, rows)
        else:  # one by one, as a webhook creates them: the statement precompiled
            try:
                for row in rows:
                    self._prepared_create.run(conn, row)
            except conn.dialect.dbapi.IntegrityError:  # the driver's: Prepared runs on it
                raise DuplicateInstanceError(
                    f"tenant {tenant_id!r} already has an instance with id "
                    f"{rows[0]['instance_id']!r}"
                ) from None
        return [r["instance_id"] for r in rows]

    def get_instance(self, tenant_id: str, instance_id: str) -> InstanceInfo | None:
        with self._read() as conn:
            row = conn.execute(_GET_INSTANCE, {"b_tenant": tenant_id, "b_instance": instance_id}).first()
        return InstanceInfo(*row) if row else None

    def require_instance(self, tenant_id: str, instance_id: str) -> InstanceInfo:
        info = self.get_instance(tenant_id, instance_id)
        if info is None:
            raise InstanceNotFoundError(
                f"no instance {instance_id!r} for tenant {tenant_id!r}"
            )
        return info

    def find_instances(self, instance_id: str) -> list[InstanceInfo]:
        """Every tenant's instance with this id (operator tools only)."""
        with self._read() as conn:
            rows = conn.execute(select(*_INFO_COLS).where(I.c.instance_id == instance_id)).all()
        return [InstanceInfo(*r) for r in rows]

    def list_instances(
        self, tenant_id: str | None = None, status: str | None = None, limit: int = 100, *,
        created_after: float | None = None, created_before: float | None = None,
        before_pk: int | None = None,
    ) -> list[InstanceInfo]:
        """Up to `limit` instances, newest first (by pk), of a tenant (None: every tenant's),
        with a status, created at or after `created_after` and before `created_before`.
        Paging: pass the last row's pk as `before_pk` for the rows after it."""
        stmt = select(*_INFO_COLS).order_by(I.c.pk.desc()).limit(limit)
        if tenant_id is not None:
            stmt = stmt.where(I.c.tenant_id == tenant_id)
        if status is not None:
            stmt = stmt.where(I.c.status == status)
        if created_after is not None:
            stmt = stmt.where(I.c.created_at >= created_after)
        if created_before is not None:
            stmt = stmt.where(I.c.created_at < created_before)
        if before_pk is not None:
            stmt = stmt.where(I.c.pk < min(before_pk, MAX_ROW_ID))
        with self._read() as conn:
            return [InstanceInfo(*r) for r in conn.execute(stmt).all()]

    def rollback_steps(self, pk: int) -> list[StepRecord]:
        """The instance's compensations recorded so far (steps of kind "rollback")."""
        with self._read() as conn:
            rows = conn.execute(_LOAD_ROLLBACKS, {"b_pk": pk}).all()
        return [StepRecord(*row) for row in rows]

    def list_steps(self, pk: int) -> list[StepRecord]:
        with self._read() as conn:
            rows = conn.execute(
                select(*_STEP_COLS).where(S.c.instance_pk == pk).order_by(S.c.started_at)
            ).all()
        return [StepRecord(*r) for r in rows]

    def count_by_tenant_status(self) -> dict[tuple[str, str], int]:
        """Instances per (tenant, status), for the metrics gauges."""
        stmt = select(I.c.tenant_id, I.c.status, func.count()).group_by(I.c.tenant_id, I.c.status)
        with self._read() as conn:
            return {(t, s): n for t, s, n in conn.execute(stmt).all()}

    def storage_stats(self) -> dict[str, Any]:
        """How the `instances` table is kept, for benchmarks and operators. PostgreSQL
        (`pg_stat_user_tables`): row updates, how many were HOT (no index entry
        written), live and dead rows, (auto)vacuum runs, and the size of the table
        and of its indexes in bytes. SQLite: the file's pages and free pages."""
        with self._read() as conn:
            if self.is_sqlite:
                pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
                free = conn.exec_driver_sql("PRAGMA freelist_count").scalar()
                return {"page_count": pages, "freelist_count": free}
            row = conn.exec_driver_sql(
                "SELECT n_tup_upd, n_tup_hot_upd, n_live_tup, n_dead_tup, vacuum_count,"
                " autovacuum_count, pg_table_size(relid), pg_indexes_size(relid)"
                " FROM pg_stat_user_tables WHERE relname = 'instances'"
            ).one()
        keys = ("updates", "hot_updates", "live_rows", "dead_rows", "vacuums", "autovacuums",
                "table_bytes", "index_bytes")
        return dict(zip(keys, (int(v or 0) for v in row)))

    def count_by_status(self, tenant_id: str | None = None) -> dict[str, int]:
        stmt = select(I.c.status, func.count()).group_by(I.c.status)
        if tenant_id is not None:
            stmt = stmt.where(I.c.tenant_id == tenant_id)
        with self._read() as conn:
            return {status: n for status, n in conn.execute(stmt).all()}

    # -- what the platform does to an instance ------------------------------

    def check_movable(self, tenant_id: str, instance_id: str, version: str) -> InstanceInfo:
        """Raise InvalidStateError unless the instance could move to `version` now."""
        info = self.require_instance(tenant_id, instance_id)
        with self._read() as conn:
            self._movable(conn, info, version)
        return info

    @staticmethod
    def _movable(conn: Connection, info: InstanceInfo, version: str) -> None:
        if info.status in TERMINAL:
            raise InvalidStateError(
                f"instance {info.instance_id!r} is {info.status}; restart it before moving it"
            )
        known = conn.execute(
            select(C.c.version).where(C.c.tenant_id == info.tenant_id, C.c.version == version)
        ).first()
        if known is None:
            raise InvalidStateError(f"tenant {info.tenant_id!r} has no code version {version!r}")

    def history(self, tenant_id: str, instance_id: str) -> ActivationState:
        """An instance as an activation would start from it, without a lease: what a
        replay check replays (`replay_check.py`)."""
        info = self.require_instance(tenant_id, instance_id)
        with self._read() as conn:
            steps = conn.execute(_LOAD_STEPS, {"b_pk": info.pk}).all()
        return ActivationState(info, [StepRecord(*s) for s in steps])

    def in_flight(self, tenant_id: str) -> list[InstanceInfo]:
        """The tenant's instances that have not ended, oldest first."""
        with self._read() as conn:
            return [InstanceInfo(*r) for r in conn.execute(
                select(*_INFO_COLS).where(I.c.tenant_id == tenant_id, I.c.status.not_in(TERMINAL))
                .order_by(I.c.pk)
            ).all()]

    @retried
    def set_version(self, tenant_id: str, instance_id: str, version: str, now: float) -> None:
        """Move an instance to another stored code version (used from its next activation)."""
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            self._movable(conn, info, version)
            metadata = {**json.loads(info.metadata_json), "code_version": version}
            conn.execute(
                update(I).where(I.c.pk == info.pk).values(
                    code_version=version, metadata_json=json.dumps(metadata), updated_at=now
                )
            )

    @retried
    def send_event(
        self, tenant_id: str, instance_id: str, event_type: str, payload_json: str, now: float
    ) -> InstanceInfo:
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            if info.status in TERMINAL:
                raise InvalidStateError(
                    f"instance {instance_id!r} is {info.status}; it accepts no more events"
                )
            self._prepared_event.run(conn, {
                "instance_pk": info.pk, "type": event_type, "payload_json": payload_json,
                "created_at": now, "consumed": False,
            })
            if info.waiting_for == event_type and info.status == InstanceStatus.waiting:
                self._prepared[_WAKE_NOW].run(conn, {"b_pk": info.pk, "b_now": now})
            return info

    @retried
    def pause(self, tenant_id: str, instance_id: str, now: float) -> str:
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            if info.status in TERMINAL:
                raise InvalidStateError(f"instance {instance_id!r} is {info.status}; cannot pause")
            if info.status == InstanceStatus.paused:
                return InstanceStatus.paused
            leased = info.lease_expires_at is not None and info.lease_expires_at >= now
            status = InstanceStatus.waitingForPause if leased else InstanceStatus.paused
            values: dict[str, Any] = dict(pause_requested=True, status=status, updated_at=now)
            if not leased:
                values.update(wake_at=None, lease_expires_at=None)
            conn.execute(update(I).where(I.c.pk == info.pk).values(**values))
            return status

    @retried
    def resume(self, tenant_id: str, instance_id: str, now: float) -> str:
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            if info.status == InstanceStatus.paused:
                conn.execute(
                    update(I).where(I.c.pk == info.pk).values(
                        pause_requested=False, status=InstanceStatus.queued, wake_at=now, updated_at=now
                    )
                )
                return InstanceStatus.queued
            if info.status == InstanceStatus.waitingForPause:
                conn.execute(
                    update(I).where(I.c.pk == info.pk).values(
                        pause_requested=False, status=InstanceStatus.running, updated_at=now
                    )
                )
                return InstanceStatus.running
            if info.status in TERMINAL:
                raise InvalidStateError(f"instance {instance_id!r} is {info.status}; cannot resume")
            return info.status

    @retried
    def terminate(
        self, tenant_id: str, instance_id: str, now: float, rollback: bool = False
    ) -> InstanceInfo:
        """End the instance now, a running activation fenced. With `rollback`, it is
        instead due at once with a `TERMINATE_EVENT` in its inbox: its next activation
        runs the compensations of its completed steps, then ends it terminated."""
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            if info.status in TERMINAL:
                raise InvalidStateError(
                    f"instance {instance_id!r} is already {info.status}; cannot terminate"
                )
            if rollback:
                conn.execute(delete(E).where(E.c.instance_pk == info.pk, E.c.type == TERMINATE_EVENT))
                conn.execute(insert(E).values(instance_pk=info.pk, type=TERMINATE_EVENT,
                                              payload_json="null", created_at=now))
                conn.execute(update(I).where(I.c.pk == info.pk).values(
                    wake_at=now, waiting_for=None, pause_requested=False,
                    lease_token=I.c.lease_token + 1, lease_expires_at=None, lease_owner=None,
                    updated_at=now,
                ))
                return info
            conn.execute(
                update(I).where(I.c.pk == info.pk).values(
                    status=InstanceStatus.terminated, wake_at=None, waiting_for=None,
                    lease_token=I.c.lease_token + 1, lease_expires_at=None, lease_owner=None,
                    pause_requested=False, updated_at=now,
                )
            )
            return info

    @retried
    def restart(
        self, tenant_id: str, instance_id: str, now: float,
        trace: tuple[str | None, str | None] = (None, None),
        from_step: tuple[str, int] | None = None,
    ) -> InstanceInfo:
        """Run the instance again, in a new trace, running holders fenced. From the start:
        its steps, inbox and logs are discarded. `from_step` (name, count): that step and
        every step that began after it are discarded, with the events their waits
        consumed and the log lines they printed; the steps before it keep their results.
        Returns the instance as it was before."""
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            if from_step is None:
                conn.execute(delete(S).where(S.c.instance_pk == info.pk))
                conn.execute(delete(E).where(E.c.instance_pk == info.pk))
                conn.execute(delete(L).where(L.c.instance_pk == info.pk))
            else:
                self._discard_from(conn, info, *from_step)
            self._clear_crashes(conn, info.pk)
            conn.execute(
                update(I).where(I.c.pk == info.pk).values(
                    status=InstanceStatus.queued, wake_at=now, waiting_for=None, output_json=None,
                    error_name=None, error_message=None, pause_requested=False,
                    lease_token=I.c.lease_token + 1, lease_expires_at=None, lease_owner=None,
                    updated_at=now, trace_context=trace[0], trace_caller=trace[1],
                )
            )
            return info

    @staticmethod
    def _discard_from(conn: Connection, info: InstanceInfo, name: str, seq: int) -> None:
        mine = S.c.instance_pk == info.pk
        started = conn.execute(select(S.c.started_at).where(mine, S.c.name == name, S.c.seq == seq)).scalar()
        if started is None:
            raise InvalidInputError(
                f"instance {info.instance_id!r} has no recorded step {name!r} (count {seq}) "
                "to restart from"
            )
        later = conn.execute(
            select(S.c.name, S.c.seq, S.c.kind, S.c.status, S.c.result_json)
            .where(mine, S.c.started_at >= started)
        ).all()
        for step in later:
            if step.kind == "wait" and step.status == STEP_COMPLETE:  # it consumed an event
                got = json.loads(step.result_json)
                conn.execute(delete(E).where(
                    E.c.instance_pk == info.pk, E.c.consumed.is_(True), E.c.type == got["type"],
                    E.c.created_at == got["timestamp"],
                ))
            conn.execute(delete(L).where(L.c.instance_pk == info.pk, L.c.step == step.name,
                                         L.c.count == step.seq))
        conn.execute(delete(S).where(mine, S.c.started_at >= started))

    # -- deletion ----------------------------------------------------------------

    @retried
    def delete_instance(self, tenant_id: str, instance_id: str, now: float, force: bool = False) -> InstanceInfo:
        """Delete an instance with its steps, events and logs; refused (InvalidStateError)
        while an activation holds it, unless `force` (that activation is fenced out).
        Returns the instance as it was."""
        with self._write() as conn:
            info = self._lock_instance(conn, tenant_id, instance_id)
            held = info.lease_expires_at is not None and info.lease_expires_at >= now
            if held and not force:
                raise InvalidStateError(
                    f"instance {instance_id!r} is running; pause or terminate it first, or "
                    "delete it with force=True"
                )
            self._delete(conn, [info.pk])
            return info

    def sweep(
        self, now: float, keep: dict[str, float | None],
        tenants: dict[str, dict[str, float | None]], limit: int = 200,
    ) -> int:
        """Delete up to `limit` finished instances kept longer than their status allows:
        `keep` {status: seconds | None (for good)} for every tenant not in `tenants`,
        which has its own. One transaction; returns how many (fewer than `limit`: none
        left to delete now)."""
        expired = []
        for status in TERMINAL:
            if keep.get(status) is not None:
                expired.append(and_(I.c.status == status, I.c.updated_at < now - keep[status],
                                    I.c.tenant_id.not_in(list(tenants))))
            for tenant, rules in tenants.items():
                if rules.get(status) is not None:
                    expired.append(and_(I.c.status == status, I.c.tenant_id == tenant,
                                        I.c.updated_at < now - rules[status]))
        if not expired:
            return 0
        with self._write() as conn:
            pks = list(conn.execute(select(I.c.pk).where(or_(*expired)).limit(limit)).scalars())
            if pks:
                self._delete(conn, pks)
            return len(pks)

    @staticmethod
    def _delete(conn: Connection, pks: list[int]) -> None:
        for table in (S, E, L, X):
            conn.execute(delete(table).where(table.c.instance_pk.in_(pks)))
        conn.execute(delete(I).where(I.c.pk.in_(pks)))

    def _lock_instance(self, conn: Connection, tenant_id: str, instance_id: str) -> InstanceInfo:
        # The update takes the row lock on PostgreSQL (see module docstring).
        rows = self._prepared[_LOCK_INSTANCE].rows(conn, {"b_tenant": tenant_id, "b_instance": instance_id})
        if not rows:
            raise InstanceNotFoundError(f"no instance {instance_id!r} for tenant {tenant_id!r}")
        return InstanceInfo(*rows[0])
