"""The tenant-author harness (`dynwf_ray.testing`): virtual clock, mocks, events, budgets.

No Ray: every test runs workflows in-process on a private journal, and none
sleeps for real (a day of sleeps and retry delays passes in milliseconds).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone

import pytest

from dynwf_ray import NonRetryableError, StepFailedError, WorkflowEntrypoint, WorkflowTimeoutError
from dynwf_ray.testing import DEFAULT_START, WorkflowTest, WorkflowTestError, load_workflow

from .workflows import CALLS, count



class Replayed(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: count("a"))
        await step.sleep("nap", "1 day")
        b = await step.do("b", lambda: count("b"))
        loop = [await step.do("same", lambda i=i: i) for i in range(3)]
        await step.sleep_until("until", event.timestamp + timedelta(days=2))
        return {"a": a, "b": b, "loop": loop, "params": event.payload, "at": event.timestamp.isoformat()}


def test_sleeps_pass_on_the_virtual_clock_and_each_callback_runs_once():
    began = time.monotonic()
    with WorkflowTest(Replayed) as t:
        run = t.run({"k": "v"})
        assert run.status == "complete", run
        assert run.output == {
            "a": 1, "b": 1, "loop": [0, 1, 2], "params": {"k": "v"}, "at": DEFAULT_START.isoformat(),
        }
        assert CALLS == {"a": 1, "b": 1}  # replays return recorded results
        assert run.elapsed == 2 * 86400
        assert run.now == DEFAULT_START + timedelta(days=2)
        assert [(s.name, s.count, s.kind) for s in run.steps] == [
            ("a", 1, "do"), ("nap", 1, "sleep"), ("b", 1, "do"),
            ("same", 1, "do"), ("same", 2, "do"), ("same", 3, "do"), ("until", 1, "sleep"),
        ]
        nap = run.step("nap")
        assert (nap.started, nap.finished, nap.result) == (0, 86400, None)
        assert run.step("same", 3).result == 2
    assert time.monotonic() - began < 1.0


class Flaky(WorkflowEntrypoint):
    async def run(self, event, step):
        config = {"limit": 3, "delay": "2 seconds", "backoff": event.payload}
        return await step.do("flaky", lambda ctx: f"real {ctx.attempt}", retries=config)


@pytest.mark.parametrize("backoff, delays", [("constant", [2, 2, 2]), ("linear", [2, 4, 6]), ("exponential", [2, 4, 8])])
def test_mocked_errors_go_through_the_real_retries_and_backoff(backoff, delays):
    with WorkflowTest(Flaky) as t:
        t.mock_step("flaky", error=RuntimeError("down"), times=3)  # then the real callback
        run = t.run(backoff)
        assert run.status == "complete", run
        assert run.output == "real 4"
        step = run.step("flaky")
        assert (step.attempts, step.status, step.error) == (4, "complete", None)
        assert run.elapsed == step.finished == sum(delays)


def test_retries_used_up_error_the_instance_as_in_production():
    with WorkflowTest(Flaky) as t:
        t.mock_step("flaky", error=RuntimeError("card declined"))
        run = t.run("exponential")
        assert run.status == "errored"
        assert run.error == {
            "name": "RuntimeError",
            "message": "tenant 'test' instance 'run-1': step 'flaky' failed after 4 attempt(s): "
                       "RuntimeError: card declined",
        }
        step = run.step("flaky")
        assert (step.status, step.attempts, step.error["name"]) == ("failed", 4, "RuntimeError")
        assert run.elapsed == 2 + 4 + 8


def test_a_mocked_non_retryable_error_fails_the_step_at_once():
    with WorkflowTest(Flaky) as t:
        t.mock_step("flaky", error=NonRetryableError("stolen card"))
        run = t.run("constant")
        assert run.error["name"] == "NonRetryableError"
        assert run.step("flaky").attempts == 1 and run.elapsed == 0


class Twice(WorkflowEntrypoint):
    async def run(self, event, step):
        out = []
        for _ in range(2):
            try:
                out.append(await step.do("fetch", lambda ctx: ["real", ctx.count, ctx.attempt],
                                         retries={"limit": 0}))
            except StepFailedError as exc:
                out.append(["failed", exc.error_name, exc.message])
        return out


def test_mocks_stack_in_order_per_instance_and_can_target_one_occurrence():
    with WorkflowTest(Twice) as t:
        t.mock_step("fetch", error=ValueError, times=1)
        t.mock_step("fetch", result={"mocked": True}, times=1)
        first, second = t.run(), t.run()
        for run in (first, second):  # each instance starts from the first mock
            assert run.output == [["failed", "ValueError", ""], {"mocked": True}]
    with WorkflowTest(Twice) as t:
        t.mock_step("fetch", fn=lambda ctx: ["fake", ctx.count, ctx.attempt], count=2)
        assert t.run().output == [["real", 1, 1], ["fake", 2, 1]]


def test_mocked_results_are_checked_like_real_ones():
    with WorkflowTest(Twice) as t:
        t.mock_step("fetch", result={1, 2})  # not JSON
        out = t.run().output
        assert out[0][:2] == ["failed", "NotSerializableError"]
        assert "result of step 'fetch' is not JSON-serializable" in out[0][2]


class Slow(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("slow", lambda: "done", retries={"limit": 1, "delay": 3}, timeout="5 seconds")


def test_a_forced_step_timeout_fails_the_attempt_as_a_real_timeout_and_takes_its_time():
    with WorkflowTest(Slow) as t:
        t.mock_step("slow", timeout=True)
        run = t.run()
        assert run.error == {
            "name": "StepTimeoutError",
            "message": "tenant 'test' instance 'run-1': step 'slow' failed after 2 attempt(s): "
                       "StepTimeoutError: step 'slow' attempt 2 exceeded its timeout of 5 s",
        }
        assert run.elapsed == 5 + 3 + 5
    with WorkflowTest(Slow) as t:
        t.mock_step("slow", timeout=True, times=1)
        run = t.run()
        assert run.output == "done" and run.step("slow").attempts == 2 and run.elapsed == 8


class Approval(WorkflowEntrypoint):
    async def run(self, event, step):
        first = await step.wait_for_event("first", type="go", timeout="1 hour")
        try:
            second = (await step.wait_for_event("second", type="go", timeout="10 minutes")).payload
        except WorkflowTimeoutError as exc:
            second = str(exc)
        await step.sleep("after", "1 minute")
        return [first.payload, first.timestamp.isoformat(), second]


def test_run_returns_at_a_wait_and_resumes_after_an_event():
    with WorkflowTest(Approval) as t:
        run = t.run()
        assert (run.status, run.waiting_for, run.elapsed) == ("waiting", "go", 0)
        run.advance("30 minutes")
        assert run.status == "waiting" and run.elapsed == 1800
        run.send_event("go", {"n": 1}).send_event("go", {"n": 2}).resume()
        assert run.status == "complete", run
        sent = (DEFAULT_START + timedelta(minutes=30)).isoformat()
        assert run.output == [{"n": 1}, sent, {"n": 2}]
        assert run.step("first").result == {"n": 1}
        assert run.elapsed == 1800 + 60


def test_events_sent_before_the_start_are_buffered():
    with WorkflowTest(Approval) as t:
        run = t.run(events=[("go", "a"), ("go", "b")])
        assert run.output == ["a", DEFAULT_START.isoformat(), "b"] and run.elapsed == 60


def test_a_forced_wait_timeout_moves_the_clock_to_the_deadline():
    with WorkflowTest(Approval) as t:
        t.force_wait_timeout("second")
        run = t.run(events=[("go", 1)])
        assert run.output == [1, DEFAULT_START.isoformat(),
                              "wait_for_event 'second' got no 'go' event within 600 s"]
        assert run.step("second").error["name"] == "WorkflowTimeoutError"
        assert run.elapsed == 600 + 60
    with WorkflowTest(Approval) as t:
        t.force_wait_timeout("first", count=2)  # no second occurrence: nothing forced
        run = t.run()
        assert run.status == "waiting"
        t.force_wait_timeout("first")
        run.resume()
        assert run.error["name"] == "WorkflowTimeoutError" and run.elapsed == 3600


def test_advance_lets_wait_deadlines_pass_and_stops_inside_a_sleep():
    with WorkflowTest(Approval) as t:
        run = t.run().advance("2 hours")
        assert run.error["name"] == "WorkflowTimeoutError" and run.elapsed == 7200
    with WorkflowTest(Approval) as t:
        run = t.run(events=[("go", 1), ("go", 2)])  # both waits done at once, then the sleep
        assert run.status == "complete"
        run = t.run(events=[("go", 1)])
        assert run.status == "waiting"
        run.send_event("go", 2).advance(30)
        assert run.status == "waiting" and run.waiting_for is None  # sleeping
        assert run.step("after").finished is None
        run.resume()
        assert run.status == "complete" and run.elapsed == 60


def test_a_paused_instance_stops_the_run():
    with WorkflowTest(Approval) as t:
        run = t.run()
        run.handle.pause()
        run.send_event("go", 1).resume()
        assert run.status == "paused"
        run.handle.resume()
        run.send_event("go", 2).resume()
        assert run.status == "complete", run


class Saga(WorkflowEntrypoint):
    async def run(self, event, step):
        seat = await step.do("book seat", lambda: {"seat": "12A"},
                             rollback=lambda s: print(f"released {s['seat']}") or "released")
        await step.do("charge card", lambda: 42, rollback=lambda: "refunded",
                      rollback_retries={"limit": 1, "delay": "1 minute"})
        await step.do("ship", lambda: count("ship") / 0, retries={"limit": 0})
        return seat


def test_compensations_run_newest_first_and_are_listed_after_the_steps():
    with WorkflowTest(Saga) as t:
        run = t.run()
        assert run.error["name"] == "ZeroDivisionError"
        assert [(s.name, s.count, s.kind, s.status) for s in run.steps] == [
            ("book seat", 1, "do", "complete"), ("charge card", 1, "do", "complete"),
            ("ship", 1, "do", "failed"),
            ("charge card", 1, "rollback", "complete"), ("book seat", 1, "rollback", "complete"),
        ]
        assert run.step("book seat", rollback=True).result == "released"
        assert run.step("book seat").result == {"seat": "12A"}
        assert [line.message for line in run.logs] == ["released 12A"]


def test_a_mocked_compensation_fails_with_its_own_retries():
    with WorkflowTest(Saga) as t:
        t.mock_step("charge card", result=7)  # the step, not its compensation
        t.mock_step("charge card", error=RuntimeError("refund refused"), rollback=True)
        run = t.run()
        assert run.error["name"] == "RollbackFailedError"
        assert "refund refused" in run.error["message"]
        refund = run.step("charge card", rollback=True)
        assert (refund.status, refund.attempts) == ("failed", 2)
        assert run.step("charge card").result == 7
        assert run.elapsed == 60  # rollback_retries: one retry, a minute later
        with pytest.raises(WorkflowTestError, match=r"no rollback of step 'book seat' \(count 1\); recorded: .*'charge card'#1 \(rollback\)"):
            run.step("book seat", rollback=True)  # older compensations do not run


class Booked(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("book", lambda: 1, rollback=lambda: "undone")
        await step.wait_for_event("go", type="go")
        return "done"


def test_terminate_with_rollback_through_the_handle():
    with WorkflowTest(Booked) as t:
        run = t.run()
        run.handle.terminate(rollback=True)
        run.resume()
        assert run.status == "terminated"
        assert run.step("book", rollback=True).result == "undone"


class Forever(WorkflowEntrypoint):
    async def run(self, event, step):
        i = 0
        while True:
            i += 1
            if event.payload == "sleeps":
                await step.sleep(f"nap {i}", 1)
            else:
                await step.do(f"step {i}", lambda: None)


@pytest.mark.parametrize("kind", ["sleeps", "steps"])
def test_an_endless_workflow_hits_the_step_budget(kind):
    began = time.monotonic()
    with WorkflowTest(Forever, max_steps=50) as t:
        with pytest.raises(WorkflowTestError, match="more than 50"):
            t.run(kind)
    # 50 sleeps of 1 s each: on the virtual clock, far less than 50 s of real time (the
    # bound leaves room for a loaded machine; it once took 1.5 s in CI)
    assert time.monotonic() - began < 10.0


class Printer(WorkflowEntrypoint):
    async def run(self, event, step):
        import logging

        def work(ctx):
            print(f"attempt {ctx.attempt}")
            logging.getLogger("tenant").warning("careful")
            if ctx.attempt == 1:
                raise RuntimeError("again")
            return ctx.attempt

        n = await step.do("work", work, retries={"delay": 1})
        print("done")
        return n


def test_logs_say_which_step_attempt_printed_them():
    with WorkflowTest(Printer) as t:
        run = t.run()
        assert run.output == 2
        assert [(l.step, l.attempt, l.stream, l.message) for l in run.logs] == [
            ("work", 1, "stdout", "attempt 1"), ("work", 1, "WARNING", "tenant: careful"),
            ("work", 2, "stdout", "attempt 2"), ("work", 2, "WARNING", "tenant: careful"),
            (None, None, "stdout", "done"),
        ]


class Parent(WorkflowEntrypoint):
    async def run(self, event, step):
        wf = self.env["WORKFLOWS"]
        if event.payload and "parent" in event.payload:  # the child
            await step.sleep("work", "1 hour")
            await step.do("report", lambda: wf.get(event.payload["parent"]).send_event("done", "ok"))
            return "child done"
        child = f"{event.instance_id}-child"
        await step.do("spawn", lambda: wf.create_batch(
            [{"id": child, "params": {"parent": event.instance_id}}])[0].id)
        done = await step.wait_for_event("child", type="done", timeout="1 day")
        return [self.env["REGION"], done.payload]


def test_children_created_through_workflows_run_on_the_same_clock():
    with WorkflowTest(Parent, env={"REGION": "eu"}) as t:
        run = t.run(id="p")
        assert run.status == "complete", run
        assert run.output == ["eu", "ok"] and run.elapsed == 3600
        child = t.get("p-child")
        assert child.output == "child done"


def test_start_time_and_async_tests():
    start = datetime(2030, 6, 1, 12, 0)  # naive: UTC
    with WorkflowTest(Replayed, start=start) as t:
        async def in_a_loop():  # an async test: the harness runs activations on a thread
            return t.run()

        run = asyncio.run(in_a_loop())
        assert run.output["at"] == start.replace(tzinfo=timezone.utc).isoformat()
        assert run.now == start.replace(tzinfo=timezone.utc) + timedelta(days=2)


def test_misuse_is_reported_clearly():
    with WorkflowTest(Twice) as t:
        with pytest.raises(WorkflowTestError, match="exactly one of"):
            t.mock_step("fetch", result=1, error=RuntimeError())
        with pytest.raises(WorkflowTestError, match="exactly one of"):
            t.mock_step("fetch")
        with pytest.raises(WorkflowTestError, match="times must be"):
            t.mock_step("fetch", result=1, times=0)
        run = t.run()
        with pytest.raises(WorkflowTestError, match=r"no step 'fetch' \(count 3\); recorded: 'fetch'#1, 'fetch'#2"):
            run.step("fetch", 3)
    with pytest.raises(TypeError, match="WorkflowEntrypoint subclass"):
        WorkflowTest(object)


def test_close_removes_the_journal(tmp_path):
    t = WorkflowTest(Twice)
    directory = t._dir
    t.run()
    t.close()
    import os

    assert not os.path.exists(directory)


def test_load_workflow_resolves_the_entrypoint_like_a_push(tmp_path):
    for name in ("one", "two"):
        d = tmp_path / name
        d.mkdir()
        (d / "helper.py").write_text(f"WHO = {name!r}\n")
        (d / "workflow.py").write_text(textwrap.dedent(f"""
            from dynwf_ray import WorkflowEntrypoint
            from helper import WHO

            class {name.title()}(WorkflowEntrypoint):
                async def run(self, event, step):
                    return await step.do("who", lambda: WHO)
        """))
    one = load_workflow(tmp_path / "one")
    two = load_workflow(tmp_path / "two")  # its own `workflow` module, not one's
    assert (one.__name__, two.__name__) == ("One", "Two")
    with WorkflowTest(two) as t:  # two's own `helper`, not the one one imported
        assert t.run().output == "two"
    one = load_workflow(tmp_path / "one")  # and back
    with WorkflowTest(one) as t:
        assert t.run().output == "one"
    named = tmp_path / "named"
    (named / "flows").mkdir(parents=True)
    (named / "flows" / "__init__.py").write_text("")
    (named / "flows" / "main.py").write_text(textwrap.dedent("""
        from dynwf_ray import WorkflowEntrypoint

        class A(WorkflowEntrypoint):
            async def run(self, event, step):
                return "a"

        class B(A):
            async def run(self, event, step):
                return "b"
    """))
    (named / "dynwf.toml").write_text('entrypoint = "flows.main:B"\n')
    assert load_workflow(named).__name__ == "B"
    (named / "dynwf.toml").write_text('entrypoint = "flows.main"\n')
    with pytest.raises(Exception, match="exactly one WorkflowEntrypoint subclass"):
        load_workflow(named)


def test_importing_the_harness_does_not_import_ray():
    code = "import sys, dynwf_ray.testing; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
