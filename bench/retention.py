"""Retention: the journal stays the same size under a steady create-complete load, and what
the sweeper costs.

Soak: a pushed tenant's 3-step instances are created one by one at `--rate` per
second for `--seconds`, on an engine whose `retention` keeps complete instances
for `--keep` seconds (otherwise the default configuration). Every `--sample`
seconds the journal's size on disk (SQLite: the file plus its WAL; PostgreSQL:
`pg_database_size`) and the live instance count are recorded. Flat means: after
the first `--keep` + one sweep interval, the size stops growing.

Cost: `--expired` finished instances (3 steps and a log line each) are written
directly to a fresh journal; then the sweeper's own call (`SchedulerCore.sweep`)
deletes them, and each of its transactions (at most 200 instances) is timed.

Usage: python bench/retention.py [--rate 40] [--seconds 180] [--keep 10] [--sample 15]
       [--expired 10000] [--database-url URL]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, database_url, emit, summary_ms, temp_sqlite_url  # noqa: E402
from bench.steady import load  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402
from dynwf_ray.journal import Journal, StepRecord, sqlite_url_path  # noqa: E402
from dynwf_ray.pool import PoolConfig  # noqa: E402
from dynwf_ray.scheduler import SWEEP_BATCH, SchedulerCore  # noqa: E402
from dynwf_ray.types import LogLine, Retention  # noqa: E402


def size_bytes(journal: Journal) -> int:
    path = sqlite_url_path(journal.url)
    if path:
        return sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))
    with journal.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar())


def soak(url: str, rate: float, seconds: float, keep: float, every: float) -> dict:
    engine = Engine.start(database_url=url, name=f"bench-retention-{os.getpid()}",
                          retention={"complete": keep})
    samples = []
    try:
        engine.push_tenant("soak", pushed_tenant_dir("three", "soak"))
        wf = engine.binding("soak")
        started, n = time.monotonic(), 0
        while (elapsed := time.monotonic() - started) < seconds:
            n += load([wf], rate, min(every, seconds - elapsed), f"s{n}")
            counts = engine.journal.count_by_status()
            samples.append({"t_s": round(time.monotonic() - started, 1),
                            "bytes": size_bytes(engine.journal), "instances": sum(counts.values()),
                            "complete": counts.get("complete", 0)})
        stats = engine.stats()
    finally:
        engine.stop()
    settled = [s["bytes"] for s in samples if s["t_s"] >= keep + 20]
    return {
        "rate_per_s": rate, "seconds": seconds, "keep_complete_s": keep, "created": n,
        "swept": stats["instances_swept"], "samples": samples,
        "settled_bytes_min": min(settled, default=None), "settled_bytes_max": max(settled, default=None),
        "settled_growth_ratio": round(max(settled) / min(settled), 3) if settled else None,
    }


def cost(expired: int) -> dict:
    journal = Journal(temp_sqlite_url())
    t0, tenant = 1_000_000.0, "cost"
    journal.save_code(tenant, "v1", "test", b"", t0)
    from dynwf_ray.binding import WorkflowBinding

    wf = WorkflowBinding(journal, tenant, clock=lambda: t0)
    for i in range(0, expired, 100):
        wf.create_batch([{"id": f"x{j}"} for j in range(i, min(i + 100, expired))])
    for claim in iter(lambda: journal.claim_due(t0, 200, "bench", 30, tenant), []):
        for c in claim:
            for name in ("a", "b", "c"):
                journal.record_step(c.pk, c.token, StepRecord(
                    name=name, seq=1, kind="do", status="complete", result_json="1",
                    error_name=None, error_message=None, attempts=1, next_attempt_at=None,
                    started_at=t0, finished_at=t0,
                ), t0, 30, [LogLine(at=t0, stream="stdout", step=name, count=1, attempt=1,
                                    message="x" * 80)], 100)
            journal.complete(c.pk, c.token, "3", t0)
    core = SchedulerCore(
        journal, PoolConfig(max_activations=1, max_hosts=1, host_concurrency=1, cpus=1, idle_after=60),
        max_failures=3, retention=Retention(complete=1),
    )
    timings = []
    real_sweep = journal.sweep

    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return real_sweep(*args, **kwargs)
        finally:
            timings.append(time.perf_counter() - began)

    journal.sweep = timed
    began = time.perf_counter()
    swept = core.sweep(t0 + 10, batches=10**9)
    total = time.perf_counter() - began
    journal.close()
    return {"expired": expired, "swept": swept, "batch_size": SWEEP_BATCH,
            "per_transaction": summary_ms(timings),
            "per_instance_ms": round(total / max(swept, 1) * 1000, 4),
            "total_s": round(total, 3), "median_transaction_ms": round(statistics.median(timings) * 1000, 2)}


def main() -> None:
    url = database_url()
    figures = {
        "journal": url.split(":")[0], "config": "default + retention complete=--keep",
        "soak": soak(url, arg("--rate", 40, float), arg("--seconds", 180, float),
                     arg("--keep", 10, float), arg("--sample", 15, float)),
        "sweeper_cost_sqlite": cost(arg("--expired", 10_000)),
    }
    emit("retention", figures)


if __name__ == "__main__":
    main()
