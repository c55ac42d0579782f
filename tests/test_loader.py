"""The loader's placement rules, without Ray: which nodes take new host processes, and
when the machine writer commits for them (SQLite)."""

from __future__ import annotations

from dynwf_ray.config import EngineConfig
from dynwf_ray.loader import machine_writer, processes_per_node


def node(node_id: str, cpus: int, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": float(cpus)}}


def test_alive_nodes_that_are_not_draining_take_host_processes():
    nodes = [node("head", 4), node("w1", 16), node("dead", 8, alive=False), node("leaving", 12)]
    assert processes_per_node(nodes, {"leaving"}, is_sqlite=False, host_processes=None) == {
        "head": 4, "w1": 16}  # PostgreSQL: one per CPU
    assert processes_per_node(nodes, set(), is_sqlite=True, host_processes=None) == {
        "head": 2, "w1": 4, "leaving": 3}  # SQLite: a quarter of the CPUs, 2 to 4
    assert processes_per_node([node("two", 2), node("big", 64)], set(), True, None) == {"two": 2, "big": 4}
    assert processes_per_node([node("two", 2), node("big", 64)], set(), False, None) == {
        "two": 2, "big": 16}  # at most 16: what was measured
    assert processes_per_node([node("tiny", 1)], set(), is_sqlite=False, host_processes=None) == {
        "tiny": 1}
    assert processes_per_node([node("tiny", 1)], set(), is_sqlite=True, host_processes=None) == {
        "tiny": 1}
    assert processes_per_node(nodes, {"head", "w1", "leaving"}, False, 3) == {}
    assert processes_per_node(nodes, set(), False, 3) == {"head": 3, "w1": 3, "leaving": 3}


def test_the_machine_writer_is_the_default_from_four_host_processes_on_sqlite():
    default, two = EngineConfig(), [node("two", 2)]
    assert not machine_writer(default, two)  # 2 processes: each its own
    assert machine_writer(default, [node("big", 16)])  # 4
    assert machine_writer(default, [node("a", 8), node("b", 8)])  # 2 + 2 on one machine
    assert machine_writer(EngineConfig(host_processes=4), two)
    assert machine_writer(EngineConfig(journal_writer="machine"), two)
    assert not machine_writer(EngineConfig(journal_writer="process"), [node("big", 16)])
