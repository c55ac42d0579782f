"""Tenants and their code: versions, pushed code, telemetry settings, policies, retention rules.

A part of `Journal` (see the package docstring): its methods use the journal's
connection (`self._write()`, `self._read()`) and each other."""

from __future__ import annotations


from sqlalchemy import (
    delete,
    insert,
    select,
)


from .schema import (T, C, B, P, R)
from .statements import _LATEST_VERSION

from .faults import retried


class CodeStore:
    # -- tenants and code --------------------------------------------------

    @retried
    def save_code(
        self, tenant_id: str, version: str, kind: str, blob: bytes, now: float,
        manifest_json: str = "{}",
    ) -> None:
        """Store a code version for a tenant (content once, however many tenants push it)
        and make it the tenant's latest. Idempotent."""
        with self._write() as conn:
            if conn.execute(select(B.c.version).where(B.c.version == version)).first() is None:
                conn.execute(
                    insert(B).values(
                        version=version, kind=kind, blob=blob, manifest_json=manifest_json,
                        created_at=now,
                    )
                )
            owned = conn.execute(
                select(C.c.version).where(C.c.tenant_id == tenant_id, C.c.version == version)
            ).first()
            if owned is None:
                conn.execute(insert(C).values(tenant_id=tenant_id, version=version, created_at=now))
            stmt = self._dialect_insert(T).values(
                tenant_id=tenant_id, latest_version=version, updated_at=now
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["tenant_id"],
                    set_={"latest_version": version, "updated_at": now},
                )
            )

    def code_manifest(self, version: str) -> str | None:
        """The manifest JSON of a stored code version (without its blob)."""
        with self._read() as conn:
            return conn.execute(select(B.c.manifest_json).where(B.c.version == version)).scalar()

    @retried
    def set_tenant_telemetry(self, tenant_id: str, telemetry_json: str | None, now: float) -> None:
        """Store the platform's telemetry setting for a tenant (None removes it)."""
        stmt = self._dialect_insert(T).values(
            tenant_id=tenant_id, telemetry_json=telemetry_json, updated_at=now
        )
        with self._write() as conn:
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["tenant_id"],
                    set_={"telemetry_json": telemetry_json, "updated_at": now},
                )
            )

    def tenant_telemetry(self, tenant_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(
                select(T.c.telemetry_json).where(T.c.tenant_id == tenant_id)
            ).scalar()

    @retried
    def set_tenant_policy(self, tenant_id: str, policy_json: str | None, now: float) -> None:
        """Store the platform's sandbox policy for a tenant (None: back to the defaults)."""
        with self._write() as conn:
            conn.execute(delete(P).where(P.c.tenant_id == tenant_id))
            if policy_json is not None:
                conn.execute(insert(P).values(tenant_id=tenant_id, policy_json=policy_json, updated_at=now))

    def tenant_policies(self) -> dict[str, str]:
        """Every tenant's policy (JSON) the platform set."""
        with self._read() as conn:
            return {t: text for t, text in conn.execute(select(P.c.tenant_id, P.c.policy_json)).all()}

    @retried
    def set_retention(self, tenant_id: str, retention_json: str | None, now: float) -> None:
        """Store a tenant's own retention rules (None: the engine's apply)."""
        with self._write() as conn:
            conn.execute(delete(R).where(R.c.tenant_id == tenant_id))
            if retention_json is not None:
                conn.execute(insert(R).values(tenant_id=tenant_id, retention_json=retention_json,
                                              updated_at=now))

    def retention_rules(self) -> dict[str, str]:
        """Every tenant's own retention rules (JSON)."""
        with self._read() as conn:
            return {t: text for t, text in conn.execute(select(R.c.tenant_id, R.c.retention_json)).all()}

    def tenant_policy(self, tenant_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(select(P.c.policy_json).where(P.c.tenant_id == tenant_id)).scalar()

    def latest_version(self, tenant_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(_LATEST_VERSION, {"b_tenant": tenant_id}).scalar()

    def get_code(self, tenant_id: str, version: str) -> tuple[str, bytes, str] | None:
        """(kind, blob, manifest_json) of a code version the tenant has, else None."""
        with self._read() as conn:
            row = conn.execute(
                select(B.c.kind, B.c.blob, B.c.manifest_json)
                .join(C, C.c.version == B.c.version)
                .where(C.c.tenant_id == tenant_id, C.c.version == version)
            ).first()
        return (row.kind, bytes(row.blob), row.manifest_json) if row else None

    def find_code(self, version: str) -> tuple[str, bytes, str] | None:
        """(kind, blob, manifest_json) of stored content, whichever tenant pushed it."""
        with self._read() as conn:
            row = conn.execute(
                select(B.c.kind, B.c.blob, B.c.manifest_json).where(B.c.version == version)
            ).first()
        return (row.kind, bytes(row.blob), row.manifest_json) if row else None

    def list_tenants(self) -> list[tuple[str, str, float]]:
        """(tenant_id, latest_version, updated_at) of every tenant with code, by tenant id."""
        with self._read() as conn:
            rows = conn.execute(
                select(T.c.tenant_id, T.c.latest_version, T.c.updated_at)
                .where(T.c.latest_version.is_not(None)).order_by(T.c.tenant_id)
            ).all()
        return [tuple(r) for r in rows]

    def list_versions(self, tenant_id: str) -> list[tuple[str, str, float]]:
        """(version, kind, created_at) of every code version of a tenant, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                select(C.c.version, B.c.kind, C.c.created_at)
                .join(B, B.c.version == C.c.version)
                .where(C.c.tenant_id == tenant_id)
                .order_by(C.c.created_at)
            ).all()
        return [tuple(r) for r in rows]
