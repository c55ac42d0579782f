"""Creation and completion rates, and the same workload on DBOS Transact and Restate.

- `create_batch_per_s`: instances created per second with `create_batch` (100 per
  call), measured on the journal with no scheduler running, so nothing competes.
- `three_step`: 3-step workflows of a *pushed* tenant (a small directory this
  script writes; its steps run in sandboxes) run to completion by an engine with
  its default configuration: instances / (last completion - first create), after a
  warm-up. Completion is watched by polling the last instance created, then one
  count (counting every 5 ms took 15-20 % of the rate on 2 cores:
  `results/ab-watch-1.json`). Runs interleaved: `one_by_one_per_s` (`create` per instance, as a
  webhook handler creates work as it comes) and `batches_per_s` (`create_batch`
  of 100), and `twenty_tenants_per_s`: 20 pushed tenants at once, instances
  created one by one in turn.
- `one_by_one_create_call`: how long each `create` of the one-by-one runs took (all
  runs together): what the creating caller waits while the engine runs the instances
  created before it.
- `*_cold_starts_per_run`: hosts started during each run (after the warm-up).
- `one_by_one_profile`: one more one-by-one run, of 3,000, and where its time went: the
  machine's busy cores, the CPU each workflow cost by kind of process (from /proc:
  this creating process, the host processes, the sandboxes, the scheduler, the
  loader...), the journal writes and commits per workflow, how long an instance
  waited (its creation to its first step) and ran (its first step to its completion),
  and from that the activations in flight on average (Little's law: the rate times how
  long one ran); on SQLite also `sqlite_writer_lock`, the
  share of the run during which SQLite's writer lock was held, by the creating process
  (a commit per `create`) and by the host processes (group commits: theirs, or the
  machine writer's that commits for them): how near the rate is to what the lock lets
  through.
- `dbos`: `bench/peers/dbos_three_step.py` run in `.venv-dbos` (made by
  `bench/peers/setup_dbos.sh`) when it exists, with the same counts, and the
  ratios ours / DBOS of the medians.
- `restate`: `bench/peers/restate_three_step.py` run in `.venv-restate` (made by
  `bench/peers/setup_restate.sh`: the Restate server and its Python SDK) when it
  exists, with the same counts, and the ratios ours / Restate (our batches against
  its groups of 100 requests at once: it has no batch call).
- `--max-hosts N`, `--max-activations N`, `--host-concurrency N`, `--host-processes N`,
  `--journal-writer machine|process` add the same figures for an engine tuned that
  way, beside the default ones (`three_step_tuned`).

Usage: python bench/throughput.py [--creates 10000] [--workflows 300] [--one-by-one 200]
       [--runs 3] [--max-hosts N] [--max-activations N] [--host-concurrency N] [--host-processes N]
       [--journal-writer machine|process] [--no-dbos] [--no-restate] [--database-url URL]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (  # noqa: E402
    RUN, arg, busy_cores, busy_jiffies, cpu_by_kind, cpu_per_workflow, database_url, emit, summary_ms,
    wait_until,
)
from bench.workflows import ThreeSteps, pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402
from dynwf_ray.binding import WorkflowBinding  # noqa: E402
from dynwf_ray.journal import Journal  # noqa: E402
from dynwf_ray.package import package_class  # noqa: E402
from dynwf_ray.types import TERMINAL  # noqa: E402


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
            wf.create_batch([{"id": f"{RUN}-i{b}-{i}", "params": {"n": i}} for i in range(100)])
        rates.append(total / (time.perf_counter() - start))
    journal.close()
    return rates


def run_workflows(engine: Engine, tenants: list[str], run: str, n: int, batch: bool,
                  waits: list[float] | None = None) -> float:
    """Create n instances (in batches of 100, or one by one, tenants in turn); rate =
    n / (last completion - first create). One by one, `waits` gets how long each
    `create` took: what a caller such as a webhook handler waits while the engine runs
    the instances created before.

    Completion is watched cheaply, so that watching takes little of the CPU the engine
    runs on: the last instance created is polled by id (one row), and only once it has
    ended are the tenants' instances counted (a scan), until all n have completed."""
    bindings = [engine.binding(t) for t in tenants]
    done = _complete(engine, tenants)
    start = time.perf_counter()
    if batch:
        for b in range(0, n, 100):
            wf = bindings[(b // 100) % len(bindings)]
            wf.create_batch([{"id": f"{RUN}-{run}-{i}"} for i in range(b, min(n, b + 100))])
        last = bindings[((n - 1) // 100) % len(bindings)].get(f"{RUN}-{run}-{n - 1}")
    else:
        for i in range(n):
            began = time.perf_counter()
            bindings[i % len(bindings)].create(id=f"{RUN}-{run}-{i}")
            if waits is not None:
                waits.append(time.perf_counter() - began)
        last = bindings[(n - 1) % len(bindings)].get(f"{RUN}-{run}-{n - 1}")
    wait_until(lambda: last.status()["status"] in TERMINAL, 600, "the last workflow to end",
               interval=0.005)
    wait_until(
        lambda: _complete(engine, tenants) == done + n, 600, "workflows to complete", interval=0.005,
    )
    return n / (time.perf_counter() - start)


def _complete(engine: Engine, tenants: list[str]) -> int:
    if len(tenants) == 1:
        return engine.journal.count_by_status(tenants[0]).get("complete", 0)
    return engine.journal.count_by_status().get("complete", 0)


def three_step(url: str, one_by_one: int, batched: int, runs: int, **tuning) -> dict:
    engine = Engine.start(database_url=url, name=f"bench-throughput-{os.getpid()}", **tuning)
    try:
        engine.push_tenant("tp", pushed_tenant_dir("three"))
        many = [f"tp{i}" for i in range(20)]
        for t in many:
            engine.push_tenant(t, pushed_tenant_dir("three", t))
        run_workflows(engine, ["tp"], "warmup", 200, batch=True)
        run_workflows(engine, many, "warmup", 200, batch=False)
        kinds = {
            "one_by_one": (["tp"], one_by_one, False),
            "batches": (["tp"], batched, True),
            "twenty_tenants": (many, one_by_one, False),
        }
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        cold: dict[str, list[int]] = {k: [] for k in kinds}
        create_waits: list[float] = []
        for r in range(runs):
            for kind, (tenants, n, batch) in kinds.items():
                before = engine.stats()["cold_starts"]
                waits = create_waits if kind == "one_by_one" else None
                rates[kind].append(run_workflows(engine, tenants, f"{kind}{r}", n, batch, waits))
                cold[kind].append(engine.stats()["cold_starts"] - before)
        profile = one_by_one_profile(engine, ["tp"], 3000)
        stats = engine.stats()
    finally:
        engine.stop()
    out: dict = {"config": tuning or "default"}
    for kind, (_, n, _) in kinds.items():
        out[f"{kind}_per_s"] = round(statistics.median(rates[kind]), 1)
        out[f"{kind}_runs_per_s"] = [round(r, 1) for r in rates[kind]]
        out[f"{kind}_instances"] = n
        out[f"{kind}_cold_starts_per_run"] = cold[kind]
    out["one_by_one_create_call"] = summary_ms(create_waits)
    out.update({
        "activations": stats["activations"], "cold_starts": stats["cold_starts"],
        "pool": stats["pool"], "journal_writes": stats["journal_writes"],
        "journal_writer": stats["journal_writer"],
        "one_by_one_profile": profile,
    })
    return out


def one_by_one_profile(engine: Engine, tenants: list[str], n: int) -> dict:
    """A run of n created one by one, and where its time went (see the module's
    docstring). The hosts' counters reach `stats()` in reports up to a second old, so
    the run is framed by 1.5 s pauses (nothing writes then)."""
    def counters() -> dict[str, float]:
        stats = engine.stats()
        mine, hosts = engine.journal.write_stats(), stats["journal_writes"]
        machine = stats["journal_writer"] or {}  # the hosts' commits, when it makes them
        return {
            "mine_held": mine.get("sqlite_lock_held_s", 0.0),
            "mine_commits": mine.get("sqlite_lock_begins", 0),
            "hosts_held": hosts.get("sqlite_lock_held_s", 0.0) + machine.get("sqlite_lock_held_s", 0.0),
            "commits": hosts.get("group_commits", 0) + machine.get("group_commits", 0),
            "writes": hosts.get("group_writes", 0) + machine.get("group_writes", 0),
        }

    time.sleep(1.5)
    before, ticks, began = counters(), cpu_by_kind(), busy_jiffies()
    rate = run_workflows(engine, tenants, "profile", n, batch=False)
    cores, cpu = busy_cores(began, busy_jiffies()), cpu_per_workflow(ticks, cpu_by_kind(), n)
    time.sleep(1.5)
    delta = {k: v - before[k] for k, v in counters().items()}
    # When each instance's first step began (its activation had just started) and ended.
    spans = [(i.created_at, min(s.started_at for s in engine.journal.list_steps(i.pk)), i.updated_at)
             for i in engine.journal.list_instances(tenants[0], "complete", n)
             if i.instance_id.startswith(f"{RUN}-profile-")]
    running = [end - first for _, first, end in spans]
    seconds = n / rate
    out = {
        "what": f"{n} created one by one",
        "per_s": round(rate, 1),
        "busy_cores": round(cores, 2),
        "cpu_us_per_workflow": cpu,
        "host_writes_per_workflow": round(delta["writes"] / n, 2),
        "host_commits_per_workflow": round(delta["commits"] / n, 3),
        "activations_in_flight": round(rate * statistics.mean(running), 1) if running else None,
        "first_step_to_complete": summary_ms(running),
        "create_to_first_step": summary_ms([first - created for created, first, _ in spans]),
    }
    if engine.journal.is_sqlite:
        out["sqlite_writer_lock"] = {
            "held_share": round((delta["mine_held"] + delta["hosts_held"]) / seconds, 3),
            "creating_process": {"held_s": round(delta["mine_held"], 3), "commits": int(delta["mine_commits"]),
                                 "held_us_per_commit": round(delta["mine_held"] / max(delta["mine_commits"], 1) * 1e6)},
            "host_processes": {"held_s": round(delta["hosts_held"], 3), "commits": int(delta["commits"]),
                               "held_us_per_commit": round(delta["hosts_held"] / max(delta["commits"], 1) * 1e6)},
        }
    return out


def peer(name: str, one_by_one: int, runs: int) -> dict | None:
    """The same workload on a peer (`bench/peers/<name>_three_step.py`, in its own
    virtualenv `.venv-<name>`), when that virtualenv exists."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = os.path.join(root, f".venv-{name}", "bin", "python")
    if not os.path.exists(python):
        return None
    out = subprocess.run(
        [python, os.path.join(root, "bench", "peers", f"{name}_three_step.py"),
         "--workflows", str(one_by_one), "--runs", str(runs)],
        capture_output=True, text=True, check=True, timeout=900,
    ).stdout
    return json.loads(out)


def main() -> None:
    creates = arg("--creates", 10000)
    workflows = arg("--workflows", 300)
    one_by_one = arg("--one-by-one", 200)
    runs = arg("--runs", 3)
    tuning = {k: v for k, v in (("max_hosts", arg("--max-hosts", None)),
                                ("max_activations", arg("--max-activations", None)),
                                ("host_concurrency", arg("--host-concurrency", None)),
                                ("host_processes", arg("--host-processes", None)),
                                ("journal_writer", arg("--journal-writer", None, str)))
              if v is not None}
    load_before = [round(x, 2) for x in os.getloadavg()]
    created = create_rate(database_url(), creates)
    url = database_url()
    ours = three_step(url, one_by_one, workflows, runs)
    figures = {
        "journal": url.split(":")[0],
        "create_batch_per_s": round(statistics.median(created)),
        "create_batch_runs_per_s": [round(r) for r in created],
        "create_target_per_s": 3000,
        "tenant_code": "pushed",
        "three_step": ours,
        "three_step_target_per_s": 1000,
    }
    if tuning:
        figures["three_step_tuned"] = three_step(database_url(), one_by_one, workflows, runs, **tuning)
    # Each peer's figures, and ours / theirs (our batches against its closest call).
    for name, batches, target in (("dbos", "batches_per_s", 15), ("restate", "concurrent_100_per_s", "ahead (> 1)")):
        theirs = None if f"--no-{name}" in sys.argv else peer(name, one_by_one, runs)
        if theirs is not None:
            figures[name] = theirs
            figures[f"ratio_vs_{name}"] = {
                "one_by_one": round(ours["one_by_one_per_s"] / theirs["one_by_one_per_s"]["median"], 2),
                "batches": round(ours["batches_per_s"] / theirs[batches]["median"], 2),
                "target": target,
            }
    figures["load_before"] = load_before
    figures["load_after"] = [round(x, 2) for x in os.getloadavg()]
    emit("throughput", figures)


if __name__ == "__main__":
    main()
