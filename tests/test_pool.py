"""The host pool and the scheduler core, without Ray: driven by a clock.

`HostPool.tick(now, demand, caps)` decides admission (fair shares, tenant caps),
host starts and stops (with reasons) and quotas; `SchedulerCore` adds the
journal: demand read from it, and crash counts kept in it.
"""

from __future__ import annotations

import asyncio

import pytest

from dynwf_ray.host import InstanceHost
from dynwf_ray.journal import Journal
from dynwf_ray.journal.schema import lease_owner_prefix
from dynwf_ray.pool import CodeKey, HostPool, PoolConfig, Quota, Start, Stop, Want, fair_shares
from dynwf_ray.scheduler import SchedulerCore, pool_config
from dynwf_ray.config import EngineConfig
from dynwf_ray.tracing import new_trace_context

A, B, C = CodeKey("a", "v1"), CodeKey("b", "v1"), CodeKey("c", "v1")


def pool(**kw) -> HostPool:
    cfg = dict(max_activations=64, max_hosts=8, host_concurrency=32, cpus=2, idle_after=60.0,
               cold_start_s=1.0)
    cfg.update(kw)
    return HostPool(PoolConfig(**cfg))


def starts(decisions) -> list[Start]:
    return [d for d in decisions if isinstance(d, Start)]


def stops(decisions) -> list[Stop]:
    return [d for d in decisions if isinstance(d, Stop)]


def quotas(p: HostPool) -> dict[CodeKey, int]:
    out: dict[CodeKey, int] = {}
    for h in p.hosts.values():
        if not h.stopping:
            out[h.key] = out.get(h.key, 0) + h.quota
    return out


def bring_up(p: HostPool, now: float, demand, caps=None):
    """Tick, report every host it started as up a second later (a cold start of 1 s),
    and tick again then."""
    for d in starts(p.tick(now, demand, caps)):
        p.started(d.host_id, now + 1.0)
    return p.tick(now + 1.0, demand, caps)


# --- admission ------------------------------------------------------------------------


def test_fair_shares_are_max_min_fair():
    assert fair_shares(64, {"a": 10_000, "b": 1}) == {"a": 63, "b": 1}
    assert fair_shares(64, {"a": 10_000, "b": 10_000}) == {"a": 32, "b": 32}
    assert fair_shares(10, {"a": 3, "b": 100, "c": 100}) == {"a": 3, "b": 4, "c": 3}
    assert fair_shares(64, {"a": 10_000, "b": 10_000}, {"a": 5}) == {"a": 5, "b": 59}
    assert fair_shares(2, {"a": 5, "b": 5, "c": 5}) == {"a": 1, "b": 1, "c": 0}
    assert fair_shares(8, {}) == {}


def test_a_flooding_tenant_leaves_room_for_another():
    p = pool()
    bring_up(p, 0.0, {A: Want(10_000, 0)})
    assert quotas(p) == {A: 32}  # one host of A, as much as one host runs
    decisions = bring_up(p, 1.0, {A: Want(9_968, 32), B: Want(1, 0)})
    assert [d.key for d in starts(p.tick(1.0, {A: Want(9_968, 32), B: Want(1, 0)}))] == []
    assert quotas(p)[B] == 1, decisions
    assert quotas(p)[A] <= 63


def test_max_concurrency_caps_a_tenant():
    p = pool()
    bring_up(p, 0.0, {A: Want(100, 0)}, caps={"a": 3})
    assert quotas(p) == {A: 3}


def test_idle_capacity_is_lent_to_warm_hosts_and_quotas_stay_put():
    p = pool()
    bring_up(p, 0.0, {A: Want(1, 0), B: Want(1, 0)})
    assert quotas(p) == {A: 32, B: 32}  # 62 slots nobody wants, lent evenly
    for t, want in enumerate((5, 0, 17, 3, 0, 9)):  # demand swings; quotas stay
        assert [d for d in p.tick(2.0 + t, {A: Want(want, 1)}) if isinstance(d, Quota)] == []
    bring_up(p, 10.0, {A: Want(10_000, 0), C: Want(1, 0)})
    # Scarce again: what is wanted, and one slot for every warm host (B's next instance
    # starts at once; the next tick shares again).
    assert quotas(p)[C] == 1 and quotas(p)[B] == 1 and quotas(p)[A] == 32


def test_a_host_short_of_slots_is_worth_a_tick_only_when_one_could_raise_its_quota():
    """A version that was quiet while capacity was scarce has a quota of 1; when its
    load rises, its host (every slot taken, more waiting) asks, and a tick now gives it
    the capacity back. A host at what one host may run is not worth a tick."""
    p = pool(max_activations=16, host_concurrency=16)
    bring_up(p, 0.0, {A: Want(1, 0), B: Want(1, 0), C: Want(1, 0)})
    bring_up(p, 10.0, {B: Want(100, 0), C: Want(100, 0)})
    (a,) = [h for h in p.hosts.values() if h.key == A]
    assert a.quota == 1 and p.could_give_more(a.id)
    p.tick(20.0, {A: Want(500, 1)})  # the tick it asked for: B and C went quiet
    assert a.quota == 16 and not p.could_give_more(a.id)
    assert not p.could_give_more(999)  # a host the pool does not know (ended)
    p.tick(21.0, {A: Want(500, 16)})
    p.stop_version("a")
    assert not p.could_give_more(a.id)  # stopping: it takes no more work


def test_a_host_says_it_is_short_of_slots_once_per_quota():
    """The host's half: a wake that finds every slot taken tells the scheduler once,
    until a new quota comes; a wake with a free slot, or to a stopping host, tells
    nothing. (The host is built without its sandboxes: only its slots matter here.)"""
    told = []
    host = InstanceHost.__new__(InstanceHost)
    host._wake, host._stopping, host._running, host._blocked = None, False, {}, {}
    host._short_of_slots, host._said_short = lambda: told.append(1), False
    asyncio.run(host.set_quota(2))
    host._running = {1: 1}
    assert host.wake() and told == []  # a slot is free: it claims, nothing to ask
    host._blocked = {2: 1}
    host.wake(), host.wake()
    assert told == [1]  # every slot taken: once, however many wakes
    asyncio.run(host.set_quota(2))  # any quota set since lets it ask again
    host.wake()
    assert told == [1, 1]
    asyncio.run(host.set_quota(3))
    host._stopping = True
    assert not host.wake() and told == [1, 1]  # a free slot, and stopping anyway


# --- hosts follow demand -------------------------------------------------------------


def test_an_adopted_host_takes_quotas_at_once_and_new_hosts_get_new_ids():
    """A restarted scheduler adopts its predecessor's live hosts: no start for their
    version, a quota set at the first tick, and ids it starts never collide with them."""
    p = pool()
    p._next_id = 100
    p.adopt(500, A, 0.0)
    decisions = p.tick(1.0, {A: Want(3, 0), B: Want(1, 0)})
    assert [d.key for d in starts(decisions)] == [B]  # A has its adopted host
    assert starts(decisions)[0].host_id > 500
    assert Quota(500, 32) in decisions and quotas(p)[A] == 32
    assert [d for d in p.tick(1.0 + 61, {}) if isinstance(d, Stop)][0].host_id == 500  # idle


def test_a_version_gets_a_second_host_only_after_a_backlog_outlasts_a_cold_start():
    p = pool(host_concurrency=4)
    bring_up(p, 0.0, {A: Want(100, 0)})  # up at 1.0; the backlog seen since then
    assert len(p.hosts) == 1
    assert starts(p.tick(1.5, {A: Want(96, 4)})) == []  # backlog for 0.5 s < 1 s cold start
    (second,) = starts(p.tick(2.1, {A: Want(90, 4)}))
    assert second.reason == "backlog longer than a cold start"
    p.started(second.host_id, 3.0)
    assert len([h for h in p.hosts.values() if h.key == A]) == 2
    assert starts(p.tick(5.0, {A: Want(80, 8)})) == []  # at most `cpus` hosts per version


def test_steady_load_starts_and_stops_nothing_after_warm_up():
    p = pool()
    bring_up(p, 0.0, {A: Want(5, 0), B: Want(3, 0)})
    before = dict(p.counters)
    for t in range(1, 600):  # ten minutes of steady work at one tick a second
        decisions = p.tick(float(t), {A: Want(t % 7, 3), B: Want(t % 3, 1)})
        assert not starts(decisions) and not stops(decisions), (t, decisions)
    assert p.counters == before


def test_an_idle_version_is_deactivated_after_idle_after_and_surplus_hosts_after_a_quarter():
    p = pool(host_concurrency=4, idle_after=60.0)
    bring_up(p, 0.0, {A: Want(100, 0)})
    (extra,) = starts(p.tick(2.0, {A: Want(90, 4)}))
    p.started(extra.host_id, 3.0)
    p.tick(3.0, {A: Want(1, 0)})  # the work now fits in one host
    assert stops(p.tick(10.0, {A: Want(1, 0)})) == []
    (surplus,) = stops(p.tick(18.1, {A: Want(1, 0)}))
    assert surplus.reason == "surplus" and surplus.host_id == extra.host_id
    p.ended(surplus.host_id)
    assert stops(p.tick(60.0, {})) == []
    (idle,) = stops(p.tick(78.2, {}))
    assert idle.reason == "idle"
    assert p.counters == {
        "starts: first host of its code": 1, "starts: backlog longer than a cold start": 1,
        "stops: surplus": 1, "stops: idle": 1,
    }


def test_at_max_hosts_a_new_version_evicts_the_longest_idle_host():
    p = pool(max_hosts=2)
    bring_up(p, 0.0, {A: Want(1, 0)})
    bring_up(p, 5.0, {B: Want(1, 0)})
    p.tick(7.0, {})
    decisions = p.tick(8.0, {C: Want(1, 0)})
    (evicted,) = stops(decisions)
    assert evicted.key == A and evicted.reason == "evicted"
    assert [d.key for d in starts(decisions)] == [C]


def test_at_max_hosts_a_version_waits_while_every_host_works():
    p = pool(max_hosts=1)
    bring_up(p, 0.0, {A: Want(0, 1)})
    decisions = p.tick(1.0, {A: Want(0, 1), B: Want(1, 0)})
    assert not starts(decisions) and not stops(decisions)


def test_stopping_a_tenant_stops_only_its_hosts():
    p = pool()
    bring_up(p, 0.0, {A: Want(1, 0), B: Want(1, 0)})
    (stop,) = p.stop_version("a")
    assert stop.key == A and stop.reason == "settings changed"
    assert all(isinstance(d, (Start, Quota)) for d in p.tick(1.0, {A: Want(1, 0)}))


def test_default_limits_come_from_the_cluster():
    cfg = pool_config(EngineConfig(database_url="sqlite://"), cpus=2, memory_bytes=16 << 30)
    assert (cfg.max_activations, cfg.max_hosts, cfg.cpus) == (16, 32, 2)
    small = pool_config(EngineConfig(database_url="sqlite://"), cpus=16, memory_bytes=2 << 30)
    assert small.max_hosts == 8  # one per 256 MiB of memory
    tuned = pool_config(EngineConfig(database_url="sqlite://", max_hosts=3, max_activations=5), 2, 1 << 34)
    assert (tuned.max_hosts, tuned.max_activations) == (3, 5)


# --- the scheduler core: demand and crash counts in the journal -------------------------


@pytest.fixture
def journal(tmp_path):
    j = Journal(f"sqlite:///{tmp_path}/j.db")
    yield j
    j.close()


def _create(journal: Journal, tenant: str, n: int, now: float) -> None:
    journal.save_code(tenant, "v1", "bench", b"", now)
    journal.create_instances(
        tenant, "v1", [(f"i{i}", "{}", "{}", *new_trace_context()) for i in range(n)], now,
        skip_existing=False,
    )


def test_core_reads_demand_and_caps_from_the_journal(journal):
    _create(journal, "a", 5, 100.0)
    _create(journal, "b", 2, 100.0)
    journal.set_tenant_policy("a", '{"max_concurrency": 2}', 100.0)
    journal.claim_due(100.0, 1, "someone", 30.0, "b", "v1")
    core = SchedulerCore(journal, pool_config(EngineConfig(database_url="sqlite://"), 2, 1 << 34),
                         max_failures=3)
    assert journal.demand(100.0) == {("a", "v1"): (5, 0), ("b", "v1"): (1, 1)}
    for d in starts(core.tick(100.0)):
        core.pool.started(d.host_id, 100.0)
    core.tick(100.0)
    # 16 slots: a is capped at 2; b gets its 2 and half of the 12 nobody wants
    assert quotas(core.pool) == {CodeKey("a", "v1"): 2, CodeKey("b", "v1"): 8}


def test_crash_counts_live_in_the_journal_and_end_in_an_error(journal):
    _create(journal, "a", 1, 100.0)
    cfg = pool_config(EngineConfig(database_url="sqlite://"), 2, 1 << 34)
    for attempt in range(1, 4):
        # a new core each time: as if the scheduler restarted between crashes
        core = SchedulerCore(journal, cfg, max_failures=3, host_owner=lambda i: f"host-{i}")
        now = 100.0 + attempt
        (claim,) = journal.claim_due(now, 1, "host-7", 30.0)
        given_up = core.host_died(7, now, "killed")
        info = journal.get_instance("a", "i0")
        if attempt < 3:
            assert given_up == [] and info.status == "queued" and info.wake_at == 100.0
        else:
            assert given_up == [claim.pk]
            assert info.status == "errored" and info.error_name == "HostDiedError"
            assert "3 activations in a row crashed" in info.error_message


def test_instances_of_a_dead_host_keep_their_place_in_the_queue(journal):
    """Released after their host died, instances are due at the time they were due when
    claimed, ahead of work that came due since (not behind it, as `wake_at = now` did)."""
    journal.save_code("a", "v1", "bench", b"", 100.0)
    for i, at in enumerate([100.0, 101.0, 102.0]):
        journal.create_instances("a", "v1", [(f"i{i}", "{}", "{}", *new_trace_context())], at,
                                 skip_existing=False)
    (first,) = journal.claim_due(110.0, 1, "host-7", 30.0)
    assert journal.get_instance("a", "i0").pk == first.pk
    journal.create_instances("a", "v1", [("late", "{}", "{}", *new_trace_context())], 120.0,
                             skip_existing=False)
    core = SchedulerCore(journal, pool_config(EngineConfig(database_url="sqlite://"), 2, 1 << 34),
                         max_failures=3, host_owner=lambda i: f"host-{i}")
    core.host_died(7, 130.0, "its node was lost")
    order = [c.instance_id for c in journal.claim_due(131.0, 10, "host-8", 30.0)]
    assert order == ["i0", "i1", "i2", "late"]
    # the same for the leases of an engine session found gone
    journal.end_session(0, "gone", 140.0)  # an owner of no session: nothing given up
    assert journal.get_instance("a", "i0").lease_expires_at is not None
    # every lease expired at 161: taken again, in session 5
    assert len(journal.claim_due(200.0, 10, f"{lease_owner_prefix(5)}host-1", 30.0)) == 4
    journal.create_instances("a", "v1", [("newer", "{}", "{}", *new_trace_context())], 150.0,
                             skip_existing=False)
    journal.end_session(5, "its machine restarted", 201.0)
    order = [c.instance_id for c in journal.claim_due(202.0, 10, "host-9", 30.0)]
    assert order == ["i0", "i1", "i2", "late", "newer"]


def test_a_host_lost_with_its_node_counts_no_crash(journal):
    """Instances whose host went down with its node are released without a crash counted:
    losing a node is nobody's fault, however often it happens."""
    _create(journal, "a", 1, 100.0)
    cfg = pool_config(EngineConfig(database_url="sqlite://"), 2, 1 << 34)
    for attempt in range(1, 6):  # more than max_failures node losses in a row
        core = SchedulerCore(journal, cfg, max_failures=3, host_owner=lambda i: f"host-{i}")
        now = 100.0 + attempt
        journal.claim_due(now, 1, "host-7", 30.0)
        assert core.host_died(7, now, "The actor is dead because its node has died.",
                              node_lost=True) == []
        assert core.counters["hosts_lost_with_node"] == 1
        info = journal.get_instance("a", "i0")
        assert info.status == "queued" and info.wake_at == 100.0
    assert journal.history("a", "i0").crashes == 0


def test_a_restart_releases_the_leases_of_hosts_it_could_not_adopt(journal):
    """A scheduler that adopted its session gives up at once the leases of the session's
    hosts that are gone (they died while no scheduler watched), keeps the adopted
    hosts' leases, and leaves other sessions' alone; no crash is counted."""
    _create(journal, "a", 3, 100.0)
    cfg = pool_config(EngineConfig(database_url="sqlite://"), 2, 1 << 34)
    core = SchedulerCore(journal, cfg, max_failures=3, host_owner=lambda i: f"e7/host-{i}")
    journal.claim_due(101.0, 1, "e7/host-1", 30.0)  # adopted
    journal.claim_due(101.0, 1, "e7/host-2", 30.0)  # gone
    journal.claim_due(101.0, 1, "e77/host-2", 30.0)  # another session's
    assert journal.lease_owners(7) == ["e7/host-1", "e7/host-2"]
    assert core.release_unadopted(7, {"e7/host-1"}, 102.0) == 1
    assert core.counters["instances_unadopted"] == 1
    assert [c.instance_id for c in journal.held_by("e7/host-1")] == ["i0"]
    assert journal.held_by("e7/host-2") == []
    assert [c.instance_id for c in journal.held_by("e77/host-2")] == ["i2"]
    assert journal.get_instance("a", "i1").status == "queued"
    assert journal.history("a", "i1").crashes == 0

