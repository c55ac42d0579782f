"""Hosts under a steady load: after warm-up, nothing is started or stopped.

`--tenants` pushed tenants each get instances of a 3-step workflow created one by
one at a steady total rate (`--rate` per second, tenants in turn) for `--warmup`
seconds, then for `--seconds` more. Reported: cold starts (hosts started) and
host stops during the measured part, with the pool's reasons, and whether every
instance completed (the load must be one the engine keeps up with). Default
engine configuration.

Usage: python bench/steady.py [--rate 100] [--tenants 3] [--warmup 30] [--seconds 300]
       [--database-url URL]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, database_url, emit, wait_until  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402


def load(bindings: list, rate: float, seconds: float, tag: str) -> int:
    """Create instances at `rate` per second for `seconds`; returns how many."""
    start, n = time.monotonic(), 0
    while (elapsed := time.monotonic() - start) < seconds:
        behind = int(elapsed * rate) - n
        for _ in range(max(behind, 0)):
            bindings[n % len(bindings)].create(id=f"{tag}-{n}")
            n += 1
        time.sleep(0.005)
    return n


def main() -> None:
    rate, tenants = arg("--rate", 100, float), arg("--tenants", 3)
    warmup, seconds = arg("--warmup", 30, float), arg("--seconds", 300, float)
    url = database_url()
    engine = Engine.start(database_url=url, name=f"bench-steady-{os.getpid()}")
    try:
        names = [f"steady{i}" for i in range(tenants)]
        for t in names:
            engine.push_tenant(t, pushed_tenant_dir("three", t))
        bindings = [engine.binding(t) for t in names]
        load(bindings, rate, warmup, "warm")
        before = engine.stats()
        created = load(bindings, rate, seconds, "steady")
        total = engine.journal.count_by_status()
        wait_until(lambda: engine.journal.count_by_status().get("complete", 0) == sum(total.values()),
                   600, "the load to finish", interval=0.05)
        after = engine.stats()
    finally:
        engine.stop()
    starts = {k: v - before["pool"].get(k, 0) for k, v in after["pool"].items()
              if k.startswith(("starts", "stops")) and v - before["pool"].get(k, 0)}
    emit("steady", {
        "journal": url.split(":")[0],
        "config": "default",
        "rate_per_s": rate, "tenants": tenants, "warmup_s": warmup, "seconds": seconds,
        "instances": created,
        "cold_starts_after_warmup": after["cold_starts"] - before["cold_starts"],
        "host_starts_and_stops_after_warmup": starts,
        "target_cold_starts": 0,
    })


if __name__ == "__main__":
    main()
