"""Timer lateness when many sleeping instances are due in the same second.

N instances each `sleep_until` the same moment T (chosen so they are all
asleep, hibernated, before T). For each, lateness = when its next step ran in
a host - T. This is end-to-end: the scheduler must claim and activate all N,
so the tail is bounded by activation throughput, not by timer detection.
`first_due_claimed_ms` is the lateness of the earliest resumption: how soon
the scheduler reacted to the timer.

The tenant's code is pushed and the engine runs its default configuration
(`--max-hosts N`, `--max-activations N` and `--journal-writer machine|process` tune
it, and are reported).

Usage: python bench/timers.py [--instances 10000] [--max-hosts N] [--max-activations N]
       [--journal-writer machine|process] [--database-url URL]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import RUN, arg, database_url, emit, summary_ms, wait_until  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402


def main() -> None:
    n = arg("--instances", 10000)
    tuning = {k: v for k, v in (("max_hosts", arg("--max-hosts", None)),
                                ("max_activations", arg("--max-activations", None)),
                                ("journal_writer", arg("--journal-writer", None, str))) if v is not None}
    url = database_url()
    engine = Engine.start(database_url=url, name=f"bench-timers-{os.getpid()}", **tuning)
    try:
        tenant = f"timers{RUN}"
        engine.push_tenant(tenant, pushed_tenant_dir("timer"))
        wf = engine.binding(tenant)
        lead = max(20.0, n / 250)  # time for every instance to reach its sleep first
        due = time.time() + lead
        start = time.time()
        for b in range(0, n, 100):
            wf.create_batch([{"id": f"t{i}", "params": {"until": due}} for i in range(b, min(n, b + 100))])

        def asleep() -> bool:
            counts = engine.journal.count_by_status(tenant)
            return counts.get("waiting", 0) + counts.get("complete", 0) == n

        wait_until(asleep, lead + 600, "every instance to reach its sleep", interval=0.05)
        asleep_after = time.time() - start
        if asleep_after > lead:
            raise SystemExit(f"instances took {asleep_after:.1f} s to fall asleep; raise the lead")
        wait_until(
            lambda: engine.journal.count_by_status(tenant).get("complete", 0) == n, 3600,
            # lateness is stamped by each instance; counting 10,000 rows often would
            # take CPU from the hosts draining them
            "every instance to resume", interval=1.0,
        )
        late = [wf.get(f"t{i}").status()["output"]["resumed_at"] - due for i in range(n)]
    finally:
        engine.stop()
    emit("timers", {
        "journal": url.split(":")[0],
        "instances": n,
        "config": tuning or "default",
        "seconds_to_put_all_to_sleep": round(asleep_after, 2),
        "lateness": summary_ms(late),
        "first_due_claimed_ms": round(min(late) * 1000, 2),
        "target_p99_ms": 5000,
    })


if __name__ == "__main__":
    main()
