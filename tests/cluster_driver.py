"""The multi-node scenario of test_cluster.py, in a Ray cluster of its own.

    python -m tests.cluster_driver <journal database URL> <work dir> [worker|control]

Builds a `ray.cluster_utils.Cluster` (a head and two worker nodes on this
machine), starts an engine with the given (empty) journal while the head is the
only node, adds the workers, and runs one `Steered` instance for each of a few
tenants at once (each tenant's code gets its own host; the loader spreads hosts
over the nodes). While every instance is blocked in step b, it kills (SIGKILL, no
graceful leave) a worker node that runs one of them, waits until Ray declares it dead, waits for the instances it ran to start
step b again elsewhere, then kills the scheduler alone and then the loader alone (Ray
restarts each; the new one takes the live hosts over), drains the other worker and
starts a new tenant's instance (its host must not go there), releases all of them and waits for them to complete. It prints one JSON line of what it saw (placements,
the removed node, logs, journal steps, timings; "error" when something went
wrong) and always shuts the engine, Ray and the cluster down.

The test (trusted side) asserts on that line. This runs in a subprocess because
the rest of the suite shares one Ray session and a Cluster needs its own.
Run it with RAY_TMPDIR set to a private directory: a Cluster records its
address in `<ray temp dir>/ray_current_cluster`, where any other `ray.init()`
on the machine would otherwise find it and try to join it.

With `control`, the engine's scheduler and loader ask for a custom resource that
only two worker nodes have; the engine starts while the first is the only one,
so both run there. While every instance is in step b, that node is killed:
Ray restarts the scheduler and the loader on the other, which take over the
live hosts; the instances whose hosts were on the killed node run step b again.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.cluster_utils import Cluster

from ray.core.generated import autoscaler_pb2

from dynwf_ray import Engine
from dynwf_ray.loader import _draining_nodes

from .conftest import wait_until
from .test_engine import lines
from .workflows import Steered

TENANTS = 4
#: Node failure detection a little faster than Ray's defaults, still tolerant of a busy machine.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 10,
}
ENGINE = dict(
    # The default lease time: an instance that runs again within seconds of a fault was
    # released by the engine, not freed by its lease expiring.
    name="cluster", max_hosts=8, lease_ttl=30.0, poll_interval=0.5, hibernate_after=120.0,
)


def placements(engine: Engine) -> dict[str, dict]:
    """Instance id -> the node, host pid and sandbox pid that run it now."""
    out = {}
    for host in engine.sandboxes():
        for sandbox in host["sandboxes"]:
            if sandbox["instance"]:
                out[sandbox["instance"]] = {
                    "node": host["node_id"], "host_pid": host["host_pid"], "pid": sandbox["pid"],
                    "tenant": host["tenant"],
                }
    return out


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def control_nodes() -> dict[str, str]:
    """Where the engine's loader and scheduler actors run (for the record)."""
    try:
        table = ray._private.state.actors()
    except Exception as exc:  # noqa: BLE001 - an internal API: informative only
        return {"error": repr(exc)}
    return {
        a["Name"]: a["Address"]["NodeID"] for a in table.values()
        if a["Name"].startswith(("dynwf-loader-", "dynwf-scheduler-")) and a["State"] == "ALIVE"
    }


def kill_node(cluster: Cluster, node: Any, facts: dict) -> float:
    """SIGKILL every process of `node` (no graceful leave: Ray has to find it dead by its
    health checks), wait until Ray has declared it dead; returns when it did (monotonic),
    and records both times."""
    node_id, t_kill = node.node_id, time.monotonic()
    cluster.remove_node(node, allow_graceful=False)
    facts["timings"]["kill_node_s"] = round(time.monotonic() - t_kill, 2)
    wait_until(lambda: not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()), 60,
               "Ray to declare the killed node dead")
    t_dead = time.monotonic()
    facts["timings"]["declared_dead_after_kill_s"] = round(t_dead - t_kill, 2)
    return t_dead


def start_instances(engine: Engine, facts: dict, work: Path) -> tuple[dict, dict, dict]:
    """One `Steered` instance per tenant, each blocked in step b: (instances, handles,
    where each runs)."""
    t0 = facts["t0"]
    instances = {}
    for i in range(TENANTS):
        tenant = f"tenant{i}"
        d = work / tenant
        d.mkdir()
        engine.register(tenant, Steered)
        engine.set_tenant_policy(tenant, paths={str(d): "rw"})
        instances[f"inst{i}"] = (tenant, d)
    handles = {
        iid: engine.binding(tenant).create(id=iid, params={"dir": str(d)})
        for iid, (tenant, d) in instances.items()
    }
    facts["timings"]["instances_created_s"] = round(time.monotonic() - t0, 2)
    wait_until(lambda: all(lines(d / "b.log") for _, d in instances.values()), 120,
               "every instance to start step b")
    before = wait_until(lambda: (p := placements(engine)).keys() >= instances.keys() and p, 30,
                        "every instance's sandbox to be reported")
    facts["timings"]["all_in_step_b_s"] = round(time.monotonic() - t0, 2)
    facts["before"] = before
    facts["busy_before"] = busy_sandboxes(engine)
    facts["control"] = control_nodes()
    return instances, handles, before


def finish(engine: Engine, facts: dict, instances: dict, handles: dict, since: float) -> None:
    """Release every instance, wait for all to end, and record what they did."""
    t_release = time.monotonic()
    for _, d in instances.values():
        (d / "release").touch()

    def all_done() -> bool:
        return all(h.status()["status"] in {"complete", "errored", "terminated"}
                   for h in handles.values())

    wait_until(all_done, 90, "every instance to end")
    facts["timings"]["complete_after_release_s"] = round(time.monotonic() - t_release, 2)
    facts["timings"]["complete_after_fault_s"] = round(time.monotonic() - since, 2)
    facts["instances"] = {}
    for iid, (tenant, d) in instances.items():
        info = engine.journal.get_instance(tenant, iid)
        facts["instances"][iid] = {
            "tenant": tenant,
            "status": handles[iid].status(),
            "a_runs": len(lines(d / "a.log")),
            "b_runs": lines(d / "b.log"),
            "steps": [[s.name, s.seq, s.status] for s in engine.journal.list_steps(info.pk)],
        }
    # The same engine serves a new instance afterwards.
    tenant, d = next(iter(instances.values()))
    t_new = time.monotonic()
    late = engine.binding(tenant).create(id="after-the-fault", params={"dir": str(d)})
    wait_until(lambda: late.status()["status"] == "complete", 60, "a new instance to complete")
    facts["timings"]["new_instance_s"] = round(time.monotonic() - t_new, 2)
    facts["new_instance"] = late.status()
    facts["stats"] = {k: v for k, v in engine.stats().items() if k != "metrics_url"}


def scenario(cluster: Cluster, facts: dict, engine: Engine, work: Path) -> None:
    """A worker node running an instance killed mid-step; then the scheduler alone and
    the loader alone killed."""
    head = cluster.head_node.node_id
    workers = {n.node_id: n for n in cluster.worker_nodes}
    facts["nodes"] = {"head": head, "workers": sorted(workers)}
    facts["alive_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    instances, handles, before = start_instances(engine, facts, work)

    # The node to remove: a worker running an instance.
    candidates = sorted({p["node"] for p in before.values()} & workers.keys())
    if not candidates:
        raise RuntimeError(f"no instance runs on a worker node: {before}")
    removed = candidates[0]
    victims = sorted(iid for iid, p in before.items() if p["node"] == removed)
    facts["removed"], facts["victims"] = removed, victims
    facts["at_removal"] = {  # mid-step: b started once, not released, not recorded
        v: {
            "b_runs": len(lines(instances[v][1] / "b.log")),
            "released": (instances[v][1] / "release").exists(),
            "steps": [[s.name, s.seq, s.status] for s in engine.journal.list_steps(
                engine.journal.get_instance(instances[v][0], v).pk)],
        }
        for v in victims
    }

    t_removed = kill_node(cluster, workers[removed], facts)
    facts["alive_nodes_after_removal"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])

    for iid in victims:
        d = instances[iid][1]
        wait_until(lambda: len(lines(d / "b.log")) >= 2, 90, f"{iid} to run step b again")
    facts["timings"]["b_rerun_after_declared_dead_s"] = round(time.monotonic() - t_removed, 2)
    after = wait_until(
        lambda: (p := placements(engine)) and all(v in p for v in victims) and p, 30,
        "the victims' new sandboxes to be reported",
    )
    facts["after"] = {v: after[v] for v in victims}
    facts["old_processes_gone"] = {
        v: {"host": gone(before[v]["host_pid"]), "sandbox": gone(before[v]["pid"])} for v in victims
    }
    kill_control(engine, facts, "scheduler")
    kill_control(engine, facts, "loader")
    drain_then_place(engine, facts, workers.keys() - {removed}, work)
    finish(engine, facts, instances, handles, t_removed)


def drain_then_place(engine: Engine, facts: dict, remaining: set[str], work: Path) -> None:
    """Drain the worker left (busy with hosts, so it stays up, draining, for the
    10-minute deadline), then start new tenants' instances: their hosts must go elsewhere.
    Every node wants one host process (one CPU each) and has it, so a new host joins
    the least loaded process: as many new tenants as it takes for the drained node's
    process to be that one, were the node not excluded."""
    (node,) = remaining
    per_node: dict[str, set[int]] = {}
    hosts_on: dict[str, int] = {}
    for host in engine.sandboxes():
        per_node.setdefault(host["node_id"], set()).add(host["host_pid"])
        hosts_on[host["node_id"]] = hosts_on.get(host["node_id"], 0) + 1
    others = [n for n in per_node if n != node]
    new = min(5, max(1, 2 + hosts_on.get(node, 0) - min(hosts_on[n] for n in others)))
    facts["drain"] = {"node": node, "processes_per_node": {n: len(p) for n, p in per_node.items()},
                      "hosts_per_node": hosts_on, "new_tenants": new}
    accepted, why = ray._private.worker.global_worker.gcs_client.drain_node(
        node, autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION, "cluster_driver",
        int((time.time() + 600) * 1000))
    if not accepted:
        raise RuntimeError(f"Ray refused to drain {node}: {why}")
    wait_until(lambda: node in _draining_nodes(), 30, "Ray to report the node draining")
    for i in range(new):
        tenant = f"drained{i}"
        d = work / tenant
        d.mkdir()
        (d / "release").touch()
        engine.register(tenant, Steered)
        engine.set_tenant_policy(tenant, paths={str(d): "rw"})
        handle = engine.binding(tenant).create(id="after-drain", params={"dir": str(d)})
        wait_until(lambda: handle.status()["status"] == "complete", 90, f"{tenant}'s instance")
    facts["drain"]["placed_on"] = sorted(
        {h["node_id"] for h in engine.sandboxes() if h["tenant"].startswith("drained")})


def control_node_scenario(cluster: Cluster, facts: dict, engine: Engine, work: Path,
                          control: Any, spare: Any) -> None:
    """The node running the scheduler and the loader killed mid-step: they restart on the
    spare node that has the control resource, and steps on the other nodes go on."""
    facts["nodes"] = {"head": cluster.head_node.node_id, "control": control.node_id,
                      "spare": spare.node_id}
    instances, handles, before = start_instances(engine, facts, work)
    victims = sorted(iid for iid, p in before.items() if p["node"] == control.node_id)
    facts["victims"] = victims

    t_removed = kill_node(cluster, control, facts)

    def back() -> dict | None:
        where = control_nodes()
        if len(where) != 2 or set(where.values()) != {spare.node_id}:
            return None
        try:
            return {k: v for k, v in engine.stats().items() if k != "metrics_url"}
        except ray.exceptions.RayError:
            return None

    facts["stats_after_restart"] = wait_until(back, 120, "the control plane on the spare node")
    facts["timings"]["control_back_after_declared_dead_s"] = round(time.monotonic() - t_removed, 2)
    facts["control_after"] = control_nodes()
    for iid in victims:
        d = instances[iid][1]
        wait_until(lambda: len(lines(d / "b.log")) >= 2, 90, f"{iid} to run step b again")
    facts["timings"]["victims_rerun_after_declared_dead_s"] = round(time.monotonic() - t_removed, 2)
    facts["after"] = wait_until(
        lambda: (p := placements(engine)).keys() >= instances.keys() and p, 30,
        "every instance's sandbox to be reported again",
    )
    facts["busy_after"] = busy_sandboxes(engine)
    finish(engine, facts, instances, handles, t_removed)


def busy_sandboxes(engine: Engine) -> list[str]:
    """The instance each busy sandbox runs, over every host (one entry per sandbox)."""
    return sorted(s["instance"] for h in engine.sandboxes() for s in h["sandboxes"] if s["instance"])


def kill_control(engine: Engine, facts: dict, which: str) -> None:
    """The scheduler or the loader (`which`) alone lost while every instance is in step b
    (Ray restarts it): record where each instance runs before and after, what the engine
    counted, and how long until a new one answers."""
    cfg = engine.config
    name = cfg.scheduler_name if which == "scheduler" else cfg.loader_name

    def pid() -> int:
        actor = ray.get_actor(name, namespace=cfg.namespace)
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)

    def answers_anew() -> bool:
        try:
            return pid() != old
        except ray.exceptions.RayError:
            return False

    before = placements(engine)
    facts[f"busy_before_{which}_restart"] = busy_sandboxes(engine)
    stats_before = {k: v for k, v in engine.stats().items() if k != "metrics_url"}
    old = pid()
    t_kill = time.monotonic()
    ray.kill(ray.get_actor(name, namespace=cfg.namespace), no_restart=False)
    wait_until(lambda: gone(old), 30, f"the {which} to die")
    wait_until(answers_anew, 60, f"a restarted {which}")
    facts["timings"][f"{which}_back_s"] = round(time.monotonic() - t_kill, 2)
    stats = engine.stats()
    facts[f"{which}_restart"] = {
        "before": before, "after": placements(engine), "busy_after": busy_sandboxes(engine),
        "stats_before": stats_before,
        "stats_after": {k: v for k, v in stats.items() if k != "metrics_url"},
    }


def main(database_url: str, work_dir: str, which: str = "worker") -> int:
    work = Path(work_dir)
    facts: dict[str, Any] = {"t0": time.monotonic(), "timings": {}, "error": None}
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": SYSTEM_CONFIG},
        )
        ray.init(address=cluster.address, namespace="dynwf", logging_level="WARNING")
        # The engine's loader and scheduler (num_cpus=0 actors, which Ray may place on any
        # node) start while the head is the only node: the workers then run only hosts, and
        # removing one takes hosts and sandboxes with it, never the engine's control plane.
        if which == "worker":
            facts["_engine"] = Engine.start(database_url=database_url, **ENGINE)
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes(timeout=120)
            facts["timings"]["cluster_started_s"] = round(time.monotonic() - facts["t0"], 2)
            scenario(cluster, facts, facts["_engine"], work)
        else:  # the control plane on a worker, the only node with the resource it asks for
            control = cluster.add_node(num_cpus=1, resources={"control": 1})
            cluster.wait_for_nodes(timeout=120)
            facts["_engine"] = Engine.start(
                database_url=database_url, control_resources={"control": 0.01}, **ENGINE)
            spare = cluster.add_node(num_cpus=1, resources={"control": 1})
            cluster.wait_for_nodes(timeout=120)
            facts["timings"]["cluster_started_s"] = round(time.monotonic() - facts["t0"], 2)
            control_node_scenario(cluster, facts, facts["_engine"], work, control, spare)
    except BaseException as exc:  # noqa: BLE001 - reported in the JSON line
        facts["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        engine = facts.pop("_engine", None)
        t_stop = time.monotonic()
        for what, stop in (
            ("engine", engine.stop if engine is not None else None),
            ("ray", ray.shutdown),
            ("cluster", cluster.shutdown if cluster is not None else None),
        ):
            if stop is None:
                continue
            try:
                stop()
            except BaseException as exc:  # noqa: BLE001 - keep shutting the rest down
                traceback.print_exc()
                facts.setdefault("shutdown_errors", []).append(f"{what}: {type(exc).__name__}: {exc}")
        facts["timings"]["shutdown_s"] = round(time.monotonic() - t_stop, 2)
        facts["timings"]["total_s"] = round(time.monotonic() - facts.pop("t0"), 2)
        print(json.dumps(facts, default=str), flush=True)
    return 0 if facts["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
