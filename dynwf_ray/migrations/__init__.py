"""Schema migrations of the journal, with Alembic.

The models in `journal/schema.py` are the schema; the revisions in `versions/` take a
journal from the first schema dynwf-ray shipped to the one those models
describe, one revision per change, named by what it adds (`REVISIONS`).

`Journal(url)` upgrades its journal to the head revision when it opens it
(`upgrade`, called in one write transaction of the journal, so an upgrade is
all or nothing, and concurrent openers take turns: on SQLite the journal's
writer lock and `BEGIN IMMEDIATE`, on PostgreSQL `pg_advisory_xact_lock`). A
journal at the head is only read (`read_state`). A journal made before the
journal had revisions (no `alembic_version` table: `create_all` made its
tables) is recognised by its tables, columns and indexes (`REVISIONS`' tests)
and stamped with the newest revision it has entirely; the revisions after it
then run, and those that add tables or indexes skip any that exist already
(older code's `create_all` made the tables of its day before it refused a
journal whose columns were old). A journal at a revision this code does not
know (a newer dynwf-ray upgraded it) is refused with `JournalSchemaError`.

Adding a revision: change the models, then
`python -m dynwf_ray.migrations revision "adds X"` writes `versions/NNNN_adds_x.py`
from what differs between the head and the models; review it (for SQLite,
ALTERs go in `op.batch_alter_table`), and add it with its test to `REVISIONS`.
tests/test_migrations.py checks that the head matches the models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import DynwfError, JournalSchemaError

log = logging.getLogger(__name__)

SCRIPT_LOCATION = str(Path(__file__).resolve().parent)
VERSION_TABLE = "alembic_version"
#: The PostgreSQL advisory lock the upgrading transaction holds ("dynwfmig").
PG_LOCK_KEY = int.from_bytes(b"dynwfmig", "big")


@dataclass(frozen=True)
class _Tables:
    """A journal's tables as the database reports them: table -> columns, and the
    indexes of `instances`."""

    columns: dict[str, set[str]]
    indexes: set[str]
    #: `instances` never reuses a pk (SQLite: AUTOINCREMENT; PostgreSQL: always so).
    pk_never_reused: bool = True

    def has(self, table: str, *columns: str) -> bool:
        return table in self.columns and set(columns) <= self.columns[table]


#: The first schema dynwf-ray shipped (0001_baseline): its tables and columns.
BASELINE = {
    "tenants": {"tenant_id", "latest_version", "updated_at"},
    "code_versions": {"tenant_id", "version", "created_at"},  # kind, blob: until 0004
    "instances": {
        "pk", "tenant_id", "instance_id", "code_version", "metadata_json", "params_json",
        "status", "output_json", "error_name", "error_message", "created_at", "updated_at",
        "wake_at", "waiting_for", "pause_requested", "lease_token", "lease_owner",
        "lease_expires_at", "activations",
    },
    "steps": {
        "instance_pk", "name", "seq", "status", "result_json", "error_name", "error_message",
        "attempts", "next_attempt_at", "started_at", "finished_at",
    },
    "events": {"pk", "instance_pk", "type", "payload_json", "created_at", "consumed"},
}

#: Every table any revision made (a database with none of them has no journal yet).
JOURNAL_TABLES = {
    *BASELINE, "code_blobs", "logs", "tenant_policies", "activation_crashes",
    "engine_sessions", "tenant_retention", "api_tokens", "webhook_secrets",
}

#: Every revision, oldest first, with the test that says a journal made before
#: revisions existed has everything it does (None: a data revision, which such a
#: journal runs unless it has the tables of a later revision: only code that had run
#: it made those; it changes only rows that need it).
REVISIONS: tuple[tuple[str, Callable[[_Tables], bool] | None], ...] = (
    ("0001_baseline", lambda t: all(t.has(name, *cols) for name, cols in BASELINE.items())),
    ("0002_step_kind", lambda t: t.has("steps", "kind")),
    ("0003_code_manifest", lambda t: t.has("code_versions", "manifest_json")
     or (t.has("code_blobs") and not t.has("code_versions", "blob"))),
    ("0004_code_blobs", lambda t: t.has("code_blobs") and not t.has("code_versions", "blob")),
    ("0005_lease_wake_index", lambda t: "ix_instances_lease_wake" in t.indexes),
    ("0006_tracing", lambda t: t.has("instances", "trace_context", "trace_caller")
     and t.has("tenants", "telemetry_json") and t.has("logs")),
    ("0007_tenant_policies", lambda t: t.has("tenant_policies")),
    ("0008_crashes_code_wake", lambda t: t.has("activation_crashes")
     and "ix_instances_code_wake" in t.indexes),
    ("0009_engine_sessions", lambda t: t.has("engine_sessions")),
    ("0010_retention", lambda t: t.has("tenant_retention")
     and "ix_instances_status_updated" in t.indexes and "ix_instances_status" not in t.indexes),
    ("0011_class_modules", None),
    ("0012_api_access", lambda t: t.has("api_tokens") and t.has("webhook_secrets")
     and "ix_instances_tenant_pk" in t.indexes),
    ("0013_instances_autoincrement", lambda t: t.pk_never_reused),
)
KNOWN = tuple(rev for rev, _ in REVISIONS)
HEAD = KNOWN[-1]


@dataclass(frozen=True)
class SchemaState:
    """Where a journal's schema stands.

    `revision`: what its `alembic_version` says (None: no revision recorded).
    `detected`: for a journal without one, the revision its tables match (None:
    no journal tables yet). `lacking`: for a journal that matches none, what it
    lacks of this code's schema.
    """

    revision: str | None
    detected: str | None = None
    lacking: tuple[str, ...] = ()

    @property
    def at_head(self) -> bool:
        return self.revision == HEAD

    @property
    def known(self) -> bool:
        return self.revision is None or self.revision in KNOWN

    @property
    def empty(self) -> bool:
        return self.revision is None and self.detected is None and not self.lacking

    def describe(self) -> str:
        """One line for people (`dynwf db current`)."""
        if self.at_head:
            return f"{HEAD} (head)"
        if self.revision is not None and not self.known:
            return (f"{self.revision} (unknown to this dynwf-ray, whose head is {HEAD}: a newer "
                    "dynwf-ray upgraded this journal)")
        if self.revision is not None:
            return f"{self.revision} (head is {HEAD}: `dynwf db upgrade` upgrades it)"
        if self.lacking:
            return f"none: its tables match no dynwf-ray schema ({'; '.join(self.lacking)})"
        if self.detected is None:
            return f"none: no journal tables yet (`dynwf db upgrade` creates them at {HEAD})"
        return (f"none: made before schema revisions, with the tables of {self.detected} "
                "(`dynwf db upgrade` stamps and upgrades it)")


def read_state(conn: Connection) -> SchemaState:
    """The journal's schema revision, read without writing anything."""
    inspector = sa.inspect(conn)
    if inspector.has_table(VERSION_TABLE):
        heads = sorted(conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
        if heads:
            unknown = [h for h in heads if h not in KNOWN]
            return SchemaState(unknown[0] if unknown else max(heads, key=KNOWN.index))
    names = set(inspector.get_table_names()) & JOURNAL_TABLES
    if not names:
        return SchemaState(None)
    tables = _Tables(
        {name: {c["name"] for c in inspector.get_columns(name)} for name in names},
        {i["name"] for i in inspector.get_indexes("instances")} if "instances" in names else set(),
        conn.dialect.name != "sqlite" or "AUTOINCREMENT" in (conn.execute(sa.text(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'instances'"
        )).scalar() or "").upper(),
    )
    detected = None
    for rev, present in REVISIONS:  # the longest run of revisions the tables have entirely
        if present is None:  # data: done if a later revision's tables are here (see REVISIONS)
            continue
        if not present(tables):
            break
        detected = rev
    if detected is None:
        return SchemaState(None, lacking=_lacking(tables))
    return SchemaState(None, detected)


def _lacking(tables: _Tables) -> tuple[str, ...]:
    """What a journal no revision matches lacks of this code's schema, per table."""
    from sqlmodel import SQLModel

    lacking = []
    for table in SQLModel.metadata.sorted_tables:
        if table.name in tables.columns:
            have = tables.columns[table.name]
            missing = [c.name for c in table.columns if c.name not in have]
            if missing:
                lacking.append(f"table {table.name!r} lacks {', '.join(missing)}")
        elif table.name in BASELINE:
            lacking.append(f"it has no table {table.name!r}")
    return tuple(lacking)


def refuse_unknown(state: SchemaState, where: str) -> None:
    """JournalSchemaError for a journal this code cannot use or upgrade."""
    if not state.known:
        raise JournalSchemaError(
            f"the journal at {where} is at schema revision {state.revision!r}, which this "
            f"dynwf-ray does not know (its newest is {HEAD!r}): a newer dynwf-ray upgraded it. "
            "Run that version, or restore a backup taken before the upgrade"
        )
    if state.lacking:
        raise JournalSchemaError(
            f"the journal at {where} has no schema revision, and its tables match no schema "
            f"dynwf-ray made, so it cannot be upgraded: {'; '.join(state.lacking)}. If it was "
            "created by an older dynwf-ray and altered by hand, restore what it lacks; "
            "otherwise start on a new journal"
        )


def upgrade(conn: Connection, where: str) -> tuple[SchemaState, str]:
    """Upgrade the journal to `HEAD` on `conn`, which is in a write transaction the caller
    commits (on SQLite one that holds the write lock). Returns the state found and the
    revision left. Raises JournalSchemaError for a journal it cannot upgrade (nothing is
    changed then: the caller rolls back)."""
    from alembic import command

    from ..journal import unavailable

    if conn.dialect.name == "postgresql":  # concurrent upgraders take turns
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
    state = read_state(conn)  # again, under the lock: another process may have upgraded
    if state.at_head:
        return state, HEAD
    refuse_unknown(state, where)
    config = alembic_config(conn)
    before = state.revision or state.detected
    try:
        if state.revision is None and state.detected is not None:
            command.stamp(config, state.detected)
        command.upgrade(config, "head")
    except Exception as exc:  # noqa: BLE001 - told apart below
        if isinstance(exc, DynwfError) or unavailable(exc) is not None:
            raise
        cause = getattr(exc, "orig", None) or exc  # the driver's words, without the SQL
        raise JournalSchemaError(
            f"upgrading the journal at {where} from {before or 'an empty database'} to {HEAD} "
            f"failed, and nothing was changed: {type(cause).__name__}: "
            f"{(str(cause).strip().splitlines() or [''])[0]}"
        ) from exc
    if before is None:
        log.info("dynwf: created the journal's tables at %s (%s)", where, HEAD)
    elif before == HEAD:
        log.info("dynwf: recorded the schema revision of the journal at %s (%s)", where, HEAD)
    else:
        log.warning("dynwf: upgraded the journal at %s from %s to %s", where, before, HEAD)
    return state, HEAD


def alembic_config(conn: Connection | None = None):
    """Alembic's configuration for the journal: the scripts in this package, and the
    connection `env.py` migrates (no alembic.ini)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if conn is not None:
        config.attributes["connection"] = conn
    return config
