"""Fair admission: one tenant floods, another's instance must still start at once.

Tenant A creates `--flood` instances of a 3-step workflow (`create_batch` of 100,
as fast as it can); while A's backlog is being worked off, tenant B creates one
instance every 50 ms (`create`, one at a time), `--samples` of them. B's latency
= when its first step ran in a sandbox - when `create` was called. Both tenants'
code is pushed, and B has run once before the flood (its host is warm, as a
tenant's is while it has traffic). Default engine configuration.

Also reported: how much of A's backlog was left when B's last sample started
(the samples must fall inside the flood to mean anything), and A's rate.

Usage: python bench/fairness.py [--flood 10000] [--samples 40] [--max-activations N]
       [--host-concurrency N] [--host-processes N] [--database-url URL]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, database_url, emit, summary_ms, wait_until  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402


def main() -> None:
    flood, samples = arg("--flood", 10000), arg("--samples", 40)
    url = database_url()
    tuning = {k: v for k, v in (("max_activations", arg("--max-activations", None)),
                                ("host_concurrency", arg("--host-concurrency", None)),
                                ("host_processes", arg("--host-processes", None))) if v is not None}
    engine = Engine.start(database_url=url, name=f"bench-fair-{os.getpid()}", **tuning)
    try:
        engine.push_tenant("flood", pushed_tenant_dir("three", "flood"))
        engine.push_tenant("single", pushed_tenant_dir("stamp", "single"))
        a, b = engine.binding("flood"), engine.binding("single")
        first = b.create(id="warm")
        wait_until(lambda: first.status()["status"] == "complete", 120, "B's warm-up")
        t0 = time.perf_counter()
        for i in range(0, flood, 100):
            a.create_batch([{"id": f"a{j}"} for j in range(i, min(flood, i + 100))])
        created_s = time.perf_counter() - t0
        handles, sent = [], []
        for i in range(samples):
            sent.append(time.time())
            handles.append(b.create(id=f"b{i}"))
            time.sleep(0.05)
        outs = [
            wait_until(lambda h=h: (s := h.status())["status"] == "complete" and s["output"], 600,
                       "B's instance")
            for h in handles
        ]
        left = flood - engine.journal.count_by_status("flood").get("complete", 0)
        wait_until(lambda: engine.journal.count_by_status("flood").get("complete", 0) == flood,
                   1200, "the flood to finish", interval=0.05)
        flood_s = time.perf_counter() - t0
        stats = engine.stats()
    finally:
        engine.stop()
    emit("fairness", {
        "journal": url.split(":")[0],
        "config": tuning or "default",
        "flood_instances": flood,
        "flood_create_s": round(created_s, 2),
        "flood_per_s": round(flood / flood_s, 1),
        "flood_left_when_b_sampled": left,
        "b_start_latency": summary_ms([o["started_at"] - s for o, s in zip(outs, sent)]),
        "target_p99_ms": 100,
        "pool": stats["pool"],
    })


if __name__ == "__main__":
    main()
