"""Creation and completion rates.

- `create_batch_per_s`: instances created per second with `create_batch` (100 per
  call), measured on the journal with no scheduler running, so nothing competes.
- `three_step_workflows_per_s`: 3-step workflows created in batches and run to
  completion by a running engine: instances / (last completion - first create),
  after a warm-up batch so hosts are warm.

Usage: python bench/throughput.py [--creates 10000] [--workflows 2000] [--max-hosts 4] [--database-url URL]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, database_url, emit, wait_until  # noqa: E402
from bench.workflows import ThreeSteps  # noqa: E402
from dynwf_ray import Engine  # noqa: E402
from dynwf_ray.binding import WorkflowBinding  # noqa: E402
from dynwf_ray.journal import Journal  # noqa: E402
from dynwf_ray.package import package_class  # noqa: E402


def create_rate(url: str, total: int) -> list[float]:
    journal = Journal(url)
    version, kind, blob = package_class(ThreeSteps)
    rates = []
    for run in range(3):
        tenant = f"create{run}"
        journal.save_code(tenant, version, kind, blob, time.time())
        wf = WorkflowBinding(journal, tenant)
        start = time.perf_counter()
        for b in range(total // 100):
            wf.create_batch([{"id": f"i{b}-{i}", "params": {"n": i}} for i in range(100)])
        rates.append(total / (time.perf_counter() - start))
    journal.close()
    return rates


def run_workflows(engine: Engine, run: str, n: int) -> float:
    """Create n instances in batches; rate = n / (last completion - first create)."""
    wf = engine.binding("tp")
    done = engine.journal.count_by_status("tp").get("complete", 0)
    start = time.perf_counter()
    for b in range(0, n, 100):
        wf.create_batch([{"id": f"{run}-{i}"} for i in range(b, min(n, b + 100))])
    wait_until(
        lambda: engine.journal.count_by_status("tp").get("complete", 0) == done + n,
        600, "workflows to complete", interval=0.005,
    )
    return n / (time.perf_counter() - start)


def main() -> None:
    creates = arg("--creates", 10000)
    workflows = arg("--workflows", 2000)
    max_hosts = arg("--max-hosts", 4)
    url = database_url()
    created = create_rate(url, creates)

    url = database_url()
    engine = Engine.start(database_url=url, name="bench-throughput", max_hosts=max_hosts, hibernate_after=600)
    try:
        engine.register("tp", ThreeSteps)
        run_workflows(engine, "warmup", 200)  # start every host
        rates = [run_workflows(engine, f"run{r}", workflows) for r in range(3)]
        stats = engine.stats()
    finally:
        engine.stop()
    emit("throughput", {
        "journal": url.split(":")[0],
        "create_batch_per_s": round(statistics.median(created)),
        "create_batch_runs_per_s": [round(r) for r in created],
        "create_target_per_s": 3000,
        "three_step_workflows_per_s": round(statistics.median(rates), 1),
        "three_step_runs_per_s": [round(r, 1) for r in rates],
        "three_step_target_per_s": 500,
        "max_hosts": max_hosts,
        "activations": stats["activations"],
        "cold_starts": stats["cold_starts"],
    })


if __name__ == "__main__":
    main()
