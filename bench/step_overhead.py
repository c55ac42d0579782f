"""Overhead per trivial `step.do` with a durable commit per step.

Three figures, each the median over runs:
- `sqlite_commit_floor_ms`: one fsync'd SQLite commit of one small row (WAL,
  synchronous=FULL) with plain sqlite3: the floor any durable step pays here.
- `in_process_ms`: a workflow of N trivial steps activated in this process
  (journal + replay machinery, no Ray): wall time / N.
- `in_host_actor_ms`: the same workflow run by the engine in an instance host
  actor; per step = (finish of step N - finish of step 1) / (N - 1), from the
  step rows' own timestamps, so actor start-up is excluded.

Usage: python bench/step_overhead.py [--steps 2000] [--runs 5] [--database-url URL]
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, database_url, emit, wait_until  # noqa: E402
from bench.workflows import TrivialSteps, trivial_steps_in_process  # noqa: E402
from dynwf_ray import Engine  # noqa: E402
from dynwf_ray.journal import Journal  # noqa: E402


def sqlite_floor(n: int) -> float:
    path = os.path.join(tempfile.mkdtemp(), "floor.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    start = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?, ?)", (i, "1"))
        conn.execute("COMMIT")
    return (time.perf_counter() - start) / n


def in_process(url: str, steps: int, run: int) -> float:
    journal = Journal(url)
    try:
        return trivial_steps_in_process(journal, steps, f"bench{run}")
    finally:
        journal.close()


def in_host(engine: Engine, steps: int, run: int) -> float:
    tenant = f"host{run}"
    engine.register(tenant, TrivialSteps)
    inst = engine.binding(tenant).create(params={"steps": steps})
    wait_until(lambda: inst.status()["status"] == "complete", 300, "the instance to complete")
    rows = engine.journal.list_steps(engine.journal.get_instance(tenant, inst.id).pk)
    finished = sorted(r.finished_at for r in rows)
    assert len(finished) == steps
    return (finished[-1] - finished[0]) / (steps - 1)


def main() -> None:
    steps = arg("--steps", 2000)
    runs = arg("--runs", 5)
    url = database_url()
    floor = [sqlite_floor(steps) for _ in range(runs)]
    local = [in_process(url, steps, r) for r in range(runs)]
    engine = Engine.start(database_url=url, name="bench-steps", hibernate_after=600)
    try:
        hosted = [in_host(engine, steps, r) for r in range(runs)]
    finally:
        engine.stop()
    ms = lambda xs: round(statistics.median(xs) * 1000, 4)  # noqa: E731
    emit("step_overhead", {
        "journal": url.split(":")[0],
        "steps_per_run": steps,
        "runs": runs,
        "sqlite_commit_floor_ms": ms(floor),
        "in_process_ms": ms(local),
        "in_host_actor_ms": ms(hosted),
        "in_host_actor_runs_ms": [round(x * 1000, 4) for x in hosted],
        "target_ms": 0.5,
    })


if __name__ == "__main__":
    main()
