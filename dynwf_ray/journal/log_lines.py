"""What tenant code printed or logged, kept per instance (the newest lines).

A part of `Journal` (see the package docstring): its methods use the journal's
connection (`self._write()`, `self._read()`) and each other."""

from __future__ import annotations

from typing import Sequence

from sqlalchemy import (
    delete,
    insert,
    select,
)
from sqlalchemy.engine import Connection

from ..types import LogLine

from .schema import MAX_ROW_ID, L
from .statements import _LAST_LINE


class LogLines:
    # -- logs ----------------------------------------------------------------

    def append_logs(self, pk: int, logs: Sequence[LogLine], keep: int) -> None:
        """Store log lines of an instance, keeping only its newest `keep` lines."""
        if logs:
            with self._write() as conn:
                self._insert_logs(conn, pk, logs, keep)

    @staticmethod
    def _insert_logs(conn: Connection, pk: int, logs: Sequence[LogLine], keep: int) -> None:
        if not logs:
            return
        conn.execute(
            insert(L),
            [{**line.model_dump(exclude={"id"}), "instance_pk": pk} for line in logs],
        )
        oldest_kept = (
            select(L.c.pk).where(L.c.instance_pk == pk).order_by(L.c.pk.desc())
            .offset(max(keep - 1, 0)).limit(1).scalar_subquery()
        )
        conn.execute(delete(L).where(L.c.instance_pk == pk, L.c.pk < oldest_kept))

    def read_logs(self, pk: int, after: int = 0, limit: int = 1000) -> list[LogLine]:
        """An instance's log lines with id > `after`, oldest first."""
        cols = [L.c.pk.label("id")] + [getattr(L.c, f) for f in LogLine.model_fields if f != "id"]
        with self._read() as conn:
            rows = conn.execute(
                select(*cols).where(L.c.instance_pk == pk, L.c.pk > min(after, MAX_ROW_ID))
                .order_by(L.c.pk).limit(limit)
            ).all()
        return [LogLine(**row._mapping) for row in rows]

    def last_line(self, pk: int, stream: str) -> str | None:
        """The newest log line of the instance in `stream`, if any."""
        with self._read() as conn:
            return conn.execute(_LAST_LINE, {"b_pk": pk, "b_stream": stream}).scalar()
