"""Peer benchmark: DBOS Transact running 3-step workflows on a SQLite system database.

Same workload as `bench/throughput.py` (`three_step`): a workflow of 3 trivial steps
(step i returns i + 1; the workflow returns their sum, 6). DBOS is configured with
its defaults, except for the system database: SQLite in a fresh temp directory.

After a warm-up of 200 workflows, runs (interleaved, `--runs` of each):

- `one_by_one_per_s`: `DBOS.start_workflow` per instance, each with its own workflow
  id (as a webhook handler would), then wait until all are complete.
- `batches_per_s`: DBOS has no call that starts many workflows at once. Closest
  equivalent of our `create_batch`: `DBOSClient.enqueue_in_transaction` of 100
  workflows in one transaction (one commit per group of 100) onto a default DBOS
  `Queue`, which this process dequeues and runs.

Rate = N / (first create -> last completion). Completion is observed with each
handle's `get_result` (a future for `start_workflow`; for the queue, a poll of the
system database every 5 ms, like our benchmark's journal poll).

Runs inside `.venv-dbos` (see bench/peers/setup_dbos.sh). Prints one JSON object.

Usage: .venv-dbos/bin/python bench/peers/dbos_three_step.py [--workflows 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from importlib.metadata import version

import sqlalchemy as sa
from dbos import DBOS, DBOSClient, DBOSConfig, SetWorkflowID

GROUP = 100
POLL_S = 0.005
QUEUE = "bench_queue"


@DBOS.step()
def step(i: int) -> int:
    return i + 1


@DBOS.workflow()
def three_steps() -> int:
    return step(0) + step(1) + step(2)


def one_by_one(run: str, n: int) -> float:
    start = time.perf_counter()
    handles = []
    for i in range(n):
        with SetWorkflowID(f"{run}-{i}"):
            handles.append(DBOS.start_workflow(three_steps))
    for h in handles:
        assert h.get_result() == 6
    return n / (time.perf_counter() - start)


def batches(client: DBOSClient, engine: sa.Engine, run: str, n: int) -> float:
    start = time.perf_counter()
    handles = []
    for b in range(0, n, GROUP):
        with engine.begin() as conn:  # one transaction per group of 100
            for i in range(b, min(n, b + GROUP)):
                options = {"queue_name": QUEUE, "workflow_name": three_steps.__qualname__,
                           "workflow_id": f"{run}-{i}"}
                handles.append(client.enqueue_in_transaction(conn, options))
    for h in handles:
        assert h.get_result(polling_interval_sec=POLL_S) == 6
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workflows", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="dbos-bench-")
    url = f"sqlite:///{os.path.join(tmp, 'dbos_system.sqlite')}"
    config: DBOSConfig = {"name": "dbos-three-step-bench", "system_database_url": url}
    DBOS(config=config)
    DBOS.launch()
    DBOS.register_queue(QUEUE)  # defaults: no concurrency limit, 1 s polling interval
    client = DBOSClient(system_database_url=url)
    engine = sa.create_engine(url, connect_args={"timeout": 30})  # the caller's own connection
    try:
        one_by_one("warmup-a", 100)
        batches(client, engine, "warmup-b", 100)
        rates: dict[str, list[float]] = {"one_by_one_per_s": [], "batches_per_s": []}
        for r in range(args.runs):
            rates["one_by_one_per_s"].append(one_by_one(f"one{r}", args.workflows))
            rates["batches_per_s"].append(batches(client, engine, f"batch{r}", args.workflows))
    finally:
        client.destroy()
        engine.dispose()
        DBOS.destroy()
        shutil.rmtree(tmp, ignore_errors=True)

    print(json.dumps({
        "benchmark": "dbos_three_step",
        "dbos_version": version("dbos"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "database": "sqlite",
        "workflows_per_run": args.workflows,
        **{k: {"runs": [round(x, 1) for x in v], "median": round(statistics.median(v), 1)}
           for k, v in rates.items()},
        "method": (
            "workflow of 3 @DBOS.step calls (returns 1+2+3); warm-up 200 (100 each way); "
            "runs interleaved; rate = N / (first create -> last completion). "
            "one_by_one: DBOS.start_workflow per instance with SetWorkflowID, wait on each "
            "handle's get_result. batches: no batch-start API in DBOS; groups of 100 "
            "DBOSClient.enqueue_in_transaction calls, one SQLAlchemy transaction per group, "
            "onto a default Queue run by this process; completion via get_result polling "
            f"every {POLL_S * 1000:g} ms."
        ),
        "settings": "DBOS defaults (executor: ThreadPoolExecutor, max_executor_threads unset "
                    "= unbounded; sys DB pool_size 20; Queue: no concurrency limit, "
                    "polling_interval_sec 1.0); system DB: SQLite file in a fresh temp dir",
    }))


if __name__ == "__main__":
    main()
