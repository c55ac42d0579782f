"""CPU of one step's journal write on SQLite, how much of it is SQLAlchemy's, and of
the other journal calls every workflow makes.

A step's record is two statements (the lease fence and the step's upsert) in one
fsync'd transaction. Figures, CPU time (user + system) per call in µs, medians of
`--runs` runs of `--writes` calls, each on a fresh temporary journal:

- `record_step_cpu_us`: `Journal.record_step`, one transaction per call, as a host
  writes a step when no other write shares its commit;
- `statements_cpu_us`: the same two statements through SQLAlchemy inside one open
  transaction (no commit per call);
- `dbapi_statements_cpu_us`: the same two statements, compiled once by SQLAlchemy for
  SQLite and run with plain `sqlite3` (what a prepared DB-API path would pay);
- `empty_transaction_cpu_us`: `BEGIN IMMEDIATE` and `COMMIT` with nothing written,
  through the journal's transaction (pool, writer lock, events);
- `dbapi_transaction_cpu_us`: the two statements and an fsync'd commit with plain
  `sqlite3`, one transaction per call.

And the CPU of the other calls on the path of every workflow, per call, each in its
own transaction as the engine runs it:

- `create_cpu_us`: `WorkflowBinding.create` (reads the tenant's code version, inserts);
- `claim_and_load_cpu_us`: `Journal.claim_and_load` of one due instance, as a host
  claims when it has one free slot;
- `send_event_cpu_us`: `InstanceHandle.send_event` to a running instance (buffered);
- `status_cpu_us`: `InstanceHandle.status`;
- `next_wake_at_cpu_us`: `Journal.next_wake_at(tenant, version)`, which a host asks
  when it has slots left after a claim (of another tenant's 200 queued instances).

Usage: python bench/journal_write.py [--writes 2000] [--runs 3]
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, emit  # noqa: E402
from bench.workflows import ThreeSteps  # noqa: E402
from dynwf_ray.binding import WorkflowBinding  # noqa: E402
from dynwf_ray.journal import STEP_COMPLETE, Journal, StepRecord  # noqa: E402
from dynwf_ray.journal.statements import _FENCE, _STEP_FIELDS  # noqa: E402
from dynwf_ray.package import package_class  # noqa: E402


def _record(name: str, seq: int, now: float) -> StepRecord:
    return StepRecord(name=name, seq=seq, kind="do", status=STEP_COMPLETE, result_json="1",
                      error_name=None, error_message=None, attempts=1, next_attempt_at=None,
                      started_at=now, finished_at=now)


def _per_call(n: int, fn) -> float:
    began = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - began) / n * 1e6


def _claim_one(journal: Journal, now: float) -> None:
    with journal._write() as conn:
        assert journal._claim_and_load(conn, now, 1, "bench", 3600, "t")


def one_run(n: int) -> dict[str, float]:
    path = os.path.join(tempfile.mkdtemp(prefix="dynwf-bench-"), "journal.db")
    journal = Journal(f"sqlite:///{path}")
    version, kind, blob = package_class(ThreeSteps)
    now = time.time()
    journal.save_code("t", version, kind, blob, now)
    WorkflowBinding(journal, "t").create(id="x")
    claim = journal.claim_due(now + 1, 1, "bench", 3600, tenant_id="t")[0]
    out: dict[str, float] = {}
    out["record_step_cpu_us"] = _per_call(n, lambda i: journal.record_step(
        claim.pk, claim.token, _record("a", i + 1, now), time.time(), 3600))
    with journal._write() as conn:
        out["statements_cpu_us"] = _per_call(n, lambda i: journal._record_step(
            conn, claim.pk, claim.token, _record("b", i + 1, now), time.time(), 3600))
        dialect = conn.dialect

    def empty(i: int) -> None:
        with journal._write():
            pass

    out["empty_transaction_cpu_us"] = _per_call(n, empty)

    binding = WorkflowBinding(journal, "t")
    out["create_cpu_us"] = _per_call(n, lambda i: binding.create(id=f"c{i}"))
    out["claim_and_load_cpu_us"] = _per_call(n, lambda i: _claim_one(journal, time.time() + 1))
    handles = [binding.get(f"c{i}") for i in range(n)]
    out["send_event_cpu_us"] = _per_call(n, lambda i: handles[i].send_event("go", {"i": i}))
    out["status_cpu_us"] = _per_call(n, lambda i: handles[i].status())
    queued = WorkflowBinding(journal, "q")
    journal.save_code("q", version, kind, blob, now)
    for i in range(200):
        queued.create(id=f"q{i}")
    out["next_wake_at_cpu_us"] = _per_call(n, lambda i: journal.next_wake_at("q", version))

    fence = _FENCE.compile(dialect=dialect)
    upsert = journal._upsert_step.compile(dialect=dialect)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA synchronous=FULL")

    def statements(name: str, i: int) -> None:
        t = time.time()
        fence_params = {**fence.params, "b_pk": claim.pk, "b_token": claim.token,
                        "b_until": t + 3600, "b_refresh": t + 1800}
        raw.execute(fence.string, [fence_params[k] for k in fence.positiontup]).fetchone()
        values = {f: getattr(_record(name, i + 1, now), f) for f in _STEP_FIELDS}
        values["instance_pk"] = claim.pk
        raw.execute(upsert.string, [values[k] for k in upsert.positiontup])

    raw.execute("BEGIN IMMEDIATE")
    out["dbapi_statements_cpu_us"] = _per_call(n, lambda i: statements("c", i))
    raw.execute("COMMIT")

    def transaction(i: int) -> None:
        raw.execute("BEGIN IMMEDIATE")
        statements("d", i)
        raw.execute("COMMIT")

    out["dbapi_transaction_cpu_us"] = _per_call(n, transaction)
    raw.close()
    journal.close()
    return out


def main() -> None:
    n, runs = arg("--writes", 2000), arg("--runs", 3)
    results = [one_run(n) for _ in range(runs)]
    figures = {k: round(statistics.median(r[k] for r in results), 1) for k in results[0]}
    emit("journal_write", {"journal": "sqlite", "writes_per_run": n, "runs": runs, **figures,
                           "runs_cpu_us": results})


if __name__ == "__main__":
    main()
