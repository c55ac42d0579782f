"""A sustained full load: does the journal hold its rate over minutes?

The default engine configuration and a pushed 3-step tenant. The driver keeps a
backlog of `--backlog` instances that are not finished (creating batches of 100
as they complete), for `--warmup` seconds and then `--minutes` minutes, and
reports the instances completed in each minute of the measured part. It also
reports how the journal kept the `instances` table (`Journal.storage_stats`): on
PostgreSQL, row updates and how many were HOT (no index entry written), dead
rows and autovacuum runs, table and index size, before and after; on SQLite, the
file's pages.

Usage: python bench/sustained.py [--minutes 5] [--warmup 30] [--backlog 1000]
       [--database-url URL]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, database_url, emit  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402


def keep_busy(engine: Engine, binding, seconds: float, backlog: int, start_n: int,
              samples: list[tuple[float, int]]) -> int:
    """Create instances in batches of 100 so that about `backlog` are unfinished, for
    `seconds`; append (time, instances complete) every second. Returns how many were
    created in all (from `start_n`)."""
    n, end = start_n, time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        done = engine.journal.count_by_status().get("complete", 0)
        samples.append((now, done))
        while n - done < backlog:
            binding.create_batch([{"id": f"i{n + i}"} for i in range(100)])
            n += 100
        time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
    return n


def main() -> None:
    minutes, warmup, backlog = arg("--minutes", 5, float), arg("--warmup", 30, float), arg("--backlog", 1000)
    url = database_url()
    engine = Engine.start(database_url=url, name=f"bench-sustained-{os.getpid()}")
    try:
        engine.push_tenant("sustained", pushed_tenant_dir("three", "sustained"))
        binding = engine.binding("sustained")
        warm: list[tuple[float, int]] = []
        n = keep_busy(engine, binding, warmup, backlog, 0, warm)
        storage_before = engine.journal.storage_stats()
        samples: list[tuple[float, int]] = []
        n = keep_busy(engine, binding, minutes * 60, backlog, n, samples)
        storage_after = engine.journal.storage_stats()
        stats = engine.stats()
    finally:
        engine.stop()
    t0, done0 = samples[0]
    per_minute = []
    for m in range(1, int(minutes) + 1):
        # the sample closest to the end of minute m
        t, done = min(samples, key=lambda s: abs(s[0] - (t0 + 60 * m)))
        per_minute.append(done)
    rates = [round((b - a) / 60, 1) for a, b in zip([done0, *per_minute], per_minute)]
    emit("sustained", {
        "journal": url.split(":")[0],
        "config": "default",
        "minutes": minutes, "warmup_s": warmup, "backlog": backlog,
        "created": n,
        "completed_per_s_by_minute": rates,
        "median_per_s": statistics.median(rates),
        "last_over_first": round(rates[-1] / rates[0], 3) if rates and rates[0] else None,
        "storage_before": storage_before,
        "storage_after": storage_after,
        "journal_writes": stats["journal_writes"],
        "cold_starts": stats["cold_starts"],
    })


if __name__ == "__main__":
    main()
