"""SQLite's writer lock shared by 1 to N processes: the journal's writes alone.

`bench/scale_out.py` runs the whole engine, so on a machine with fewer cores than host
processes it measures the cores as much as the journal. This benchmark keeps only the
journal: each of `--processes` child processes stands for a host process, with
`--slots` activations at a time (asyncio), each making the journal calls of one
3-step workflow through the group commit as a host does (a batched claim with its
load, three step records, the end), with `--step-ms` of waiting before each step
where a sandbox would run it. No Ray, no sandboxes: what moves with the number of
processes is how they share the file (`dialect._WriterLock`, `GroupCommit`).

Each process has a tenant of its own with `--workflows` / N instances, created before
the processes start; all start together. Per process count, medians of `--runs` runs,
each on a fresh journal file:

- `workflows_per_s`: all instances / (the last process done - the start), once the
  journal says every one of them completed;
- `commits` (the processes' group commits), `writes_per_commit`, `lock_waits`,
  `lock_wait_s`, `lock_held_share` (held time summed over the processes / the run's
  time: near 1.0 the lock is what bounds);
- `busy_cores`: the machine's busy cores during the run (/proc/stat): above what this
  machine has, the processes waited for cores as much as for the lock.

`--writers process,machine` runs each count both ways, alternating run by run:
"process", each process commits its own writes (`GroupCommit`); "machine", they send
them to one more process that commits for all of them (`journal.node_writer`, as the
loader serves it); `by_writer` has both, and `commits` then counts the writer's.

Usage: python bench/sqlite_writers.py [--processes 1,2,4,8,16] [--workflows 3000]
       [--slots 16] [--step-ms 1] [--runs 3] [--writers process]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, busy_cores, busy_jiffies, emit, temp_sqlite_url  # noqa: E402
from bench.workflows import ThreeSteps  # noqa: E402
from dynwf_ray.binding import WorkflowBinding  # noqa: E402
from dynwf_ray.journal import STEP_COMPLETE, Journal, StepRecord  # noqa: E402
from dynwf_ray.journal.node_writer import NodeWriter  # noqa: E402
from dynwf_ray.package import package_class  # noqa: E402

LEASE_TTL = 60.0


async def _workflows(journal: Journal, tenant: str, version: str, owner: str, slots: int,
                     step_s: float, total: int) -> None:
    """Run `total` claimed workflows, up to `slots` at once, as a host serves them."""
    grouped, done, running, failed = journal.grouped, 0, set(), []
    wake = asyncio.Event()

    async def one(state) -> None:  # noqa: ANN001 - an ActivationState
        pk, token = state.info.pk, state.info.lease_token
        for seq, name in enumerate(("first", "second", "third")):
            await asyncio.sleep(step_s)  # the step runs in its sandbox meanwhile
            now = time.time()
            step = StepRecord(name, 0, "do", STEP_COMPLETE, str(seq), None, None, 1, None, now, now)
            await grouped.record_step(pk, token, step, now, LEASE_TTL)
        await grouped.end_activation(("complete", token, "3", time.time()), pk, [], 0, False, False)

    def ended(task: asyncio.Task) -> None:
        nonlocal done
        running.discard(task)
        if task.exception() is not None:
            failed.append(task.exception())
        done += 1
        wake.set()

    while done < total:
        if failed:  # a failed write fails the run
            raise failed[0]
        wake.clear()  # before the claim: a workflow may end while it is awaited
        free = slots - len(running)
        claims = await grouped.claim_and_load(time.time(), free, owner, LEASE_TTL, tenant, version) \
            if free > 0 else []
        for state in claims:
            task = asyncio.ensure_future(one(state))
            running.add(task)
            task.add_done_callback(ended)
        if not running and done < total:  # every instance was created before the start
            raise RuntimeError(f"{owner}: {total - done} workflows left and none to claim")
        if not claims or len(claims) < free:
            await wake.wait()


def child(url: str, tenant: str, version: str, owner: str, slots: int, step_s: float, total: int,
          writer: str) -> None:
    """One process: wait for the start (a line on stdin), run its workflows, print its counters."""
    journal = Journal(url, create_tables=False)
    journal.check_schema()
    if writer == "machine":
        journal.write_through_node_writer()
    print("ready", flush=True)
    sys.stdin.readline()
    asyncio.run(_workflows(journal, tenant, version, owner, slots, step_s, total))
    print(json.dumps(journal.write_stats()), flush=True)
    journal.close()


def serve(url: str) -> None:
    """The machine's writer (as the loader serves it): until stdin closes, then its counters."""
    journal = Journal(url, create_tables=False)
    writer = NodeWriter(journal)
    if not writer.start():
        raise RuntimeError("could not serve as the journal's writer")
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps({**journal.write_stats(), **writer.stats()}), flush=True)
    writer.close()
    journal.close()


def one_run(processes: int, workflows: int, slots: int, step_s: float, writer: str) -> dict:
    url = temp_sqlite_url()
    journal = Journal(url)
    version, kind, blob = package_class(ThreeSteps)
    each = workflows // processes
    for p in range(processes):
        journal.save_code(f"t{p}", version, kind, blob, time.time())
        wf = WorkflowBinding(journal, f"t{p}")
        for b in range(0, each, 100):
            wf.create_batch([{"id": f"w{i}"} for i in range(b, min(each, b + 100))])
    journal.close()
    children = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", url, f"t{p}", version,
             f"e1/p{p}", str(slots), str(step_s), str(each), writer],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for p in range(processes)
    ]
    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) if writer == "machine" else None
    try:
        for c in children + ([server] if server else []):
            if c.stdout.readline().strip() != "ready":
                raise RuntimeError("a child process did not start")
        began = busy_jiffies()
        start = time.perf_counter()
        for c in children:
            c.stdin.write("go\n")
            c.stdin.flush()
        counters = [json.loads(c.stdout.readline()) for c in children]
        seconds = time.perf_counter() - start
        finished = busy_jiffies()
        if server:
            server.stdin.write("stop\n")
            server.stdin.flush()
            counters.append(json.loads(server.stdout.readline()))
    finally:
        for c in children + ([server] if server else []):
            c.stdin.close()
            if c.wait(timeout=60) != 0:
                raise RuntimeError(f"a child process exited with {c.returncode}")
    journal = Journal(url, create_tables=False)
    complete = journal.count_by_status().get("complete", 0)
    journal.close()
    if complete != each * processes:
        raise RuntimeError(f"{complete} of {each * processes} workflows completed")
    total = {k: sum(c.get(k, 0) for c in counters) for k in set().union(*counters)}
    return {
        "workflows_per_s": round(each * processes / seconds, 1),
        "commits": int(total["group_commits"]),
        "writes_per_commit": round(total["group_writes"] / max(total["group_commits"], 1), 2),
        "lock_waits": int(total["sqlite_lock_waits"]),
        "lock_wait_s": round(total["sqlite_lock_wait_s"], 3),
        "lock_held_share": round(total["sqlite_lock_held_s"] / seconds, 3),
        "busy_cores": round(busy_cores(began, finished), 2),
        "writes_sent_to_writer": int(total.get("node_writer_writes", 0)),
    }


def main() -> None:
    if "--child" in sys.argv:
        url, tenant, version, owner, slots, step_s, total, writer = sys.argv[sys.argv.index("--child") + 1:]
        child(url, tenant, version, owner, int(slots), float(step_s), int(total), writer)
        return
    if "--serve" in sys.argv:
        serve(sys.argv[sys.argv.index("--serve") + 1])
        return
    counts = [int(x) for x in arg("--processes", "1,2,4,8,16", str).split(",")]
    writers = arg("--writers", "process", str).split(",")
    workflows, slots = arg("--workflows", 3000), arg("--slots", 16)
    step_s, runs = arg("--step-ms", 1.0, float) / 1000, arg("--runs", 3)
    by_writer: dict = {w: {} for w in writers}
    for n in counts:
        results: dict = {w: [] for w in writers}
        for _ in range(runs):  # the writers alternate run by run
            for w in writers:
                results[w].append(one_run(n, workflows, slots, step_s, w))
        for w in writers:
            by_writer[w][str(n)] = {
                **{k: statistics.median(r[k] for r in results[w]) for k in results[w][0]},
                "runs_per_s": [r["workflows_per_s"] for r in results[w]],
            }
    figures = {"journal": "sqlite", "workflows": workflows, "slots_per_process": slots,
               "step_ms": step_s * 1000, "by_processes": by_writer[writers[0]]}
    if writers != ["process"]:
        figures["by_writer"] = by_writer
    emit("sqlite_writers", figures)


if __name__ == "__main__":
    main()
