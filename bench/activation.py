"""Activation latency of a hibernated instance, warm host and cold host.

The tenant's code is pushed (`engine.push_tenant`, a small directory this script
writes), so it runs as every tenant's does: in a sandbox process of its host.
Each sample: an instance (created with `create`, one at a time) is suspended in
`wait_for_event` (no activation running); we send the event and measure until
its next step runs inside the sandbox (the step records time.time()). That
covers the event's commit, the scheduler's wake-up and claim, the call to the
host, loading the instance, the `activate` message to the sandbox, replay there,
the wait's and the step's requests.
- warm: the engine's default configuration; the tenant's host (and its idle
  sandbox) is alive, since samples come well within `hibernate_after`.
- cold: hibernate_after=0 (the one setting changed), so the host was killed and a
  new Ray actor starts, with its sandbox template and a new sandbox.

`--journal-writers process,machine` adds the warm path again with each of those
`journal_writer` settings, each on a fresh journal (`warm_by_journal_writer`).

Usage: python bench/activation.py [--warm 50] [--cold 10] [--journal-writers W,...]
       [--database-url URL]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import RUN, arg, database_url, emit, summary_ms, wait_until  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402


def activation_samples(
    engine: Engine, tenant: str, n: int, cold: bool
) -> tuple[list[float], list[int]]:
    """n latencies (after one warm-up) of waking a waiting instance; and the host pids."""
    wf = engine.binding(tenant)
    latencies, pids = [], []
    for i in range(n + 1):
        inst = wf.create(id=f"{RUN}-{tenant}-{i}", params={})
        wait_until(lambda: inst.status()["status"] == "waiting", 120, "the instance to wait")
        if cold:
            wait_until(lambda: engine.stats()["live_hosts"] == 0, 60, "hosts to be deactivated")
        else:
            wait_until(lambda: engine.stats()["busy_hosts"] == 0, 60, "the host to be idle")
        sent = time.time()
        inst.send_event("poke", {})
        out = wait_until(
            lambda: (s := inst.status())["status"] == "complete" and s["output"], 120,
            "completion", interval=0.01,  # latency is stamped in the sandbox, not here
        )
        if i:  # the first sample warms up imports and the host
            latencies.append(out["resumed_at"] - sent)
            pids.append(out["pid"])
    return latencies, pids


def run(kind: str, n: int, url: str, writer: str | None = None) -> dict:
    cold = kind == "cold"
    tuning = {"hibernate_after": 0} if cold else {}
    if writer:
        tuning["journal_writer"] = writer
    engine = Engine.start(database_url=url, name=f"bench-{kind}-{os.getpid()}", **tuning)
    try:
        engine.push_tenant(kind, pushed_tenant_dir("wake", kind))
        return summary_ms(activation_samples(engine, kind, n, cold)[0])
    finally:
        engine.stop()


def main() -> None:
    url = database_url()
    load_before = [round(x, 2) for x in os.getloadavg()]
    warm = run("warm", arg("--warm", 50), url)
    cold = run("cold", arg("--cold", 10), url)
    writers = {}
    for writer in arg("--journal-writers", "", str).split(","):
        if writer:  # the warm path again, with that writer (SQLite)
            writers[writer] = run("warm", arg("--warm", 50), database_url(), writer)
    emit("activation", {
        "journal": url.split(":")[0],
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "tenant_code": "pushed",
        "warm": warm, "warm_target_p50_ms": 3,
        "cold": cold, "cold_target_ms": 1200,
        **({"warm_by_journal_writer": writers} if writers else {}),
    })


if __name__ == "__main__":
    main()
