"""Replay of an instance with many completed steps.

An instance runs N steps and suspends in a wait. Each sample makes it due
again through the public API (pause, then resume) and times one activation in
this process: load the instance and its N step rows, replay `run()` through N
recorded steps, reach the wait again and suspend (two small commits). Before the
samples, what the process holds is frozen for the garbage collector, as a host
process does once started.

Usage: python bench/replay.py [--steps 10000] [--runs 7] [--database-url URL]
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, database_url, emit  # noqa: E402
from bench.workflows import LongReplay  # noqa: E402
from dynwf_ray.activation import activate  # noqa: E402
from dynwf_ray.binding import WorkflowBinding  # noqa: E402
from dynwf_ray.journal import Journal  # noqa: E402


def main() -> None:
    steps = arg("--steps", 10000)
    runs = arg("--runs", 7)
    url = database_url()
    journal = Journal(url)
    journal.save_code("r", "v", "bench", b"", time.time())
    handle = WorkflowBinding(journal, "r").create(id="long", params={"steps": steps})

    def activation() -> tuple[str, float, float]:
        (claim,) = journal.claim_due(time.time(), 1, "bench", 600, tenant_id="r")
        t0 = time.perf_counter()
        journal.load_activation(claim.pk, claim.token)
        t1 = time.perf_counter()
        outcome = asyncio.run(activate(journal, claim.pk, claim.token, LongReplay, lease_ttl=600))
        return outcome, t1 - t0, time.perf_counter() - t1

    first = time.perf_counter()
    outcome, _, _ = activation()  # executes the N steps, one durable commit each
    first = time.perf_counter() - first
    assert outcome == "suspended", outcome
    # As a host process does once started (host.py): what this process holds now is
    # frozen, so the collector's full passes during a replay skip it.
    gc.freeze()
    loads, replays = [], []
    for _ in range(runs):
        handle.pause()
        handle.resume()  # due now: the next activation replays everything and waits again
        outcome, load, replay = activation()
        assert outcome == "suspended", outcome
        loads.append(load)
        replays.append(replay)
    assert len(journal.list_steps(journal.get_instance("r", "long").pk)) == steps + 1
    emit("replay", {
        "journal": url.split(":")[0],
        "steps": steps,
        "first_run_s": round(first, 3),
        "load_rows_ms": round(statistics.median(loads) * 1000, 2),
        "activation_with_replay_ms": round(statistics.median(replays) * 1000, 2),
        "runs_ms": [round(r * 1000, 2) for r in replays],
        "target_ms": 100,
    })


if __name__ == "__main__":
    main()
