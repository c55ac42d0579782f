"""Activation latency of a hibernated instance, warm host and cold host.

Each sample: an instance is suspended in `wait_for_event` (no activation
running); we send the event and measure until its next step runs inside a host
(the step records time.time()). That covers the event's commit, the scheduler's
wake-up and claim, the call to the host, loading and replaying the instance.
- warm: the host of that tenant's code is idle and alive (hibernate_after is long).
- cold: hibernate_after=0, so the host was killed and a new Ray actor starts.

Usage: python bench/activation.py [--warm 50] [--cold 10] [--database-url URL]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, database_url, emit, summary_ms, wait_until  # noqa: E402
from bench.workflows import WakeAndStamp  # noqa: E402
from dynwf_ray import Engine  # noqa: E402


def activation_samples(
    engine: Engine, tenant: str, n: int, cold: bool
) -> tuple[list[float], list[int]]:
    """n latencies (after one warm-up) of waking a waiting instance; and the host pids."""
    wf = engine.binding(tenant)
    latencies, pids = [], []
    for i in range(n + 1):
        inst = wf.create(id=f"{tenant}-{i}", params={})
        wait_until(lambda: inst.status()["status"] == "waiting", 120, "the instance to wait")
        if cold:
            wait_until(lambda: engine.stats()["live_hosts"] == 0, 60, "hosts to be deactivated")
        else:
            wait_until(lambda: engine.stats()["busy_hosts"] == 0, 60, "the host to be idle")
        sent = time.time()
        inst.send_event("poke", {})
        out = wait_until(
            lambda: (s := inst.status())["status"] == "complete" and s["output"], 120,
            "completion", interval=0.001,
        )
        if i:  # the first sample warms up imports and the host
            latencies.append(out["resumed_at"] - sent)
            pids.append(out["pid"])
    return latencies, pids


def run(kind: str, n: int, url: str) -> dict:
    cold = kind == "cold"
    engine = Engine.start(
        database_url=url, name=f"bench-{kind}", hibernate_after=0 if cold else 600, max_hosts=2
    )
    try:
        engine.register(kind, WakeAndStamp)
        return summary_ms(activation_samples(engine, kind, n, cold)[0])
    finally:
        engine.stop()


def main() -> None:
    url = database_url()
    warm = run("warm", arg("--warm", 50), url)
    cold = run("cold", arg("--cold", 10), url)
    emit("activation", {
        "journal": url.split(":")[0],
        "warm": warm, "warm_target_p50_ms": 5,
        "cold": cold, "cold_target_ms": 1200,
    })


if __name__ == "__main__":
    main()
