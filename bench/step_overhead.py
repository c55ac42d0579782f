"""Overhead per trivial `step.do` with a durable commit per step.

Three figures, each the median over runs (the three kinds interleaved, run by run):
- `sqlite_commit_floor_ms`: one fsync'd SQLite commit of one small row (WAL,
  synchronous=FULL) with plain sqlite3: the floor any durable step pays here.
- `in_process_ms`: a workflow of N trivial steps activated in this process
  (journal + replay machinery, no Ray, no sandbox): wall time / N.
- `in_sandbox_ms`: the default path: the same workflow, pushed as tenant code
  (`engine.push_tenant`), run by an engine with its default configuration, i.e.
  in a jailed sandbox process driven by its instance host actor (each step: a
  `do` request to the host, a `call` back, the callback's result, the commit, the
  answer). Per step = (finish of step N - finish of step 1) / (N - 1), from the
  step rows' own timestamps, so host and sandbox start-up are excluded.

Beside each wall figure, CPU time per step (user + system, less sensitive to other
load on the machine than wall time): `in_process_cpu_ms` of this process, and
`in_sandbox_cpu_ms` of the host process and of its sandbox process (pids from
`engine.sandboxes()`), whose work per step is sequential (request, answer).

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

import psutil  # noqa: E402  (installed with ray[default])

from bench._common import arg, database_url, emit, wait_until  # noqa: E402
from bench.workflows import pushed_tenant_dir, trivial_steps_in_process  # noqa: E402
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


def in_process(url: str, steps: int, run: int) -> tuple[float, float]:
    """(wall seconds per step, CPU seconds per step of this process)."""
    journal = Journal(url)
    try:
        cpu = time.process_time()
        wall = trivial_steps_in_process(journal, steps, f"bench{run}")
        return wall, (time.process_time() - cpu) / steps
    finally:
        journal.close()


def _cpu(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return float("nan")
    return t.user + t.system


def _processes(engine: Engine, tenant: str) -> dict[str, int]:
    """The host of the tenant and its one idle sandbox (after a warm-up run)."""
    (host,) = [h for h in engine.sandboxes() if h["tenant"] == tenant]
    (sandbox,) = host["sandboxes"]
    return {"host": host["host_pid"], "sandbox": sandbox["pid"]}


def in_sandbox(engine: Engine, tenant: str, steps: int) -> tuple[float, dict[str, float]]:
    """(wall seconds per step, CPU seconds per step of the host and of the sandbox)."""
    procs = _processes(engine, tenant)
    cpu = {k: _cpu(p) for k, p in procs.items()}
    inst = engine.binding(tenant).create(params={"steps": steps})
    wait_until(lambda: inst.status()["status"] == "complete", 300, "the instance to complete")
    cpu = {k: (_cpu(p) - cpu[k]) / steps for k, p in procs.items()}
    assert _processes(engine, tenant) == procs, "the run did not stay in one host and sandbox"
    rows = engine.journal.list_steps(engine.journal.get_instance(tenant, inst.id).pk)
    finished = sorted(r.finished_at for r in rows)
    assert len(finished) == steps
    return (finished[-1] - finished[0]) / (steps - 1), cpu


def main() -> None:
    steps = arg("--steps", 2000)
    runs = arg("--runs", 5)
    url = database_url()
    load_before = [round(x, 2) for x in os.getloadavg()]
    floor, local, local_cpu, sandboxed, sandboxed_cpu = [], [], [], [], []
    engine = Engine.start(database_url=url, name=f"bench-steps-{os.getpid()}")
    try:
        engine.push_tenant("steps", pushed_tenant_dir("trivial"))
        inst = engine.binding("steps").create(params={"steps": 20})  # starts the host and its sandbox
        wait_until(lambda: inst.status()["status"] == "complete", 300, "the warm-up to complete")
        wait_until(lambda: engine.stats()["busy_hosts"] == 0, 60, "the host to be idle")
        for r in range(runs):
            floor.append(sqlite_floor(steps))
            wall, cpu = in_process(url, steps, r)
            local.append(wall)
            local_cpu.append(cpu)
            wall, cpus = in_sandbox(engine, "steps", steps)
            sandboxed.append(wall)
            sandboxed_cpu.append(cpus)
    finally:
        engine.stop()
    ms = lambda xs: round(statistics.median(xs) * 1000, 4)  # noqa: E731
    emit("step_overhead", {
        "journal": url.split(":")[0],
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "steps_per_run": steps,
        "runs": runs,
        "sqlite_commit_floor_ms": ms(floor),
        "in_process_ms": ms(local),
        "in_process_runs_ms": [round(x * 1000, 4) for x in local],
        "in_process_cpu_ms": ms(local_cpu),
        "in_sandbox_ms": ms(sandboxed),
        "in_sandbox_runs_ms": [round(x * 1000, 4) for x in sandboxed],
        "in_sandbox_cpu_ms": {k: ms([c[k] for c in sandboxed_cpu]) for k in ("host", "sandbox")},
        "target_ms": 0.6,
    })


if __name__ == "__main__":
    main()
