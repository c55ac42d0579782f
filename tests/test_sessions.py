"""Engine sessions (`sessions.py`) on a real journal, with a fake clock and fake processes:
when another session counts as gone, and what ending it does to its leases.
"""

from __future__ import annotations

import os

from dynwf_ray.journal import SessionInfo
from dynwf_ray.sessions import SessionKeeper, machine_id, process_start, running, why_gone

from .driver import Driver
from .workflows import ThreeSteps


class World:
    """A clock and a set of live (pid, start) pairs the keepers look at."""

    def __init__(self):
        self.now = 1_000_000.0
        self.alive: set[tuple[int, int]] = set()

    def clock(self) -> float:
        return self.now

    def running(self, pid: int, start: int) -> bool:
        return (pid, start) in self.alive

    def keeper(self, journal, *, pid: int, loader: str, machine: str = "m1", timeout=30.0):
        self.alive.add((pid, 1))
        return SessionKeeper(
            journal, "eng", machine=machine, processes=[(pid, 1)], loader_id=loader,
            timeout=timeout, clock=self.clock, is_running=self.running,
        )


def _session(**kw) -> SessionInfo:
    base = dict(epoch=7, engine_name="eng", node="n", machine="m1", processes=((10, 1),),
                loader_id="L1", started_at=0.0, heartbeat_at=100.0)
    return SessionInfo(**{**base, **kw})


def test_a_session_is_gone_only_when_something_says_so_for_certain():
    alive = {(10, 1)}

    def gone(session, **kw):
        args = dict(machine="m1", loader_id="L2", now=110.0, timeout=30.0,
                    is_running=lambda pid, start: (pid, start) in alive)
        return why_gone(session, **{**args, **kw})

    assert gone(_session()) is None  # its process runs: wait for it
    assert "processes" in gone(_session(processes=((11, 1),)))
    assert "processes" in gone(_session(processes=((10, 2),)))  # that pid is another process now
    assert gone(_session(processes=((11, 1),), machine="m2")) is None  # pids elsewhere say nothing
    assert gone(_session(processes=(), machine="m1")) is None  # no processes known here
    assert "loader" in gone(_session(loader_id="L2"))  # its hosts' loader was just reset
    assert "heartbeat" in gone(_session(machine="m2"), now=131.0)
    assert gone(_session(machine="m2"), now=129.0) is None


def test_this_process_is_running_and_a_made_up_one_is_not():
    start = process_start(os.getpid())
    assert start is not None and running(os.getpid(), start)
    assert not running(os.getpid(), start + 1)
    assert process_start(2**22 + 12345) is None
    assert machine_id()  # Linux: boot id and pid namespace


def test_a_crashed_sessions_leases_are_given_up_at_once_and_a_live_ones_kept(journal, tenant):
    d = Driver(journal, tenant, ThreeSteps)
    world = World()
    a = world.keeper(journal, pid=10, loader="LA")
    a.open()
    for i in range(2):
        d.binding.create(id=f"i{i}")
    (held,) = journal.claim_due(d.now, 1, a.owner("host-1"), 30, tenant)
    b = world.keeper(journal, pid=20, loader="LB")
    b.open()  # A's process runs: its lease stays
    assert d.info(held.instance_id).lease_expires_at is not None
    assert b.reclaim() == {}
    world.alive.discard((10, 1))  # A's platform crashed
    world.now += 1
    assert b.reclaim() == {a.epoch: [held.pk]}
    info = d.info(held.instance_id)
    assert info.status == "queued" and info.lease_expires_at is None and info.wake_at <= world.now
    assert a.epoch not in {s.epoch for s in journal.live_sessions()}
    world.now += 1
    assert a.tick() is False  # A, were it alive after all, must not go on
    # the released instance is claimable now, and B's claim fences A out
    again = {c.pk: c for c in journal.claim_due(world.now, 5, b.owner("host-1"), 30, tenant)}
    assert again[held.pk].token > held.token


def test_a_restarted_scheduler_ends_its_predecessors_session_by_the_loader(journal, tenant):
    d = Driver(journal, tenant, ThreeSteps)
    world = World()
    old = world.keeper(journal, pid=10, loader="L")
    old.open()
    d.binding.create(id="x")
    (held,) = journal.claim_due(d.now, 1, old.owner("host-3"), 30, tenant)
    new = world.keeper(journal, pid=11, loader="L")  # the same loader, just reset
    new.open()
    assert new.reclaimed == 1
    assert d.info("x").status == "queued"
    assert held.pk not in [c.pk for c in journal.held_by(old.owner("host-3"))]


def test_a_restarted_scheduler_adopts_its_predecessors_live_session(journal, tenant):
    """Ray restarted the scheduler and the loader kept its hosts: the new scheduler takes
    over the session (same epoch, its own process), so the hosts' leases stay valid."""
    d = Driver(journal, tenant, ThreeSteps)
    world = World()
    old = world.keeper(journal, pid=10, loader="LA")
    old.open()
    other = world.keeper(journal, pid=30, loader="LO", machine="m2")  # another engine, alive
    other.open()
    d.binding.create(id="x")
    (held,) = journal.claim_due(d.now, 1, old.owner("host-3"), 30, tenant)
    world.alive.discard((10, 1))  # the old scheduler's process died
    world.now += 5
    new = world.keeper(journal, pid=11, loader="LA")
    assert new.predecessor().epoch == old.epoch
    assert new.adopt(new.predecessor())
    assert new.epoch == old.epoch and new.reclaimed == 0
    assert journal.held_by(new.owner("host-3"))[0].pk == held.pk  # the lease is intact
    (mine,) = [s for s in journal.live_sessions() if s.epoch == new.epoch]
    assert mine.processes == ((11, 1),) and mine.heartbeat_at == world.now
    assert other.epoch in {s.epoch for s in journal.live_sessions()}  # not ours to end
    world.now += 1
    assert new.tick() is True
    # A session that ended meanwhile cannot be adopted: the new scheduler opens its own.
    journal.end_session(new.epoch, "test", world.now)
    late = world.keeper(journal, pid=12, loader="LA")
    assert late.predecessor() is None
    assert late.adopt(mine) is False and late.epoch is None
    other.close()


def test_a_silent_session_on_another_machine_ends_after_the_lease_time(journal, tenant):
    d = Driver(journal, tenant, ThreeSteps)
    world = World()
    far = world.keeper(journal, pid=10, loader="LF", machine="elsewhere", timeout=30)
    far.open()
    d.binding.create(id="y")
    journal.claim_due(d.now, 1, far.owner("host-1"), 30, tenant)
    near = world.keeper(journal, pid=20, loader="LN", timeout=30)
    near.open()
    world.now += 20
    assert far.tick() is True  # it heartbeats: alive
    world.now += 25
    assert near.reclaim() == {}
    world.now += 10  # 35 s since its last heartbeat
    (pks,) = near.reclaim().values()
    assert len(pks) == 1 and d.info("y").status == "queued"


def test_ending_a_session_frees_only_its_own_leases(journal, tenant):
    """Session 987654321's owner ids ("e987654321/...") are not a prefix of session
    9876543211's: ending the one leaves the other's leases alone."""
    d = Driver(journal, tenant, ThreeSteps)
    epochs = [987654321, 9876543211]
    for i, epoch in enumerate(epochs):
        d.binding.create(id=f"z{i}")
        journal.claim_due(d.now, 1, f"e{epoch}/host-1", 30, tenant)
    assert len(journal.end_session(epochs[0], "test", d.now)) == 1
    assert d.info("z0").status == "queued"
    assert d.info("z1").lease_expires_at is not None
    assert journal.end_session(epochs[0], "test", d.now) == []  # nothing more to give up


def test_scratch_dirs_of_host_processes_that_died_are_swept(tmp_path):
    from dynwf_ray.host import _SCRATCH_OWNER, sweep_scratch

    ours = tmp_path / f"dynwf-sandbox-acme-1-{_SCRATCH_OWNER}-k2j4h1x9"
    dead = tmp_path / f"dynwf-sandbox-acme-1-p{2**22 + 12345}.77-a8d7f6s5"
    unknown = tmp_path / "dynwf-sandbox-acme-0a1b2c3d"  # named before owners were: kept
    for d in (ours, dead, unknown):
        d.mkdir()
        (d / "file").write_text("x")
    assert sweep_scratch(str(tmp_path)) == [str(dead)]
    assert ours.exists() and unknown.exists() and not dead.exists()
