"""Workflows per second against host processes: does the engine use more cores?

One engine per invocation, with its default configuration except `--host-processes N`
(left out: the default, which depends on the journal and the node's CPUs), and
`--sandbox process` where the kernel sandbox cannot run (a machine whose cgroup lacks
the pids controller; the JSON says which ran). `--tenants T`
pushed tenants (16 by default, so that each gets its own host and the hosts spread over
the processes) run 3-step workflows created in batches of 100, tenants in turn: a load
that keeps every host busy, where `bench/throughput.py` measures what one creating
caller gets. After a warm-up of the same size, `--runs` runs of `--workflows` each; the
rate of a run is instances / (last completion - first create), as in throughput.py.

Also per run: hosts started (cold starts), the machine's busy cores (all processes,
from /proc/stat: which share of the machine the run used), and the CPU each workflow
cost, by kind of process (`cpu_us_per_workflow`, from /proc/<pid>/stat: host
processes, sandboxes and their templates, this creating process, the scheduler, a
PostgreSQL server on this machine, everything else). After the runs: the pool's hosts
and host processes, and the journal's write and lock-wait counters.

`--journal-writer machine|process` sets who commits the host processes' writes on
SQLite (left out: the default); `journal_writer` has the machine writer's counters
when there is one (its commits are not in `journal_writes`, which counts the host
processes' own).

Usage: python bench/scale_out.py [--host-processes N] [--tenants 16] [--workflows 4000]
       [--runs 3] [--sandbox strict|process] [--journal-writer machine|process]
       [--database-url URL]
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (  # noqa: E402
    arg, busy_cores, busy_jiffies, cpu_by_kind, cpu_per_workflow, database_url, emit,
)
from bench.throughput import run_workflows  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402


def main() -> None:
    processes = arg("--host-processes", None)
    tenants = [f"so{i}" for i in range(arg("--tenants", 16))]
    n = arg("--workflows", 4000)
    runs = arg("--runs", 3)
    url = database_url()
    tuning = {"host_processes": processes} if processes else {}
    sandbox = arg("--sandbox", "strict", str)
    if sandbox != "strict":
        tuning["sandbox"] = sandbox
    writer = arg("--journal-writer", None, str)
    if writer:
        tuning["journal_writer"] = writer
    engine = Engine.start(database_url=url, name=f"bench-scale-out-{os.getpid()}", **tuning)
    try:
        for t in tenants:
            engine.push_tenant(t, pushed_tenant_dir("three", t))
        warm_up = run_workflows(engine, tenants, "warmup", n, batch=True)
        rates, cores, cold, cpu = [], [], [], []
        for r in range(runs):
            before, began, ticks = engine.stats()["cold_starts"], busy_jiffies(), cpu_by_kind()
            rates.append(run_workflows(engine, tenants, f"run{r}", n, batch=True))
            cores.append(busy_cores(began, busy_jiffies()))
            cpu.append(cpu_per_workflow(ticks, cpu_by_kind(), n))
            cold.append(engine.stats()["cold_starts"] - before)
        stats = engine.stats()
    finally:
        engine.stop()
    emit("scale_out", {
        "journal": url.split(":")[0],
        "config": tuning or "default",
        "cpus_usable": len(os.sched_getaffinity(0)),
        "tenants": len(tenants),
        "workflows_per_run": n,
        "per_s": round(statistics.median(rates), 1),
        "runs_per_s": [round(x, 1) for x in rates],
        "warm_up_per_s": round(warm_up, 1),
        "busy_cores_per_run": [round(x, 2) for x in cores],
        "cpu_us_per_workflow": {k: round(statistics.median(c.get(k, 0) for c in cpu))
                                for k in sorted({k for c in cpu for k in c})},
        "cpu_us_per_workflow_per_run": cpu,
        "cold_starts_per_run": cold,
        "host_processes": stats.get("host_processes"),
        "hosts": stats.get("live_hosts"),
        "pool": stats["pool"],
        "journal_writes": stats["journal_writes"],
        "journal_writer": stats["journal_writer"],
    })


if __name__ == "__main__":
    main()
