"""The replay check (`replay_check.py`) on real journal histories, with trusted workflow
classes run in-process (an engine runs it in a sandbox of the candidate version)."""

from __future__ import annotations

import asyncio

import pytest

from dynwf_ray import ReplayDivergenceError, WorkflowEntrypoint
from dynwf_ray.activation import InProcess
from dynwf_ray.replay_check import check_replay

from .driver import Driver

RAN: list[str] = []


class V1(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: 1)
        await step.sleep("nap", 5)
        ok = await step.wait_for_event("approval", type="approval", timeout="1 hour")
        return [a, ok.payload, await step.do("b", lambda: 2)]


class SameSteps(WorkflowEntrypoint):
    """V1 with different callbacks and more after its last recorded step: fine."""

    async def run(self, event, step):
        a = await step.do("a", lambda: RAN.append("a") or 10)
        await step.sleep("nap", 99)
        ok = await step.wait_for_event("approval", type="approval", timeout="2 hours")
        await step.do("b", lambda: RAN.append("b"))
        return [a, ok.payload, await step.do("c", lambda: RAN.append("c"))]


class Renamed(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("a2", lambda: 1)
        await step.sleep("nap", 5)


class Inserted(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("new first", lambda: 0)
        await step.do("a", lambda: 1)


class SleepsInstead(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep("a", 1)


class EndsEarly(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("a", lambda: 1)


def _history(journal, tenant, at: str):
    """An instance of V1 that got as far as `at` ("sleeping" or "waiting")."""
    d = Driver(journal, tenant, V1)
    d.binding.create(id="x")
    assert d.tick() == ["suspended"]  # asleep
    if at == "waiting":
        d.now += 5
        assert d.tick() == ["suspended"]
    return journal.history(tenant, "x")


def _check(state, cls):
    asyncio.run(check_replay(state, "v2", InProcess(cls), clock=lambda: 1_000_000.0))


@pytest.mark.parametrize("at", ["sleeping", "waiting"])
def test_the_same_steps_replay_cleanly_and_nothing_runs(journal, tenant, at):
    RAN.clear()
    state = _history(journal, tenant, at)
    _check(state, SameSteps)
    _check(state, V1)
    assert RAN == []  # no callback ran: the frontier stops the run


@pytest.mark.parametrize("cls, message", [
    (Renamed, r"at step 'a2' \(count 1\), which the journal does not hold, with recorded steps "
              r"never asked for: 'a' \(count 1\)"),
    (Inserted, r"at step 'new first' \(count 1\).*never asked for: 'a' \(count 1\)"),
    (SleepsInstead, r"at step 'a' \(count 1\) the code asks for a sleep step where the journal "
                    r"holds a do step"),
    (EndsEarly, r"run\(\) ended, with recorded steps never asked for: 'nap' \(count 1\)"),
])
def test_a_history_that_would_not_replay_is_named(journal, tenant, cls, message):
    state = _history(journal, tenant, "waiting")
    with pytest.raises(ReplayDivergenceError, match=message) as raised:
        _check(state, cls)
    assert "instance 'x' would not replay on version 'v2'" in str(raised.value)
