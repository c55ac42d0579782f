"""Per-tenant code: push time, activation of pushed tenants, memory per warm host, many tenants.

- `push_small_tenant_s`: pushing a small new package (build, validate in a new
  runtime env worker, store); median over distinct contents.
- `activation_warm` / `activation_cold`: an instance of a *pushed* tenant is
  suspended in wait_for_event; we send the event and time until its next step
  runs in a host (as bench/activation.py, but hosts run in the tenant's
  runtime env). Cold = hibernate_after 0, a new actor in an existing env.
- `first_activation_pip_env_s`: globex's first activation when its pip env must
  be built (a push built it before; a fresh Ray session must build it again).
- `warm_host_uss_mb`: unique memory (USS) of each host process (hosts of every
  tenant share them).
- `registered_tenants`: N tenants pushed with the same content (validated once,
  stored once per tenant), each with one instance in flight (queued), no
  scheduler running: journal size, and how long the scheduler's queries take
  with that many instances. Idle tenants cost zero processes by construction:
  nothing runs for an instance until it is due and claimed.

Usage: python bench/tenants.py [--samples 20] [--tenants 100000] [--registered-only] [--database-url URL]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402  (installed with ray[default])

from bench._common import arg, database_url, emit, summary_ms  # noqa: E402
from bench.activation import activation_samples  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402
from dynwf_ray.binding import WorkflowBinding  # noqa: E402
from dynwf_ray.journal import Journal  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def registered_tenants(n: int) -> dict:
    url = database_url()
    journal = Journal(url)
    directory = pushed_tenant_dir("wake", "shared")
    engine = Engine.start(database_url=url, name="bench-many", max_hosts=1)
    try:
        engine.push_tenant("t0", directory)  # validates once
        start = time.perf_counter()
        for i in range(1, n):
            engine.push_tenant(f"t{i}", directory)  # same content: no new validation
        push_rate = (n - 1) / (time.perf_counter() - start)
    finally:
        engine.stop()
    start = time.perf_counter()
    for i in range(n):
        WorkflowBinding(journal, f"t{i}").create(id="inflight")
    create_rate = n / (time.perf_counter() - start)
    claim = []
    for _ in range(20):
        t0 = time.perf_counter()
        journal.next_wake_at()
        claim.append(time.perf_counter() - t0)
    size = None
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        size = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    return {
        "tenants": n,
        "push_same_content_per_s": round(push_rate),
        "create_one_each_per_s": round(create_rate),
        "instances_in_flight": journal.count_by_status().get("queued", 0),
        "next_wake_query": summary_ms(claim),
        "journal_bytes": size,
        "host_processes_for_idle_tenants": 0,
    }


def main() -> None:
    samples = arg("--samples", 20)
    n_tenants = arg("--tenants", 100000)
    if "--registered-only" in sys.argv:
        emit("tenants", {"registered_tenants": registered_tenants(n_tenants)})
        return
    url = database_url()
    engine = Engine.start(database_url=url, name="bench-tenants", hibernate_after=600, max_hosts=4)
    try:
        pushes = []
        for i in range(5):
            d = pushed_tenant_dir("wake", f"push-{i}-{time.time_ns()}")
            t0 = time.perf_counter()
            engine.push_tenant(f"p{i}", d)
            pushes.append(time.perf_counter() - t0)
        engine.push_tenant("warm", pushed_tenant_dir("wake", "warm"))
        warm, _ = activation_samples(engine, "warm", samples, cold=False)
        # (the pid a step reports is its sandbox's, in the sandbox's own PID namespace)
        pids = {h["host_pid"] for h in engine.sandboxes()}
        uss = [psutil.Process(p).memory_full_info().uss / 2**20 for p in pids if psutil.pid_exists(p)]
        engine.set_tenant_policy("globex", pip=True)  # pip is the platform's grant
        t0 = time.perf_counter()
        engine.push_tenant("globex", str(REPO / "tenants" / "globex"))
        globex_push = time.perf_counter() - t0
    finally:
        engine.stop()
    engine = Engine.start(database_url=url, name="bench-cold", hibernate_after=0, max_hosts=4)
    try:
        engine.push_tenant("cold", pushed_tenant_dir("wake", "cold"))
        cold, _ = activation_samples(engine, "cold", max(3, samples // 4), cold=True)
    finally:
        engine.stop()
    emit("tenants", {
        "journal": url.split(":")[0],
        "push_small_tenant_s": round(statistics.median(pushes), 3),
        "push_runs_s": [round(p, 3) for p in pushes],
        "push_globex_with_pip_s": round(globex_push, 2),
        "activation_warm": warm and summary_ms(warm),
        "activation_warm_target_p50_ms": 5,
        "activation_cold": summary_ms(cold),
        "activation_cold_target_ms": 1200,
        "warm_host_uss_mb": [round(u, 1) for u in uss],
        "registered_tenants": registered_tenants(n_tenants),
    })


if __name__ == "__main__":
    main()
