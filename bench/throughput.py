"""Creation and completion rates.

- `create_batch_per_s`: instances created per second with `create_batch` (100 per
  call), measured on the journal with no scheduler running, so nothing competes.
- `three_step`: 3-step workflows of a *pushed* tenant (a small directory this
  script writes; its steps run in sandboxes) run to completion by an engine with
  its default configuration: instances / (last completion - first create), after a
  warm-up so hosts are warm. Two ways of creating them, runs interleaved:
  `one_by_one_per_s` (`create` per instance, as a caller creating work as it comes)
  and `batches_per_s` (`create_batch` of 100).
- `--max-hosts N` and/or `--warm-pool-size N` add the same figures for an engine
  tuned that way, reported beside the default ones under `three_step_tuned`.
- `*_cold_starts_per_run`: hosts started during each run (after the warm-up, any
  host started is one that was deactivated meanwhile).

Usage: python bench/throughput.py [--creates 10000] [--workflows 300] [--one-by-one 100]
       [--runs 3] [--max-hosts N] [--warm-pool-size N] [--database-url URL]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, database_url, emit, wait_until  # noqa: E402
from bench.workflows import ThreeSteps, pushed_tenant_dir  # noqa: E402
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


def run_workflows(engine: Engine, run: str, n: int, batch: bool) -> float:
    """Create n instances (in batches of 100, or one by one); rate = n / (last completion - first create)."""
    wf = engine.binding("tp")
    done = engine.journal.count_by_status("tp").get("complete", 0)
    start = time.perf_counter()
    if batch:
        for b in range(0, n, 100):
            wf.create_batch([{"id": f"{run}-{i}"} for i in range(b, min(n, b + 100))])
    else:
        for i in range(n):
            wf.create(id=f"{run}-{i}")
    wait_until(
        lambda: engine.journal.count_by_status("tp").get("complete", 0) == done + n,
        600, "workflows to complete", interval=0.005,
    )
    return n / (time.perf_counter() - start)


def three_step(url: str, one_by_one: int, batched: int, runs: int, **tuning) -> dict:
    engine = Engine.start(database_url=url, name=f"bench-throughput-{os.getpid()}", **tuning)
    try:
        engine.push_tenant("tp", pushed_tenant_dir("three"))
        run_workflows(engine, "warmup", 200, batch=True)  # start the hosts
        rates: dict[str, list[float]] = {"one_by_one": [], "batches": []}
        cold: dict[str, list[int]] = {"one_by_one": [], "batches": []}  # hosts started per run
        for r in range(runs):
            for kind, n in (("one_by_one", one_by_one), ("batches", batched)):
                before = engine.stats()["cold_starts"]
                rates[kind].append(run_workflows(engine, f"{kind}{r}", n, batch=kind == "batches"))
                cold[kind].append(engine.stats()["cold_starts"] - before)
        stats = engine.stats()
    finally:
        engine.stop()
    return {
        "config": tuning or "default",
        "one_by_one_per_s": round(statistics.median(rates["one_by_one"]), 1),
        "one_by_one_runs_per_s": [round(r, 1) for r in rates["one_by_one"]],
        "one_by_one_instances": one_by_one,
        "one_by_one_cold_starts_per_run": cold["one_by_one"],
        "batches_per_s": round(statistics.median(rates["batches"]), 1),
        "batches_runs_per_s": [round(r, 1) for r in rates["batches"]],
        "batches_instances": batched,
        "batches_cold_starts_per_run": cold["batches"],
        "activations": stats["activations"],
        "cold_starts": stats["cold_starts"],
    }


def main() -> None:
    creates = arg("--creates", 10000)
    workflows = arg("--workflows", 300)
    one_by_one = arg("--one-by-one", 100)
    runs = arg("--runs", 3)
    tuning = {k: v for k, v in (("max_hosts", arg("--max-hosts", None)),
                                ("warm_pool_size", arg("--warm-pool-size", None))) if v is not None}
    load_before = [round(x, 2) for x in os.getloadavg()]
    created = create_rate(database_url(), creates)
    url = database_url()
    figures = {
        "journal": url.split(":")[0],
        "create_batch_per_s": round(statistics.median(created)),
        "create_batch_runs_per_s": [round(r) for r in created],
        "create_target_per_s": 3000,
        "tenant_code": "pushed",
        "three_step": three_step(url, one_by_one, workflows, runs),
        "three_step_target_per_s": 500,
    }
    if tuning:
        figures["three_step_tuned"] = three_step(database_url(), one_by_one, workflows, runs, **tuning)
    figures["load_before"] = load_before
    figures["load_after"] = [round(x, 2) for x in os.getloadavg()]
    emit("throughput", figures)


if __name__ == "__main__":
    main()
