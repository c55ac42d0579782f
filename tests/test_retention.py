"""Deleting instances and the retention sweeper, on a real journal with a fake clock (no Ray),
and once on a running engine."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from dynwf_ray import InstanceNotFoundError, InvalidInputError, InvalidStateError
from dynwf_ray.activation import activate
from dynwf_ray.journal import Journal
from dynwf_ray.pool import PoolConfig
from dynwf_ray.scheduler import SchedulerCore
from dynwf_ray.types import Retention

from .conftest import wait_status, wait_until
from .driver import Driver
from .workflows import Approval, Hello, ThreeSteps


def _finished(d: Driver, status: str, instance_id: str, at: float) -> None:
    """An instance of d's tenant that reached `status` at time `at`."""
    d.now = at
    h = d.binding.create(id=instance_id)
    if status == "terminated":
        h.terminate()
    elif status == "complete":
        d.tick()
    else:
        (claim,) = d.journal.claim_due(at, 1, "t", 30, d.tenant)
        d.journal.fail(claim.pk, claim.token, "Boom", "it broke", at)
    assert d.info(instance_id).status == status


def test_delete_removes_everything_and_refuses_a_running_instance(journal, tenant):
    d = Driver(journal, tenant, ThreeSteps)
    done = d.binding.create(id="done")
    d.tick()
    assert done.status()["status"] == "complete"
    done.delete()
    with pytest.raises(InstanceNotFoundError):
        done.status()
    assert d.binding.create(id="done").id == "done"  # the id is free again
    assert d.tick() == ["complete"]

    busy = d.binding.create(id="busy")
    (claim,) = journal.claim_due(d.now, 1, "t", 30, tenant)
    with pytest.raises(InvalidStateError, match="'busy' is running"):
        busy.delete()
    with pytest.raises(InstanceNotFoundError):
        Driver(journal, f"{tenant}x", ThreeSteps).binding.get("busy")  # another tenant's: unknown
    busy.delete(force=True)
    outcome = asyncio.run(activate(journal, claim.pk, claim.token, ThreeSteps, clock=d.clock))
    assert outcome == "lease_lost"  # the running activation was fenced out
    assert journal.list_steps(claim.pk) == []


@pytest.fixture
def own_journal(make_database_url):
    """A journal of its own: a sweep deletes every tenant's expired instances."""
    journal = Journal(make_database_url())
    yield journal
    journal.close()


def test_sweep_deletes_what_expired_by_status_and_tenant_in_bounded_batches(own_journal, tenant):
    journal = own_journal
    d = Driver(journal, tenant, Hello)
    own = Driver(journal, f"{tenant}o", Hello)
    t0 = 1_000_000.0
    for i in range(3):
        _finished(d, "complete", f"c{i}", t0)
    _finished(d, "complete", "recent", t0 + 95)
    _finished(d, "errored", "e", t0)
    _finished(d, "terminated", "t", t0)
    _finished(own, "complete", "c", t0)
    _finished(own, "errored", "e", t0)
    waiting = d.binding.create(id="open")  # not finished: never swept
    keep = {"complete": 10.0, "errored": None, "terminated": 0.0}
    tenants = {own.tenant: {**keep, "complete": None, "errored": 50.0}}
    now = t0 + 100
    assert journal.sweep(now, keep, tenants, limit=2) == 2
    assert journal.sweep(now, keep, tenants, limit=100) == 3  # c*, t; own's e
    assert journal.sweep(now, keep, tenants, limit=100) == 0
    left = {i.instance_id for i in journal.list_instances(tenant, None, 100)}
    assert left == {"recent", "e", "open"}
    assert {i.instance_id for i in journal.list_instances(own.tenant, None, 100)} == {"c"}
    assert waiting.status()["status"] == "queued"


def test_the_scheduler_core_applies_tenant_rules_over_the_engines(own_journal, tenant):
    journal = own_journal
    d = Driver(journal, tenant, Hello)
    other = Driver(journal, f"{tenant}b", Hello)
    t0 = 2_000_000.0
    _finished(d, "complete", "x", t0)
    _finished(other, "complete", "y", t0)
    journal.set_retention(other.tenant, json.dumps({"complete": 5}), t0)
    core = SchedulerCore(
        journal, PoolConfig(max_activations=4, max_hosts=4, host_concurrency=4, cpus=1, idle_after=60),
        max_failures=3, retention=Retention(complete="1 hour"),
    )
    core.sweep(t0 + 60)
    assert d.info("x") is not None and other.info("y") is None
    core.sweep(t0 + 3601)
    assert d.info("x") is None and core.counters["instances_swept"] >= 2


def test_retention_settings_are_validated_and_read_back(make_engine, tenant):
    engine = make_engine(retention={"complete": "1 hour", "errored": "7 days"})
    assert engine.retention(tenant) == Retention(complete=3600, errored=7 * 86400)
    assert engine.set_retention(tenant, complete=2, terminated="1 minute") == Retention(
        complete=2, errored=7 * 86400, terminated=60
    )
    with pytest.raises(InvalidInputError, match="complete"):
        engine.set_retention(tenant, complete="soon")
    with pytest.raises(InvalidInputError, match="finished"):
        engine.set_retention(tenant, finished=1)
    engine.register(tenant, Hello)
    engine.register(f"{tenant}k", Approval)
    gone = [engine.binding(tenant).create(params={"name": str(i)}) for i in range(3)]
    kept = engine.binding(f"{tenant}k").create()
    for h in gone:
        wait_status(h, "complete")

    def swept():
        try:
            gone[-1].status()
        except InstanceNotFoundError:
            return True
        return False

    wait_until(swept, timeout=40, what="the sweeper to delete the expired instances")
    assert engine.stats()["instances_swept"] >= 3
    assert kept.status()["status"] in ("queued", "running", "waiting")
    engine.clear_retention(tenant)
    assert engine.retention(tenant) == Retention(complete=3600, errored=7 * 86400)


def test_dynwf_delete(shared_journal_url, journal, tenant, capsys):
    from dynwf_ray.cli import main

    d = Driver(journal, tenant, ThreeSteps)
    d.binding.create(id="cli-del")
    journal.claim_due(time.time(), 1, "t", 30, tenant)  # the CLI's clock is the real one
    args = ["cli-del", "--tenant", tenant, "--database-url", shared_journal_url]
    assert main(["delete", *args]) == 2
    assert "is running" in capsys.readouterr().err
    assert main(["delete", *args, "--force"]) == 0
    assert f"deleted {tenant}/cli-del" in capsys.readouterr().out
    assert main(["status", *args]) == 2
