"""Sandboxes on every node of a multi-node Ray cluster; an instance survives its node's
removal; a restarted scheduler or loader interrupts no running step, nor does the loss
of the node they run on, for steps on other nodes.

A `ray.cluster_utils.Cluster` (a head and two worker nodes on this machine)
needs a Ray session of its own, and the rest of the suite shares one
(`ray_session`), so the scenario runs in a subprocess, `tests/cluster_driver.py`,
which prints one JSON line of what it saw; this side asserts on it. The journal
is PostgreSQL (a fresh database per run): every node reaches it, as in a real
cluster. Without DYNWF_TEST_POSTGRES_URL the test is skipped, unless
DYNWF_REQUIRE_POSTGRES=1, where it fails (as in conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: The whole scenario (three nodes, four hosts, a node removal) on a busy 2-core machine:
#: usually 15-70 s; the driver's own waits give up well before this.
DRIVER_TIMEOUT = 480
STEPS_ONCE = [["a", 1, "complete"], ["b", 1, "complete"], ["c", 1, "complete"]]


def run_driver(database_url: str, work: Path, which: str = "worker") -> tuple[dict, str]:
    """Run the cluster scenario in its own process group; (its JSON facts, its stderr)."""
    # A private Ray temp dir: a Cluster writes its address to <it>/ray/ray_current_cluster,
    # where any other ray.init() on this machine (another test run) would join it.
    # Short, under /tmp: Ray's Unix socket paths live below it.
    ray_tmp = tempfile.mkdtemp(prefix="dynwf-ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster_driver", database_url, str(work), which],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its Ray processes form a group we can end on a timeout
    )
    try:
        out, err = proc.communicate(timeout=DRIVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"the cluster driver ran over {DRIVER_TIMEOUT} s (Ray logs in {ray_tmp})\n"
            f"--- stdout ---\n{out[-20000:]}\n--- stderr ---\n{err[-20000:]}"
        )
    facts = None
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                facts = json.loads(line)
                break
            except ValueError:
                continue
    if facts is None or proc.returncode != 0 or facts.get("error"):
        pytest.fail(
            f"the cluster driver failed (exit {proc.returncode}; Ray logs in {ray_tmp}): "
            f"{(facts or {}).get('error')}\n"
            f"--- stdout ---\n{out[-20000:]}\n--- stderr ---\n{err[-20000:]}"
        )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return facts, err


def test_sandboxes_on_every_node_node_removal_and_control_plane_restarts(
    pg_database_url, tmp_path
):
    facts, stderr = run_driver(pg_database_url, tmp_path)
    try:
        check(facts)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n--- facts ---\n{json.dumps(facts, indent=1)}\n--- stderr ---\n{stderr[-20000:]}"
        ) from None
    spread = {}
    for p in facts["before"].values():
        spread[p["node"]] = spread.get(p["node"], 0) + 1
    print(f"\ncluster scenario: instances per node {sorted(spread.values(), reverse=True)}, "
          f"killed node ran {facts['victims']}; timings {json.dumps(facts['timings'])}; "
          f"drained node: {json.dumps(facts['drain'])}")


def check(facts: dict) -> None:
    assert not facts.get("shutdown_errors"), facts.get("shutdown_errors")
    head, workers = facts["nodes"]["head"], facts["nodes"]["workers"]
    nodes = {head, *workers}
    assert len(nodes) == 3 and sorted(nodes) == facts["alive_nodes"]
    # The engine's loader and scheduler run on the head (started before the workers joined).
    assert set(facts["control"]) == {"dynwf-loader-cluster", "dynwf-scheduler-cluster"}
    assert set(facts["control"].values()) == {head}, facts["control"]

    # Instances ran on more than one node (four tenants' hosts, spread).
    before = facts["before"]
    ran_on = {p["node"] for p in before.values()}
    assert ran_on <= nodes
    assert len(ran_on) >= 2, f"every instance's sandbox ran on one node: {before}"

    # A worker node running an instance was removed while that instance was in step b.
    removed, victims = facts["removed"], facts["victims"]
    assert removed in workers and victims
    assert removed not in facts["alive_nodes_after_removal"]
    instances = facts["instances"]
    for v in victims:
        assert before[v]["node"] == removed
        at = facts["at_removal"][v]
        assert at["b_runs"] == 1 and not at["released"], at
        assert [s[0] for s in at["steps"] if s[2] == "complete"] == ["a"], at

        # Its host and sandbox went with the node; it resumed on another node ...
        assert facts["old_processes_gone"][v] == {"host": True, "sandbox": True}
        after = facts["after"][v]
        assert after["node"] != removed and after["node"] in facts["alive_nodes_after_removal"]
        assert after["host_pid"] != before[v]["host_pid"]
        # ... and completed: a did not run again, b ran again (in another sandbox),
        # each step is recorded exactly once.
        got = instances[v]
        assert got["status"]["status"] == "complete", got
        assert got["status"]["output"] == ["a", "b", "c"]
        assert got["a_runs"] == 1
        assert len(got["b_runs"]) == 2 and got["b_runs"][0] != got["b_runs"][1], got["b_runs"]
        assert got["steps"] == STEPS_ONCE

    # Every other instance completed too, each step once, untouched by the removal.
    for iid, got in instances.items():
        assert got["status"]["status"] == "complete", (iid, got)
        assert got["status"]["output"] == ["a", "b", "c"]
        assert got["a_runs"] == 1, (iid, got)
        assert got["steps"] == STEPS_ONCE, (iid, got)
        if iid not in victims:
            assert len(got["b_runs"]) == 1, (iid, got)
    # The scheduler alone, then the loader alone, was lost while every instance was in
    # step b: each restarted one took the live hosts over, and no step was interrupted
    # (same sandbox and host process for every instance; step b ran once more only for
    # the victims of the node's removal, checked above).
    for which in ("scheduler", "loader"):
        restart = facts[f"{which}_restart"]
        before_, after_ = restart["stats_before"], restart["stats_after"]
        assert set(restart["before"]) == set(instances), restart
        assert restart["after"] == restart["before"], restart
        assert after_["live_hosts"] == before_["live_hosts"] >= 2, restart
        assert after_["host_processes"] == before_["host_processes"], restart
        for busy in (facts[f"busy_before_{which}_restart"], restart["busy_after"]):
            assert len(busy) == len(set(busy)) == len(instances), busy  # no host lent twice
    assert facts["scheduler_restart"]["stats_after"]["hosts_adopted"] == (
        facts["scheduler_restart"]["stats_before"]["live_hosts"])
    assert facts["loader_restart"]["stats_after"]["cold_starts"] == 0  # it took them over
    # (a scheduler's counters are its own: the node's loss was counted by the first one)
    first = facts["scheduler_restart"]["stats_before"]
    assert first["host_deaths"] >= len(victims)
    # their hosts went down with the node: not the instances' fault, no crash counted
    assert first["hosts_lost_with_node"] >= 1, first
    # A node Ray drains takes no new host: the new tenants' went to the head.
    drain = facts["drain"]
    assert drain["node"] in workers and drain["node"] != removed
    assert drain["placed_on"] == [head], drain
    assert facts["stats"]["instances"] == {
        "complete": len(instances) + 1 + drain["new_tenants"]}  # and the after-drain ones
    assert facts["new_instance"]["output"] == ["a", "b", "c"]  # served after it all


def test_the_control_planes_node_removed_mid_step(pg_database_url, tmp_path):
    """The node running the scheduler and the loader is removed while every instance is in
    step b: Ray restarts both on the spare node, they take the live hosts over, steps on
    other nodes go on untouched, and those of the removed node run again, once."""
    facts, stderr = run_driver(pg_database_url, tmp_path, "control")
    try:
        check_control(facts)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n--- facts ---\n{json.dumps(facts, indent=1)}\n--- stderr ---\n{stderr[-20000:]}"
        ) from None
    print(f"\ncontrol plane's node killed: it ran {facts['victims']}; "
          f"timings {json.dumps(facts['timings'])}")


def check_control(facts: dict) -> None:
    assert not facts.get("shutdown_errors"), facts.get("shutdown_errors")
    nodes = facts["nodes"]
    names = {"dynwf-loader-cluster", "dynwf-scheduler-cluster"}
    assert facts["control"] == dict.fromkeys(names, nodes["control"]), facts["control"]
    assert facts["control_after"] == dict.fromkeys(names, nodes["spare"]), facts["control_after"]
    before, after, victims = facts["before"], facts["after"], facts["victims"]
    instances = facts["instances"]
    assert set(before) == set(instances) == set(after)
    assert set(before) - set(victims), f"every instance ran on the control plane's node: {before}"
    for iid, got in instances.items():
        assert got["status"]["status"] == "complete", (iid, got)
        assert got["status"]["output"] == ["a", "b", "c"]
        assert got["a_runs"] == 1, (iid, got)
        assert got["steps"] == STEPS_ONCE, (iid, got)
        if iid in victims:  # its host went with the node: b ran again elsewhere
            assert len(got["b_runs"]) == 2, (iid, got)
            assert after[iid]["node"] != nodes["control"]
        else:  # untouched: the same sandbox and host process, b ran once
            assert len(got["b_runs"]) == 1, (iid, got)
            assert after[iid] == before[iid], (iid, before[iid], after[iid])
    # no instance ran in two sandboxes at once, before or after
    for busy in (facts["busy_before"], facts["busy_after"]):
        assert len(busy) == len(set(busy)) == len(instances), busy
    restarted = facts["stats_after_restart"]
    assert restarted["session"] == facts["stats"]["session"]
    assert restarted["hosts_adopted"] == len({before[i]["tenant"] for i in before if i not in victims})
    assert facts["stats"]["instances"] == {"complete": len(instances) + 1}
    assert facts["new_instance"]["output"] == ["a", "b", "c"]  # served after it all
