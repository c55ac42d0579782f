"""The engine on Ray: hosts, hibernation, crashes, restarts, admission, bindings."""

from __future__ import annotations

import os
import signal
import time
import json
from pathlib import Path

import psutil
import pytest
import ray

from dynwf_ray.journal import Journal
from dynwf_ray.notify import ROUTE_TTL
from dynwf_ray import (
    DuplicateInstanceError,
    Engine,
    InstanceNotFoundError,
    InvalidInputError,
    PayloadTooLargeError,
    UnknownTenantError,
)

from .conftest import ENGINE_DEFAULTS, wait_status, wait_until
from .workflows import (
    Approval,
    BlockingStep,
    Booked,
    Drifting,
    Flaky,
    Hello,
    NotAWorkflow,
    Saga,
    SleepThenPid,
    SpawnsChildren,
    StepOptions,
    Steered,
    ThreeSteps,
)


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def lend(engine, tenant: str, path: Path) -> None:
    """Let the tenant's sandboxes write to `path` (where steered workflows report)."""
    engine.set_tenant_policy(tenant, paths={str(path): "rw"})


def sandbox_of(engine, instance_id: str) -> dict:
    """The live sandbox running `instance_id`, with its host's pid (the trusted side's view)."""
    for host in engine.sandboxes():
        for sandbox in host["sandboxes"]:
            if sandbox["instance"] == instance_id:
                return {**sandbox, "host_pid": host["host_pid"]}
    return {}


def tenant_hosts(engine, tenant: str) -> int:
    return engine.stats()["hosts_by_tenant"].get(tenant, 0)


def test_create_run_and_status(engine, tenant):
    version = engine.register(tenant, Hello)
    wf = engine.binding(tenant)
    inst = wf.create(id="hello-1", params={"name": "Ray"})
    status = wait_status(inst, "complete")
    assert status == {
        "status": "complete", "error": None,
        "output": {"hello": "Hello, Ray!", "instance": "hello-1"}, "version": version,
        "condition": None, "rollback": [], "warning": None,
    }
    assert wf.get("hello-1").status() == status


def test_callers_wake_the_hosts_the_scheduler_named_and_a_stale_route_falls_back(engine, tenant):
    """Once the scheduler named a version's host, the engine's notifications wake it
    directly (no call to the scheduler), by datagram: the host process runs on this
    machine. After the host is deactivated, the route it left is stale and the next
    instance still runs: the host process passes the wake on to the scheduler."""
    engine.register(tenant, Hello)
    wf = engine.binding(tenant)
    router = engine._notify._send
    router._ttl = 60.0  # this test's routes do not expire; staleness is what it checks
    asked = []
    scheduler = router._scheduler
    router._scheduler = lambda: (asked.append(1), scheduler())[1]
    try:
        wait_status(wf.create(params={"name": "a"}), "complete")  # the host is up now
        wait_status(wf.create(params={"name": "b"}), "complete")  # named back
        wait_until(lambda: any(k[0] == tenant for k in router._routes), 10, "a route")
        before, wakes = len(asked), engine.stats()["wakes"]
        inst = wf.create(params={"name": "c"})
        assert len(asked) == before  # woken directly
        assert wait_status(inst, "complete")["output"]["hello"] == "Hello, c!"
        wait_until(lambda: engine.stats()["wakes"]["by_datagram"] > wakes["by_datagram"], 10,
                   "the host process to report a wake by datagram")
        wait_until(lambda: tenant_hosts(engine, tenant) == 0, 30, "the host to be deactivated")
        inst = wf.create(params={"name": "d"})
        assert wait_status(inst, "complete")["output"]["hello"] == "Hello, d!"
        assert len(asked) == before  # the route was still the caller's: its process passed it on
        process = next(v for k, v in router._routes.items() if k[0] == tenant)[1][0][1]
        assert ray.get(process.describe.remote())["wakes"]["forwarded"] >= 1
    finally:
        router._ttl, router._scheduler = ROUTE_TTL, scheduler


def test_a_sandboxed_step_sees_its_effective_options(engine, tenant):
    engine.register(tenant, StepOptions)
    output = wait_status(engine.binding(tenant).create(), "complete")["output"]
    assert output == {"retries": {"limit": None, "delay": 2.0, "backoff": "exponential"},
                      "timeout": 60.0}


def test_a_failed_run_rolls_back_in_its_sandbox_across_activations(engine, tenant, tmp_path):
    engine.register(tenant, Saga)
    lend(engine, tenant, tmp_path)
    h = engine.binding(tenant).create(params={"dir": str(tmp_path), "refund_fails": 1,
                                              "refund_retries": 1})
    status = wait_status(h, "errored")
    assert status["error"]["name"] == "NonRetryableError"
    assert lines(tmp_path / "undo.log") == ["refund 30", "refund 30", "release 7"]
    assert [(r["step"], r["status"], r["attempts"]) for r in status["rollback"]] == [
        ("charge", "complete", 2), ("book", "complete", 1)]
    assert len(lines(tmp_path / "ship.log")) == 1


def test_terminate_with_rollback_unwinds_a_waiting_instance_in_its_sandbox(engine, tenant, tmp_path):
    engine.register(tenant, Booked)
    lend(engine, tenant, tmp_path)
    h = engine.binding(tenant).create(params={"dir": str(tmp_path)})
    wait_status(h, "waiting")
    h.terminate(rollback=True)
    assert wait_status(h, "terminated")["error"] is None
    assert lines(tmp_path / "undo.log") == ["refund 30", "release 7"]
    assert not lines(tmp_path / "ship.log")


def test_a_sandboxed_replay_that_skips_recorded_steps_warns(engine, tenant, tmp_path):
    engine.register(tenant, Drifting)
    lend(engine, tenant, tmp_path)
    h = engine.binding(tenant).create(params={"dir": str(tmp_path)})
    wait_status(h, "waiting")
    (tmp_path / "skip-a").touch()
    h.send_event("go")
    status = wait_status(h, "complete")
    assert "without asking for recorded steps 'a' (count 1)" in status["warning"]


def test_a_tenant_sees_each_item_of_its_batch(engine, tenant):
    engine.register(tenant, SpawnsChildren)
    h = engine.binding(tenant).create(id="parent", params={"spawn": True})
    output = wait_status(h, "complete")["output"]
    assert output == [["parent-child", "created", False], ["not an id", "invalid", True]]
    assert wait_status(engine.binding(tenant).get("parent-child"), "complete")["output"] == []


def test_a_rollback_cut_short_by_a_host_killed_mid_way_finishes(engine, tenant, tmp_path):
    engine.register(tenant, Saga)
    lend(engine, tenant, tmp_path)
    h = engine.binding(tenant).create(id="r", params={"dir": str(tmp_path), "refund_waits": True})
    wait_until(lambda: lines(tmp_path / "undo.log"), what="the refund to start")
    host = wait_until(lambda: sandbox_of(engine, "r"), what="its sandbox")["host_pid"]
    os.kill(host, signal.SIGKILL)  # the trusted host process, mid-compensation
    wait_until(lambda: len(lines(tmp_path / "undo.log")) == 2, what="the refund to run again")
    (tmp_path / "refund-go").touch()
    status = wait_status(h, "errored")
    assert status["error"]["name"] == "NonRetryableError"
    assert lines(tmp_path / "undo.log") == ["refund 30", "refund 30", "release 7"]
    assert len(lines(tmp_path / "ship.log")) == 1  # the failure was replayed, not run again
    assert [(r["step"], r["status"]) for r in status["rollback"]] == [
        ("charge", "complete"), ("book", "complete")]


def test_a_restart_from_a_step_survives_its_host_killed_mid_way(engine, tenant, tmp_path):
    engine.register(tenant, Steered)
    lend(engine, tenant, tmp_path)
    h = engine.binding(tenant).create(id="s", params={"dir": str(tmp_path)})
    wait_until(lambda: lines(tmp_path / "b.log"), what="step b")
    (tmp_path / "release").touch()
    wait_status(h, "complete")
    (tmp_path / "release").unlink()
    h.restart(from_step=("b", 1))
    wait_until(lambda: len(lines(tmp_path / "b.log")) == 2, what="step b to run again")
    host = wait_until(lambda: sandbox_of(engine, "s"), what="its sandbox")["host_pid"]
    os.kill(host, signal.SIGKILL)
    wait_until(lambda: len(lines(tmp_path / "b.log")) == 3, what="step b to run once more")
    (tmp_path / "release").touch()
    assert wait_status(h, "complete")["output"] == ["a", "b", "c"]
    assert len(lines(tmp_path / "a.log")) == 1  # kept by the restart: never run again
    steps = engine.journal.list_steps(engine.journal.get_instance(tenant, "s").pk)
    assert sorted((s.name, s.seq, s.status) for s in steps) == [
        ("a", 1, "complete"), ("b", 1, "complete"), ("c", 1, "complete")]


def test_binding_errors_are_clear(engine, tenant):
    with pytest.raises(UnknownTenantError, match=f"tenant '{tenant}' has no workflow code"):
        engine.binding(tenant).create()
    with pytest.raises(InvalidInputError, match="WorkflowEntrypoint"):
        engine.register(tenant, NotAWorkflow)
    with pytest.raises(InvalidInputError, match="tenant id"):
        engine.binding("bad tenant!")
    engine.register(tenant, Hello)
    wf = engine.binding(tenant)
    wf.create(id="one")
    with pytest.raises(DuplicateInstanceError, match="'one'"):
        wf.create(id="one")
    with pytest.raises(InvalidInputError, match="instance id"):
        wf.create(id="no spaces allowed")
    with pytest.raises(InvalidInputError, match="instance id"):
        wf.create(id="x" * 101)
    with pytest.raises(PayloadTooLargeError, match="params of instance 'big'"):
        wf.create(id="big", params="x" * (1024 * 1024 + 1))
    with pytest.raises(InstanceNotFoundError, match="no instance 'missing'"):
        wf.get("missing")
    with pytest.raises(InstanceNotFoundError):
        engine.binding(tenant + "-other").get("one")  # another tenant's instance: not found


def test_create_batch_is_idempotent_and_bounded(engine, tenant):
    engine.register(tenant, ThreeSteps)
    wf = engine.binding(tenant)
    wf.create(id="b0")
    handles = wf.create_batch([{"id": f"b{i}", "params": {"i": i}} for i in range(5)])
    assert [h.id for h in handles] == [f"b{i}" for i in range(5)]
    for h in handles:
        assert wait_status(h, "complete")["output"] == 3
    assert {h.outcome for h in handles} == {"created", "existed"}  # b0 existed already
    again = wf.create_batch([{"id": "b1"}, {"id": "b9"}, {"id": "b9", "params": 2}])
    assert [(h.id, h.outcome) for h in again] == [("b1", "existed"), ("b9", "created"),
                                                  ("b9", "existed")]
    assert wait_status(wf.get("b9"), "complete")["output"] == 3
    with pytest.raises(InvalidInputError, match="at most 100"):
        wf.create_batch([{} for _ in range(101)])
    mixed = wf.create_batch([{"id": "ok"}, {"id": "not ok"}, {"params": float("nan")},
                             {"id": "x", "color": "red"}, "not a mapping"])
    assert [h.outcome for h in mixed] == ["created", "invalid", "invalid", "invalid", "invalid"]
    assert "instance id" in mixed[1].error and mixed[1].id == "not ok"
    assert "params" in mixed[2].error and "color" in mixed[3].error and "mapping" in mixed[4].error
    assert wait_status(wf.get("ok"), "complete")["output"] == 3  # bad items held nothing back
    with pytest.raises(InstanceNotFoundError):
        wf.get("x")


def test_sigkill_mid_step_resumes_without_repeating_completed_steps(engine, tenant, tmp_path):
    engine.register(tenant, Steered)
    lend(engine, tenant, tmp_path)
    inst = engine.binding(tenant).create(id="k", params={"dir": str(tmp_path)})
    first = wait_until(lambda: lines(tmp_path / "b.log"), what="step b to start")[0]
    pid = wait_until(lambda: sandbox_of(engine, "k"), what="its sandbox")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(lines(tmp_path / "b.log")) == 2, what="step b to run again")
    (tmp_path / "release").touch()
    status = wait_status(inst, "complete")
    assert status["output"] == ["a", "b", "c"]
    assert len(lines(tmp_path / "a.log")) == 1  # completed before the kill: not run again
    b_runs = lines(tmp_path / "b.log")
    assert b_runs[0] == first and b_runs[1] != first  # the interrupted step ran again elsewhere
    info = engine.journal.get_instance(tenant, "k")
    steps = engine.journal.list_steps(info.pk)
    assert [(s.name, s.seq, s.status) for s in steps] == [
        ("a", 1, "complete"), ("b", 1, "complete"), ("c", 1, "complete")
    ]  # recorded exactly once


def test_sleep_hibernates_the_instance_and_its_host(engine, tenant):
    engine.register(tenant, SleepThenPid)
    inst = engine.binding(tenant).create(id="s", params={"sleep": 4})
    wait_status(inst, "waiting")
    info = engine.journal.get_instance(tenant, "s")
    before = json.loads(engine.journal.list_steps(info.pk)[0].result_json)
    # hibernate_after is 1.5 s: the idle host and its sandbox end while the instance sleeps.
    wait_until(lambda: tenant_hosts(engine, tenant) == 0, timeout=30, what="the idle host to end")
    assert inst.status()["status"] == "waiting"
    out = wait_status(inst, "complete")["output"]
    assert out["before"] == before and out["after"] != before  # a new sandbox after the sleep


def test_wait_for_event_across_hibernation(engine, tenant):
    engine.register(tenant, Approval)
    inst = engine.binding(tenant).create(id="w")
    wait_status(inst, "waiting")
    before = json.loads(engine.journal.list_steps(engine.journal.get_instance(tenant, "w").pk)[0].result_json)
    wait_until(lambda: tenant_hosts(engine, tenant) == 0, timeout=30, what="the idle host to end")
    inst.send_event("approval", {"by": "alice"})
    out = wait_status(inst, "complete")["output"]
    assert out["by"] == "alice" and out["before"] == before and out["after"] != before


def test_wait_for_event_timeout_errors_the_instance(engine, tenant):
    engine.register(tenant, Approval)
    inst = engine.binding(tenant).create(params={"timeout": "1 second"})
    status = wait_status(inst, "errored")
    assert status["error"]["name"] == "WorkflowTimeoutError"
    assert "no 'approval' event within 1 s" in status["error"]["message"]


def test_event_sent_before_the_wait_is_buffered(engine, tenant):
    engine.register(tenant, Approval)
    wf = engine.binding(tenant)
    inst = wf.create(id="early")
    inst.send_event("approval", {"by": "early bird"})
    assert wait_status(inst, "complete")["output"]["by"] == "early bird"
    with pytest.raises(InvalidInputError, match="event type"):
        inst.send_event("not valid!", {})


def test_retries_with_backoff_complete(engine, tenant):
    engine.register(tenant, Flaky)
    inst = engine.binding(tenant).create()
    assert wait_status(inst, "complete")["output"] == {"attempts": 3}


def test_pause_resume_terminate_restart_live(engine, tenant, tmp_path):
    engine.register(tenant, Steered)
    lend(engine, tenant, tmp_path)
    wf = engine.binding(tenant)
    inst = wf.create(id="p", params={"dir": str(tmp_path)})
    wait_until(lambda: lines(tmp_path / "b.log"), what="step b to start")
    inst.pause()
    assert inst.status()["status"] == "waitingForPause"
    (tmp_path / "release").touch()
    wait_status(inst, "paused")  # b completed, c did not start
    info = engine.journal.get_instance(tenant, "p")
    assert [s.name for s in engine.journal.list_steps(info.pk)] == ["a", "b"]
    inst.resume()
    assert wait_status(inst, "complete")["output"] == ["a", "b", "c"]
    inst.restart()
    assert wait_status(inst, "complete")["output"] == ["a", "b", "c"]
    assert len(lines(tmp_path / "a.log")) == 2  # the restart ran from the top

    other = wf.create(id="t", params={"dir": str(tmp_path / "t")})
    (tmp_path / "t").mkdir()
    wait_until(lambda: lines(tmp_path / "t" / "b.log"), what="step b to start")
    other.terminate()
    assert other.status()["status"] == "terminated"
    (tmp_path / "t" / "release").touch()
    info = engine.journal.get_instance(tenant, "t")
    wait_until(lambda: engine.stats()["busy_hosts"] == 0, what="the terminated activation to end")
    assert [s.name for s in engine.journal.list_steps(info.pk)] == ["a"]  # b's result was fenced
    assert other.status()["status"] == "terminated"


def test_blocking_step_past_its_timeout_ends_its_sandbox_not_the_engine(engine, tenant):
    engine.register(tenant, BlockingStep)
    inst = engine.binding(tenant).create()
    pid = wait_until(lambda: sandbox_of(engine, inst.id).get("pid"), 60, "the step's sandbox")
    status = wait_status(inst, "errored", timeout=90)
    assert status["error"]["name"] == "StepTimeoutError"
    assert "exceeded its timeout of 3 s" in status["error"]["message"]
    wait_until(lambda: process_gone(pid), 30, f"the blocked step's sandbox {pid} to end")
    engine.register(tenant + "b", Hello)
    assert wait_status(engine.binding(tenant + "b").create(), "complete")


def test_admission_queues_instances_beyond_max_activations(make_engine, tmp_path):
    engine = make_engine(max_activations=1)
    engine.register("adm", Steered)
    lend(engine, "adm", tmp_path)
    wf = engine.binding("adm")
    dirs = [tmp_path / str(i) for i in range(3)]
    for d in dirs:
        d.mkdir()
    handles = [wf.create(id=f"i{i}", params={"dir": str(d)}) for i, d in enumerate(dirs)]
    wait_until(lambda: any(lines(d / "b.log") for d in dirs), what="one instance to run")
    statuses = sorted(h.status()["status"] for h in handles)
    assert statuses == ["queued", "queued", "running"]
    assert engine.stats()["live_hosts"] == 1
    for d in dirs:
        (d / "release").touch()
    for h in handles:
        assert wait_status(h, "complete")["output"] == ["a", "b", "c"]
    assert engine.stats()["live_hosts"] <= 1


def _start_mixed_work(engine, tmp_path):
    """One instance running a blocked step, one sleeping, one waiting for an event."""
    engine.register("mix", Steered)
    lend(engine, "mix", tmp_path)
    engine.register("nap", SleepThenPid)
    engine.register("ask", Approval)
    running = engine.binding("mix").create(id="run", params={"dir": str(tmp_path)})
    sleeping = engine.binding("nap").create(id="sleep", params={"sleep": 3})
    waiting = engine.binding("ask").create(id="wait")
    wait_until(lambda: lines(tmp_path / "b.log"), what="the running step")
    wait_status(sleeping, "waiting")
    wait_status(waiting, "waiting")
    return running, sleeping, waiting


def test_scheduler_killed_and_restarted_adopts_its_hosts_and_interrupts_no_step(make_engine, tmp_path):
    """The scheduler's process dies mid-step (Ray restarts it): the new scheduler adopts
    the live hosts and the engine session, so the running step goes on in the same
    sandbox and runs once; the engine then serves new instances as before."""
    engine = make_engine(lease_ttl=2.0, hibernate_after=60)  # no host stops meanwhile
    running, sleeping, waiting = _start_mixed_work(engine, tmp_path)
    first = wait_until(lambda: sandbox_of(engine, "run"), what="the running sandbox")
    before = engine.stats()
    scheduler = ray.get_actor(engine.config.scheduler_name, namespace=engine.config.namespace)
    old_pid = ray.get(scheduler.__ray_call__.remote(lambda self: os.getpid()))
    killed = time.monotonic()
    ray.kill(scheduler, no_restart=False)
    wait_until(lambda: process_gone(old_pid), what="the old scheduler to die")
    after = wait_until(lambda: _restarted(engine, old_pid), what="the restarted scheduler")
    print(f"scheduler back {time.monotonic() - killed:.2f} s after the kill")
    assert after["hosts_adopted"] == before["live_hosts"] >= 1
    assert after["session"] == before["session"]  # the same engine session, adopted
    again = sandbox_of(engine, "run")  # the same step in the same sandbox and host
    assert (again["pid"], again["host_pid"]) == (first["pid"], first["host_pid"])
    assert not process_gone(first["pid"])
    # A host start its predecessor sent just before dying is refused: it would start a
    # host that no scheduler accounts for.
    loader = ray.get_actor(engine.config.loader_name, namespace=engine.config.namespace)
    with pytest.raises(ray.exceptions.RayTaskError, match="refused a host start"):
        ray.get(loader.start.remote(-1, "mix", "v", "e0/host--1", True, 1))
    assert not ray.get(loader.__ray_call__.remote(lambda self: -1 in self._hosts))
    (tmp_path / "release").touch()
    waiting.send_event("approval", {"by": "bob"})
    assert wait_status(running, "complete")["output"] == ["a", "b", "c"]
    assert wait_status(sleeping, "complete")
    assert wait_status(waiting, "complete")["output"]["by"] == "bob"
    assert len(lines(tmp_path / "a.log")) == 1
    assert len(lines(tmp_path / "b.log")) == 1  # not interrupted, not run again
    info = engine.journal.get_instance("mix", "run")
    assert [(s.name, s.seq, s.status, s.attempts) for s in engine.journal.list_steps(info.pk)] == [
        ("a", 1, "complete", 1), ("b", 1, "complete", 1), ("c", 1, "complete", 1)]
    later = engine.binding("ask").create(id="after-restart")
    later.send_event("approval", {"by": "eve"})
    assert wait_status(later, "complete")["output"]["by"] == "eve"


def _restarted(engine, old_pid: int, which: str = "scheduler") -> dict | None:
    """The engine's stats once a `which` ("scheduler" or "loader") other than `old_pid`
    answers."""
    name = engine.config.scheduler_name if which == "scheduler" else engine.config.loader_name
    actor = ray.get_actor(name, namespace=engine.config.namespace)
    try:
        if ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=5) == old_pid:
            return None
        return engine.stats()
    except ray.exceptions.RayError:
        return None


def test_loader_killed_and_restarted_interrupts_no_step_and_lends_no_host_twice(make_engine, tmp_path):
    """The loader's process dies mid-step (Ray restarts it): the host processes are not
    its children, so the step goes on in the same sandbox and runs once; the restarted
    loader takes the hosts over (by name), starts no second host for them, and
    afterwards no instance runs in two sandboxes."""
    engine = make_engine(lease_ttl=2.0, hibernate_after=60)  # no host stops meanwhile
    running, sleeping, waiting = _start_mixed_work(engine, tmp_path)
    first = wait_until(lambda: sandbox_of(engine, "run"), what="the running sandbox")
    before = engine.stats()
    loader = ray.get_actor(engine.config.loader_name, namespace=engine.config.namespace)
    old_pid = ray.get(loader.__ray_call__.remote(lambda self: os.getpid()))
    killed = time.monotonic()
    ray.kill(loader, no_restart=False)
    wait_until(lambda: process_gone(old_pid), what="the old loader to die")
    after = wait_until(lambda: _restarted(engine, old_pid, "loader"), what="the restarted loader")
    print(f"loader back {time.monotonic() - killed:.2f} s after the kill")
    assert (after["live_hosts"], after["host_processes"]) == (before["live_hosts"], before["host_processes"])
    assert after["cold_starts"] == 0  # it took the hosts over; it started none
    again = sandbox_of(engine, "run")
    assert (again["pid"], again["host_pid"]) == (first["pid"], first["host_pid"])
    running_in = [s.get("instance") for h in engine.sandboxes() for s in h["sandboxes"]]
    busy = [i for i in running_in if i]
    assert len(busy) == len(set(busy)), running_in  # no instance in two sandboxes
    (tmp_path / "release").touch()
    waiting.send_event("approval", {"by": "dan"})
    assert wait_status(running, "complete")["output"] == ["a", "b", "c"]
    assert wait_status(sleeping, "complete")
    assert wait_status(waiting, "complete")["output"]["by"] == "dan"
    assert len(lines(tmp_path / "a.log")) == 1
    assert len(lines(tmp_path / "b.log")) == 1  # not interrupted, not run again
    info = engine.journal.get_instance("mix", "run")
    assert [(s.name, s.seq, s.status) for s in engine.journal.list_steps(info.pk)] == [
        ("a", 1, "complete"), ("b", 1, "complete"), ("c", 1, "complete")]
    assert engine.stats()["host_deaths"] == 0


def test_the_machine_writer_commits_for_the_hosts_and_its_loader_killed_loses_no_instance(make_engine):
    """SQLite with `journal_writer="machine"`: the loader commits the host processes'
    writes. Killed as work arrives (Ray restarts it), the hosts commit their own writes
    until they find the restarted loader's writer: every instance completes, and the
    new writer commits for them. (A write the writer dies without answering:
    tests/test_node_writer.py. PostgreSQL: no writer.)"""
    engine = make_engine(journal_writer="machine", lease_ttl=2.0, hibernate_after=60)
    if not engine.journal.is_sqlite:
        assert engine.stats()["journal_writer"] is None
        return
    engine.register("mw", ThreeSteps)
    wf = engine.binding("mw")
    for h in [wf.create(id=f"a{i}") for i in range(10)]:
        assert wait_status(h, "complete")["output"] == 3
    stats = engine.stats()
    assert stats["journal_writer"]["writes"] > 0 and stats["journal_writer"]["group_commits"] > 0
    assert wait_until(lambda: engine.stats()["journal_writes"].get("node_writer_writes", 0) > 0)
    loader = ray.get_actor(engine.config.loader_name, namespace=engine.config.namespace)
    old_pid = ray.get(loader.__ray_call__.remote(lambda self: os.getpid()))
    during = [wf.create(id=f"b{i}") for i in range(40)]
    ray.kill(loader, no_restart=False)
    wait_until(lambda: process_gone(old_pid), what="the old loader to die")
    wait_until(lambda: _restarted(engine, old_pid, "loader"), what="the restarted loader")
    for h in during + [wf.create(id=f"c{i}") for i in range(10)]:
        assert wait_status(h, "complete")["output"] == 3

    def through_the_new_writer() -> int:  # a host looks for it again within 5 s
        assert wait_status(wf.create(), "complete")["output"] == 3
        return (engine.stats()["journal_writer"] or {}).get("writes", 0)

    assert wait_until(through_the_new_writer, what="writes through the restarted loader's writer")


def test_host_processes_end_themselves_once_their_loader_is_gone_for_good(make_engine, tmp_path):
    """An engine whose loader was killed for good (its driver died without `stop`):
    its host processes, detached, notice and end, sandboxes included."""
    engine = make_engine()
    engine.register("mix", Steered)
    lend(engine, "mix", tmp_path)
    engine.binding("mix").create(id="run", params={"dir": str(tmp_path)})
    first = wait_until(lambda: sandbox_of(engine, "run"), what="the running sandbox")
    scheduler = ray.get_actor(engine.config.scheduler_name, namespace=engine.config.namespace)
    loader = ray.get_actor(engine.config.loader_name, namespace=engine.config.namespace)
    ray.kill(scheduler, no_restart=True)
    ray.kill(loader, no_restart=True)
    wait_until(lambda: process_gone(first["host_pid"]), 30, "the host process to end itself")
    wait_until(lambda: process_gone(first["pid"]), 10, "its sandbox to end with it")


def test_engine_stopped_and_started_again_on_the_same_journal(make_engine, tmp_path):
    engine = make_engine()
    url, name = engine.config.database_url, engine.config.name
    running, sleeping, waiting = _start_mixed_work(engine, tmp_path)
    engine.stop()
    journal = Journal(url)
    assert journal.get_instance("mix", "run").status == "queued"  # its lease was released
    assert journal.get_instance("ask", "wait").status == "waiting"
    journal.close()
    (tmp_path / "release").touch()
    again = make_engine(database_url=url, name=name)
    again.binding("ask").get("wait").send_event("approval", {"by": "carol"})
    assert wait_status(again.binding("mix").get("run"), "complete")["output"] == ["a", "b", "c"]
    assert wait_status(again.binding("nap").get("sleep"), "complete")
    assert wait_status(again.binding("ask").get("wait"), "complete")["output"]["by"] == "carol"
    assert len(lines(tmp_path / "a.log")) == 1


def test_engine_refuses_a_conflicting_or_invalid_configuration(make_engine, make_database_url):
    engine = make_engine()
    with pytest.raises(InvalidInputError, match="different configuration \\(database_url\\); start"):
        Engine.start(**{**ENGINE_DEFAULTS, "name": engine.config.name, "database_url": make_database_url()})
    other_otel = {**engine.config.telemetry_env, "OTEL_SERVICE_NAME": "webhook-server"}
    with pytest.raises(InvalidInputError, match="\\(telemetry_env\\); telemetry_env defaults to "
                       "this process's OTEL_\\* variables.*with another name"):
        Engine.start(**{**ENGINE_DEFAULTS, "name": engine.config.name,
                        "database_url": engine.config.database_url, "telemetry_env": other_otel})
    with pytest.raises(InvalidInputError, match="(?s)invalid engine configuration.*max_hosts"):
        Engine.start(name="x", max_hosts=0)


def test_dynamic_dispatcher_routes_envelopes_on_the_engine(engine, tenant):
    from dynwf_ray.dynamic import wrap_workflow_binding

    from .workflows import Dispatcher

    engine.register(tenant, Dispatcher)  # one class that runs whatever metadata names
    raw = engine.binding(tenant)
    hello = wrap_workflow_binding(raw, {"workflow": "hello"})
    three = wrap_workflow_binding(raw, {"workflow": "three"})
    hello.create(id="d-hello", params={"name": "Dyn"})
    three.create_batch([{"id": "d-three"}])
    assert wait_status(raw.get("d-hello"), "complete")["output"] == {
        "hello": "Hello, Dyn!", "instance": "d-hello",
    }
    assert wait_status(raw.get("d-three"), "complete")["output"] == 3
    bare = raw.create(id="d-bare", params={"name": "no envelope"})
    status = wait_status(bare, "errored")
    assert status["error"]["name"] == "MissingDispatcherMetadataError"
