"""The replay check: how long `move_to_version(v, check=True)` takes for a long history.

A pushed tenant's instance records `--steps` steps and then waits for an event, on
the default engine. Then a second version of the same code is pushed and the
instance is moved to it with the check (its whole history replayed on the new
version in a sandbox of it, running no step), `--runs` times (back and forth
between the two versions), each timed from the call to its return. The check
includes a cold host start for the version checked against; `engine.migrate`
dry runs on the same instance are timed too.

Usage: python bench/replay_check.py [--steps 10000] [--runs 3] [--database-url URL]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, database_url, emit, wait_until  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402


def main() -> None:
    steps, runs = arg("--steps", 10_000), arg("--runs", 3)
    url = database_url()
    engine = Engine.start(database_url=url, name=f"bench-replay-check-{os.getpid()}")
    try:
        v1 = engine.push_tenant("long", pushed_tenant_dir("long", "v1"))
        wf = engine.binding("long")
        handle = wf.create(id="long", params={"steps": steps})
        began = time.monotonic()
        wait_until(lambda: handle.status()["status"] == "waiting", 3600, "the steps", interval=0.5)
        recorded_s = time.monotonic() - began
        v2 = engine.push_tenant("long", pushed_tenant_dir("long", "v2"))
        moves, migrations = [], []
        for i in range(runs):
            target = v2 if i % 2 == 0 else v1
            began = time.perf_counter()
            handle.move_to_version(target)
            moves.append(time.perf_counter() - began)
            began = time.perf_counter()
            report = engine.migrate("long", to=v1 if target == v2 else v2)
            migrations.append(time.perf_counter() - began)
            assert report["clean"] == ["long"], report
        handle.send_event("end")
        wait_until(lambda: handle.status()["status"] == "complete", 600, "the end", interval=0.5)
    finally:
        engine.stop()
    emit("replay_check", {
        "journal": url.split(":")[0], "config": "default", "steps": steps,
        "recording_s": round(recorded_s, 1),
        "move_to_version_check_s": [round(s, 2) for s in moves],
        "move_to_version_check_median_s": round(statistics.median(moves), 2),
        "migrate_dry_run_s": [round(s, 2) for s in migrations],
        "migrate_dry_run_median_s": round(statistics.median(migrations), 2),
    })


if __name__ == "__main__":
    main()
