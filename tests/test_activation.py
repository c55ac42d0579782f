"""Activations against a real journal with a fake clock: replay, retries, sleeps, waits, fencing.

No Ray here: the scheduler's role is played by `Driver`, which claims due
instances and activates them in-process, so time and ordering are exact.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from dynwf_ray import (
    DuplicateInstanceError,
    InstanceNotFoundError,
    InvalidInputError,
    InvalidStateError,
    NonRetryableError,
    UnknownTenantError,
    WorkflowEntrypoint,
    WorkflowTimeoutError,
)
from dynwf_ray.activation import activate
from dynwf_ray.binding import WorkflowBinding
from dynwf_ray.cli import main
from dynwf_ray.journal import LeaseLostError, StepRecord
from dynwf_ray.types import LogLine

from .driver import Driver
from .workflows import CALLS, Booked, Drifting, Saga, count


class Replayed(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: count("a"))
        await step.sleep("nap", "10 seconds")
        b = await step.do("b", lambda: count("b"))
        loop = [await step.do("same", lambda i=i: i) for i in range(3)]
        return {"a": a, "b": b, "loop": loop, "params": event.payload}


class SleepsUntilNaN(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep_until("never", float("nan"))


class FailsWithSurrogate(WorkflowEntrypoint):
    async def run(self, event, step):
        raise RuntimeError("card declined: \udcff")


def test_replay_runs_each_step_once_and_counts_repeated_names(journal, tenant):
    d = Driver(journal, tenant, Replayed)
    d.binding.create(id="r1", params={"k": "v"})
    assert d.tick() == ["suspended"]
    assert d.info("r1").status == "waiting"
    assert d.info("r1").wake_at == d.now + 10
    d.now += 5
    assert d.tick() == []  # not due yet
    d.now += 5
    assert d.tick() == ["complete"]
    info = d.info("r1")
    assert json.loads(info.output_json) == {"a": 1, "b": 1, "loop": [0, 1, 2], "params": {"k": "v"}}
    assert CALLS == {"a": 1, "b": 1}
    assert [k for k in d.steps("r1") if k[0] == "same"] == [("same", 1), ("same", 2), ("same", 3)]


class Retrying(WorkflowEntrypoint):
    async def run(self, event, step):
        def flaky(ctx):
            count("flaky")
            if ctx.attempt < event.payload["succeed_at"]:
                raise RuntimeError(f"attempt {ctx.attempt} failed")
            return ctx.attempt

        config = {"limit": 3, "delay": "2 seconds", "backoff": event.payload["backoff"]}
        return await step.do("flaky", flaky, retries=config)


@pytest.mark.parametrize(
    "backoff, waits", [("constant", [2, 2, 2]), ("linear", [2, 4, 6]), ("exponential", [2, 4, 8])]
)
def test_retries_suspend_for_each_backoff_delay(journal, tenant, backoff, waits):
    d = Driver(journal, tenant, Retrying)
    d.binding.create(id="f", params={"backoff": backoff, "succeed_at": 4})
    for wait in waits:
        assert d.tick() == ["suspended"]
        step = d.steps("f")[("flaky", 1)]
        assert step.status == "retrying"
        assert step.next_attempt_at == pytest.approx(d.now + wait)
        d.now += wait - 0.5
        assert d.tick() == []  # the retry is not due before its delay
        d.now += 0.5
    assert d.tick() == ["complete"]
    assert json.loads(d.info("f").output_json) == 4
    assert CALLS["flaky"] == 4


class Forever(WorkflowEntrypoint):
    async def run(self, event, step):
        def flaky(ctx):
            if ctx.attempt < 12:
                raise RuntimeError(f"attempt {ctx.attempt} failed")
            return [ctx.attempt, ctx.config.retries.limit, ctx.config.timeout]

        return await step.do("flaky", flaky, retries={"limit": None, "delay": 1, "backoff": "constant"},
                             timeout="5 seconds")


def test_retries_without_a_limit_go_on_and_the_context_carries_the_steps_options(journal, tenant):
    d = Driver(journal, tenant, Forever)
    d.binding.create(id="f")
    while d.tick() == ["suspended"]:
        d.now += 1
    assert json.loads(d.info("f").output_json) == [12, None, 5.0]


def test_retries_exhausted_error_the_instance_with_the_last_error(journal, tenant):
    d = Driver(journal, tenant, Retrying)
    d.binding.create(id="f", params={"backoff": "constant", "succeed_at": 99})
    for _ in range(3):
        d.tick()
        d.now += 2
    assert d.tick() == ["errored"]
    info = d.info("f")
    assert info.error_name == "RuntimeError"
    assert "step 'flaky' failed after 4 attempt(s)" in info.error_message
    assert "attempt 4 failed" in info.error_message
    assert CALLS["flaky"] == 4


class CatchesFailure(WorkflowEntrypoint):
    async def run(self, event, step):
        def refuse():
            count("refuse")
            raise NonRetryableError("card stolen")

        try:
            await step.do("charge", refuse)
        except Exception as exc:  # a failed step can be handled by run()
            caught = f"{type(exc).__name__}: {exc}"
        await step.sleep("then", 1)
        return caught


def test_non_retryable_error_fails_the_step_at_once_and_replays_the_same_error(journal, tenant):
    d = Driver(journal, tenant, CatchesFailure)
    d.binding.create(id="n")
    assert d.tick() == ["suspended"]
    d.now += 1
    assert d.tick() == ["complete"]
    assert CALLS["refuse"] == 1
    out = json.loads(d.info("n").output_json)
    assert out == "StepFailedError: step 'charge' failed after 1 attempt(s): NonRetryableError: card stolen"


class SlowAsync(WorkflowEntrypoint):
    async def run(self, event, step):
        async def slow():
            count("slow")
            await asyncio.sleep(10)

        return await step.do("slow", slow, retries={"limit": 0}, timeout=0.05)


def test_async_step_timeout(journal, tenant):
    d = Driver(journal, tenant, SlowAsync)
    d.binding.create(id="s")
    assert d.tick() == ["errored"]
    info = d.info("s")
    assert info.error_name == "StepTimeoutError"
    assert "exceeded its timeout of 0.05 s" in info.error_message


class BadResults(WorkflowEntrypoint):
    async def run(self, event, step):
        kind = event.payload
        if kind == "big":
            return await step.do("big", lambda: "x" * (1024 * 1024 + 10))
        if kind == "unserializable":
            return await step.do("obj", lambda: object())
        if kind == "name":
            return await step.do("n" * 300, lambda: 1)
        if kind == "output":
            return {1, 2}
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("big", "PayloadTooLargeError", "result of step 'big' is 1048588 bytes"),
        ("unserializable", "NotSerializableError", "result of step 'obj' is not JSON-serializable"),
        ("name", "InvalidInputError", "limit is 256"),
        ("output", "NotSerializableError", "output of instance 'b' is not JSON-serializable"),
    ],
)
def test_bad_results_and_names_error_with_a_clear_message(journal, tenant, kind, error, message):
    d = Driver(journal, tenant, BadResults)
    d.binding.create(id="b", params=kind)
    assert d.tick() == ["errored"]
    info = d.info("b")
    assert info.error_name == error
    assert message in info.error_message


class Waits(WorkflowEntrypoint):
    async def run(self, event, step):
        first = await step.wait_for_event("first", type="go", timeout="1 minute")
        second = await step.wait_for_event("second", type="go", timeout="1 minute")
        try:
            await step.wait_for_event("never", type="other", timeout="30 seconds")
            late = "got one"
        except WorkflowTimeoutError as exc:
            late = str(exc)
        return [first.payload, second.payload, first.type, late]


def test_events_buffer_fifo_before_the_wait_and_waits_time_out(journal, tenant):
    d = Driver(journal, tenant, Waits)
    handle = d.binding.create(id="w")
    handle.send_event("go", {"n": 1})  # sent before the workflow ever ran
    handle.send_event("go", {"n": 2})
    handle.send_event("unrelated", {"n": 0})
    assert d.tick() == ["suspended"]  # consumed both, now waits for "other"
    info = d.info("w")
    assert info.waiting_for == "other" and info.wake_at == d.now + 30
    d.now += 29
    assert d.tick() == []
    d.now += 1
    assert d.tick() == ["complete"]
    out = json.loads(d.info("w").output_json)
    assert out[:3] == [{"n": 1}, {"n": 2}, "go"]
    assert "got no 'other' event within 30 s" in out[3]


def test_an_event_wakes_a_waiting_instance_at_once(journal, tenant):
    d = Driver(journal, tenant, Waits)
    handle = d.binding.create(id="w")
    assert d.tick() == ["suspended"]
    assert d.info("w").waiting_for == "go"
    handle.send_event("go", {"n": 1})
    assert d.info("w").wake_at == d.now
    assert d.tick() == ["suspended"]  # took it, now waits for the second one


def test_stale_lease_cannot_record_a_step(journal, tenant):
    d = Driver(journal, tenant, Replayed)
    d.binding.create(id="x")
    (first,) = journal.claim_due(d.now, 10, "a", 5, tenant)
    d.now += 6  # lease expired: someone else claims it
    (second,) = journal.claim_due(d.now, 10, "b", 5, tenant)
    assert second.token == first.token + 1
    record = StepRecord("a", 1, "do", "complete", "1", None, None, 1, None, d.now, d.now)
    with pytest.raises(LeaseLostError):
        journal.record_step(first.pk, first.token, record, d.now, 5)
    journal.record_step(second.pk, second.token, record, d.now, 5)
    outcome = asyncio.run(activate(journal, first.pk, first.token, Replayed, clock=d.clock))
    assert outcome == "lease_lost"


def test_an_activation_of_a_deleted_instance_cannot_write_into_the_next_one_created(journal, tenant):
    """SQLite gave the newest instance's pk, once it was deleted, to the next instance
    created (of any tenant), whose first lease token matched too: an activation of the
    deleted one, still running, then wrote into it. A pk is never used twice now, and an
    activation whose lease is gone writes nothing at its end (no logs, no crash)."""
    d = Driver(journal, tenant, Replayed)
    d.binding.create(id="x")
    (stale,) = journal.claim_due(d.now, 10, "a", 30, tenant)
    journal.delete_instance(tenant, "x", d.now, force=True)
    victim = Driver(journal, tenant + "v", Replayed)
    victim.binding.create(id="y")
    (claim,) = journal.claim_due(d.now, 10, "b", 30, tenant + "v")
    assert claim.pk != stale.pk
    with pytest.raises(LeaseLostError):
        journal.complete(stale.pk, stale.token, '"forged"', d.now)
    line = LogLine(at=d.now, stream="stdout", message="forged")
    with journal._write() as conn:  # what a crashed activation's end writes: refused
        journal._end_activation(conn, ("release", stale.token, None, d.now), stale.pk, [line],
                                100, crashed=True, had_crashes=False)
    with journal._write() as conn:  # the same, with the lease taken by another activation
        journal._end_activation(conn, ("release", claim.token - 1, None, d.now), claim.pk, [line],
                                100, crashed=True, had_crashes=False)
    state = journal.load_activation(claim.pk, claim.token)
    assert state.crashes == 0 and state.info.output_json is None
    assert victim.binding.get("y").logs() == []


def test_a_step_extends_the_lease_only_when_half_of_it_is_left(journal, tenant):
    # So that on PostgreSQL a step's write changes no indexed column (a HOT update):
    # the host's renewals, every third of the lease, keep it long.
    d = Driver(journal, tenant, Replayed)
    d.binding.create(id="x")
    (claim,) = journal.claim_due(d.now, 10, "a", 30, tenant)
    claimed = d.info("x")
    assert claimed.lease_expires_at == d.now + 30
    record = StepRecord("a", 1, "do", "complete", "1", None, None, 1, None, d.now, d.now)
    d.now += 10  # 20 s of 30 left
    journal.record_step(claim.pk, claim.token, record, d.now, 30)
    after = d.info("x")
    assert (after.lease_expires_at, after.updated_at) == (claimed.lease_expires_at, claimed.updated_at)
    d.now += 6  # 14 s left: extended
    journal.record_step(claim.pk, claim.token, replace(record, seq=2), d.now, 30)
    assert d.info("x").lease_expires_at == d.now + 30
    d.now += 1  # the host's renewal extends it however much is left
    journal.renew_leases([(claim.pk, claim.token)], d.now, 30)
    assert d.info("x").lease_expires_at == d.now + 30


class Pausable(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: count("a"))
        await step.sleep("nap", 5)
        b = await step.do("b", lambda: count("b"))
        return a + b


def test_pause_resume_terminate_restart(journal, tenant):
    d = Driver(journal, tenant, Pausable)
    h = d.binding.create(id="p")
    assert d.tick() == ["suspended"]
    h.pause()
    assert h.status()["status"] == "paused"
    d.now += 10
    assert d.tick() == []  # a paused instance's timer does not fire
    h.resume()
    assert d.tick() == ["complete"]
    assert h.status() == {"status": "complete", "error": None, "output": 2, "version": "v1",
                          "condition": None, "rollback": [], "warning": None}
    with pytest.raises(InvalidStateError, match="complete"):
        h.terminate()
    h.restart()
    assert h.status()["status"] == "queued"
    assert d.tick() == ["suspended"]
    assert CALLS["a"] == 2  # restart discards recorded steps
    h.terminate()
    assert h.status()["status"] == "terminated"
    d.now += 10
    assert d.tick() == []


def test_pause_requested_during_an_activation_stops_at_the_next_step(journal, tenant):
    d = Driver(journal, tenant, Pausable)
    h = d.binding.create(id="p")
    (claim,) = journal.claim_due(d.now, 10, "t", 30, tenant)
    h.pause()
    assert h.status()["status"] == "waitingForPause"
    outcome = asyncio.run(activate(journal, claim.pk, claim.token, Pausable, clock=d.clock))
    assert outcome == "paused"
    assert h.status()["status"] == "paused"
    assert CALLS == {}  # it stopped before the first new step


def test_terminate_fences_a_running_activation(journal, tenant):
    d = Driver(journal, tenant, Pausable)
    h = d.binding.create(id="t")
    (claim,) = journal.claim_due(d.now, 10, "t", 30, tenant)
    h.terminate()
    outcome = asyncio.run(activate(journal, claim.pk, claim.token, Pausable, clock=d.clock))
    assert outcome == "lease_lost"
    assert h.status()["status"] == "terminated"
    assert not d.steps("t")


def test_bindings_create_get_and_errors(journal, tenant):
    d = Driver(journal, tenant, Pausable)
    h = d.binding.create(id="dup")
    with pytest.raises(DuplicateInstanceError, match="'dup'"):
        d.binding.create(id="dup")
    assert d.binding.get("dup").id == h.id
    with pytest.raises(InstanceNotFoundError, match="no instance 'nope'"):
        d.binding.get("nope")
    other = Driver(journal, tenant + "x", Pausable)
    with pytest.raises(InstanceNotFoundError, match="no instance 'dup'"):
        other.binding.get("dup")  # another tenant's id looks exactly like an unknown one
    other.binding.create(id="dup")  # ids are per tenant
    auto = d.binding.create(params={"a": 1})
    assert len(auto.id) == 32
    # a create runs on the newest code, read in its own transaction, and says so in its
    # envelope; instances created before stay on theirs
    journal.save_code(tenant, "v2", "test", b"", d.now)
    d.binding.create(id="newer")
    newer = journal.get_instance(tenant, "newer")
    assert (newer.code_version, json.loads(newer.metadata_json)["code_version"]) == ("v2", "v2")
    assert journal.get_instance(tenant, "dup").code_version == "v1"
    assert [h.outcome for h in d.binding.create_batch([{"id": "b1"}, {"id": "dup"}])] == [
        "created", "existed"]
    assert json.loads(journal.get_instance(tenant, "b1").metadata_json)["code_version"] == "v2"
    with pytest.raises(UnknownTenantError, match=f"tenant '{tenant}none' has no workflow code"):
        WorkflowBinding(journal, tenant + "none").create()


def test_bad_input_to_a_binding_is_refused_item_by_item_and_named(journal, tenant):
    """A batch item with keys that are not strings, or params nested too deeply, is an
    invalid item (the others are created); a batch that is not a list, and metadata that
    is not a mapping of JSON, are refused naming what was wrong."""
    d = Driver(journal, tenant, Replayed)
    deep: list = []
    cur = deep
    for _ in range(10_000):
        cur.append([])
        cur = cur[0]
    handles = d.binding.create_batch([{"id": "ok1"}, {1: 2}, {"id": "deep", "params": deep},
                                      {"id": "lone", "params": "\ud800"}, {"id": "ok2"}])
    assert [h.outcome for h in handles] == ["created", "invalid", "invalid", "invalid", "created"]
    assert "keys must be strings" in handles[1].error
    assert "nested more than 128 levels deep" in handles[2].error
    assert "lone surrogate" in handles[3].error
    with pytest.raises(InvalidInputError, match="create_batch takes a list"):
        d.binding.create_batch(None)
    handle = d.binding.get("ok1")
    with pytest.raises(InvalidInputError, match="force must be True or False"):
        handle.delete(force="false")  # a string is not False
    with pytest.raises(InvalidInputError, match="rollback must be True or False"):
        handle.terminate(rollback="no")
    with pytest.raises(InvalidInputError, match="from_step must be"):
        handle.restart(from_step=("a", 2 ** 63))
    with pytest.raises(InvalidInputError, match="limit must be a whole number"):
        handle.logs(limit=2 ** 70)
    with pytest.raises(InvalidInputError, match="after must be a whole number"):
        handle.logs(after="5")
    assert handle.status()["status"] == "queued"  # none of it did anything
    for metadata, words in (({"k": {1, 2}}, "not JSON-serializable"), ({"k": float("nan")}, "not JSON"),
                            ("ab", "mapping with string keys"), ({"big": "x" * 70_000}, "the limit is 65536")):
        with pytest.raises(InvalidInputError, match=words):
            WorkflowBinding(journal, tenant, metadata=metadata)


def test_a_lone_surrogate_in_an_error_is_stored_escaped_not_retried_for_ever(journal, tenant):
    """Text that is not valid Unicode (a lone surrogate, as os.fsdecode makes of bytes that
    do not decode) in run()'s error could not be written: the instance was activated again
    and again. It ends errored, the surrogate escaped."""
    d = Driver(journal, tenant, FailsWithSurrogate)
    d.binding.create(id="s")
    assert d.tick() == ["errored"]
    info = d.info("s")
    assert info.status == "errored" and info.error_message.endswith("card declined: \\udcff"), info


def test_sleep_until_refuses_a_time_that_is_not_a_number(journal, tenant):
    d = Driver(journal, tenant, SleepsUntilNaN)
    d.binding.create(id="n")
    assert d.tick() == ["errored"]
    assert "sleep_until 'never': expected a datetime or timestamp, got nan" in d.info("n").error_message


def test_releasing_a_lease_already_given_up_changes_nothing(journal, tenant):
    """A scheduler that learns late that an activation ended must not undo its outcome."""
    d = Driver(journal, tenant, Pausable)
    d.binding.create(id="r")
    (claim,) = journal.claim_due(d.now, 10, "t", 30, tenant)
    outcome = asyncio.run(activate(journal, claim.pk, claim.token, Pausable, clock=d.clock))
    assert outcome == "suspended"
    assert journal.release(claim.pk, claim.token, d.now, d.now) is False
    assert d.info("r").status == "waiting" and d.info("r").wake_at == d.now + 5


def ticking(d: Driver) -> Driver:
    """Time passes between the steps of d's activations (1 ms a read of the clock), so
    that the order steps began in shows in their records."""
    def clock() -> float:
        d.now += 0.001
        return d.now

    d.clock = clock
    return d


class Approved(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: count("a"))
        ok = await step.wait_for_event("approval", type="approval", timeout="1 hour")
        b = await step.do("b", lambda: count("b"))
        return [a, ok.payload, b]


def test_restart_from_a_step_keeps_what_came_before_and_runs_the_rest_again(journal, tenant):
    d = ticking(Driver(journal, tenant, Approved))
    h = d.binding.create(id="r")
    h.send_event("approval", "alice")
    h.send_event("approval", "bob")  # still buffered after the first run
    assert d.tick() == ["complete"]
    assert h.status()["output"] == [1, "alice", 1]
    pk = d.info("r").pk
    journal.append_logs(pk, [LogLine(at=d.now, stream="stdout", step="b", count=1, attempt=1,
                                     message="from b"),
                             LogLine(at=d.now, stream="stdout", step="a", count=1, attempt=1,
                                     message="from a")], 100)
    with pytest.raises(InvalidInputError, match="no recorded step 'nope'"):
        h.restart(from_step=("nope", 1))
    for bad in (("b",), ("b", 0), ("b", "1"), "b"):
        with pytest.raises(InvalidInputError, match="from_step"):
            h.restart(from_step=bad)
    assert h.status()["status"] == "complete"  # a refused restart changed nothing

    h.restart(from_step=("approval", 1))
    assert h.status()["status"] == "queued"
    assert sorted(d.steps("r")) == [("a", 1)]
    assert [line.message for line in h.logs()] == ["from a"]
    assert d.tick() == ["complete"]  # "alice"'s event went with its wait: it took "bob"'s
    assert h.status()["output"] == [1, "bob", 2]
    assert (CALLS["a"], CALLS["b"]) == (1, 2)

    h.restart(from_step=["a", 1])  # lists too (what a sandbox's call carries)
    assert d.tick() == ["suspended"]  # no event left: it waits for one
    h.send_event("approval", "carol")
    assert d.tick() == ["complete"]
    assert h.status()["output"] == [2, "carol", 3]


def test_a_failed_run_rolls_back_completed_steps_newest_first(journal, tenant, tmp_path, capsys):
    d = ticking(Driver(journal, tenant, Saga))
    h = d.binding.create(id="s", params={"dir": str(tmp_path)})
    assert d.tick() == ["errored"]
    status = h.status()
    assert status["error"]["name"] == "NonRetryableError" and "no courier" in status["error"]["message"]
    assert (tmp_path / "undo.log").read_text().splitlines() == ["refund 30", "release 7"]
    assert [(r["step"], r["count"], r["status"]) for r in status["rollback"]] == [
        ("charge", 1, "complete"), ("book", 1, "complete")]
    kinds = {(s.name, s.seq): s.kind for s in journal.list_steps(d.info("s").pk)}
    assert kinds[("charge", -1)] == kinds[("book", -1)] == "rollback" and kinds[("ship", 1)] == "do"
    assert main(["status", "s", "--tenant", tenant, "--database-url", journal.url]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert {"name": "charge", "count": 1, "kind": "rollback", "status": "complete", "attempts": 1,
            "error": None} in steps


def test_a_compensation_is_retried_durably_and_never_run_twice(journal, tenant, tmp_path):
    d = ticking(Driver(journal, tenant, Saga))
    h = d.binding.create(id="s", params={"dir": str(tmp_path), "refund_fails": 1, "refund_retries": 2})
    assert d.tick() == ["suspended"]  # the refund failed once: it waits for its retry
    assert h.status()["rollback"][0]["status"] == "retrying"
    d.now += 1
    assert d.tick() == ["errored"]  # replays run() to the same failure, retries the refund
    assert (tmp_path / "undo.log").read_text().splitlines() == ["refund 30", "refund 30", "release 7"]
    assert len((tmp_path / "ship.log").read_text().splitlines()) == 1  # the failure was replayed
    assert h.status()["error"]["name"] == "NonRetryableError"


def test_a_compensation_that_keeps_failing_names_both_errors(journal, tenant, tmp_path):
    d = ticking(Driver(journal, tenant, Saga))
    h = d.binding.create(id="s", params={"dir": str(tmp_path), "refund_fails": 99})
    assert d.tick() == ["errored"]
    error = h.status()["error"]
    assert error["name"] == "RollbackFailedError"
    assert "no courier today" in error["message"] and "the bank is down" in error["message"]
    assert "rollback of step 'charge'" in error["message"]
    assert (tmp_path / "undo.log").read_text().splitlines() == ["refund 30"]  # stopped there


def test_terminate_with_rollback_unwinds_the_completed_steps_then_ends(journal, tenant, tmp_path):
    d = ticking(Driver(journal, tenant, Booked))
    h = d.binding.create(id="b", params={"dir": str(tmp_path)})
    assert d.tick() == ["suspended"]
    h.terminate(rollback=True)
    h.terminate(rollback=True)  # asking twice is asking once
    assert h.status()["status"] == "waiting"  # until its next activation, at once
    assert d.tick() == ["terminated"]
    status = h.status()
    assert status["status"] == "terminated" and status["error"] is None
    assert [(r["step"], r["status"]) for r in status["rollback"]] == [
        ("charge", "complete"), ("book", "complete")]
    assert (tmp_path / "undo.log").read_text().splitlines() == ["refund 30", "release 7"]
    assert not (tmp_path / "ship.log").exists()  # catching the error got it nowhere
    assert journal.count_by_status(tenant) == {"terminated": 1}
    with pytest.raises(InvalidStateError, match="already terminated"):
        h.terminate(rollback=True)
    h.restart()  # the termination request went with the instance's end
    assert d.tick() == ["suspended"] and h.status()["status"] == "waiting"


def test_terminate_with_rollback_fences_a_running_activation(journal, tenant, tmp_path):
    d = ticking(Driver(journal, tenant, Booked))
    h = d.binding.create(id="b", params={"dir": str(tmp_path)})
    (claim,) = journal.claim_due(d.now, 1, "t", 30, tenant)
    h.terminate(rollback=True)
    outcome = asyncio.run(activate(journal, claim.pk, claim.token, Booked, clock=d.clock))
    assert outcome == "lease_lost"  # the old activation stops at its first write
    assert d.tick() == ["terminated"]
    assert h.status()["rollback"] == []  # nothing had completed: nothing to undo


def test_a_replay_that_skips_recorded_steps_leaves_a_determinism_warning(journal, tenant, tmp_path):
    d = Driver(journal, tenant, Drifting)
    h = d.binding.create(id="w", params={"dir": str(tmp_path)})
    assert d.tick() == ["suspended"]
    assert h.status()["warning"] is None  # the first run: nothing to replay
    (tmp_path / "skip-a").touch()  # the code takes another path from now on
    h.send_event("go")
    assert d.tick() == ["complete"]
    warning = h.status()["warning"]
    assert warning.startswith("determinism warning: run() went on to step 'go' (count 1) "
                              "without asking for recorded steps 'a' (count 1)")
    assert [(line.stream, line.message) for line in h.logs()][-1] == ("dynwf", warning)


def test_storage_stats_say_how_the_instances_table_is_kept(journal, tenant):
    """`Journal.storage_stats` (bench/sustained.py): PostgreSQL's table counters and sizes,
    or SQLite's pages."""
    d = Driver(journal, tenant, Saga)
    for i in range(3):
        d.binding.create(id=f"i{i}")
    stats = journal.storage_stats()
    assert all(isinstance(v, int) and v >= 0 for v in stats.values()), stats
    if journal.is_sqlite:
        assert set(stats) == {"page_count", "freelist_count"} and stats["page_count"] > 0
    else:
        assert set(stats) == {"updates", "hot_updates", "live_rows", "dead_rows", "vacuums",
                              "autovacuums", "table_bytes", "index_bytes"}
        assert stats["table_bytes"] > 0 and stats["index_bytes"] > 0
        assert stats["hot_updates"] <= stats["updates"]


class Quick(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("one", lambda: 1)


def test_an_activation_says_it_is_ending_before_its_last_write_commits(journal, tenant):
    """`ending` lets a host give the slot to its next claim while the write that records
    the outcome commits (the claim can share that commit): when it is called the run is
    over and nothing of its end is committed yet; when `activate` returns, it is."""
    seen = []
    d = Driver(journal, tenant, Quick, ending=lambda: seen.append(d.info("q").status))
    d.binding.create(id="q")
    assert d.tick() == ["complete"]
    assert seen == ["running"]
    assert d.info("q").status == "complete"
