"""The supervisor and the sandbox runtime, without Ray and without the jail.

A plain forked child runs `runtime.serve` on one end of a socketpair (a fake
of `template.Sandbox`); the supervisor runs real activations against a real
journal on the other end, with a fake clock. This checks the protocol, replay
across the boundary, retries with the tenant's error names, logs, bindings,
and that forged or oversized messages end the sandbox with a clear error.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import signal
import socket
import time

import pytest

from dynwf_ray import NonRetryableError, WorkflowEntrypoint
from dynwf_ray.activation import activate
from dynwf_ray.binding import WorkflowBinding
from dynwf_ray.sandbox import runtime
from dynwf_ray.sandbox.policy import SandboxLimits
from dynwf_ray.sandbox.supervisor import SandboxSession


class ForkedSandbox:
    """A fake of template.Sandbox: a forked child serving the runtime, no jail."""

    def __init__(self, cls: type):
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                ours.close()
                runtime.serve(theirs, {"pickled_class": base64.b64encode(pickle.dumps(cls)).decode()})
            finally:
                os._exit(0)
        theirs.close()
        self.pid, self.sock, self.extra = pid, ours, []
        self._status: int | None = None

    def kill(self) -> None:
        if self._status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(5)

    def wait(self, timeout: float | None) -> int | None:
        deadline = time.monotonic() + (timeout or 0)
        while self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._status = status
            elif time.monotonic() > deadline:
                return None
            else:
                time.sleep(0.01)
        return self._status

    def exit_reason(self) -> str | None:
        return None if self._status is None else f"exit status {self._status}"

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Driver:
    """Plays the scheduler and the host: claims due instances and runs them in a sandbox."""

    def __init__(self, journal, tenant, cls, limits: SandboxLimits | None = None):
        self.journal, self.tenant, self.cls = journal, tenant, cls
        self.limits = limits or SandboxLimits()
        self.now = 1_000_000.0
        journal.save_code(tenant, "v1", "test", b"", self.now)
        self.binding = WorkflowBinding(journal, tenant, clock=lambda: self.now)
        self.loop = asyncio.new_event_loop()
        self.session: SandboxSession | None = None
        self.sandboxes: list[ForkedSandbox] = []

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        for sandbox in self.sandboxes:
            sandbox.kill()
        self.loop.run_until_complete(asyncio.sleep(0))  # let cancelled readers finish
        self.loop.close()

    def _session(self) -> SandboxSession:
        if self.session is None or not self.session.healthy:
            sandbox = ForkedSandbox(self.cls)
            self.sandboxes.append(sandbox)
            self.session = SandboxSession(
                sandbox, tenant_id=self.tenant, limits=self.limits,
                bindings={"WORKFLOWS": self.binding}, secrets={"TOKEN": "s3cr3t-value"},
            )
            self.loop.run_until_complete(self.session.start())
        return self.session

    def tick(self, load: bool = False) -> list[str]:
        """Claim and run what is due; `load`: as a host does (`claim_and_load`)."""
        outcomes = []
        if load:
            states = self.loop.run_until_complete(self.journal.grouped.claim_and_load(
                self.now, 1000, "test", 30, self.tenant))
            claims = [(s.info.pk, s.info.lease_token, s) for s in states]
        else:
            claims = [(c.pk, c.token, None) for c in
                      self.journal.claim_due(self.now, 1000, "test", 30, tenant_id=self.tenant)]
        for pk, token, state in claims:
            session = self._session()
            outcomes.append(self.loop.run_until_complete(activate(
                self.journal, pk, token, session, clock=lambda: self.now,
                capture_logs=True, state=state,
            )))
        return outcomes

    def info(self, instance_id):
        return self.journal.get_instance(self.tenant, instance_id)

    def steps(self, instance_id):
        return {(s.name, s.seq): s for s in self.journal.list_steps(self.info(instance_id).pk)}


@pytest.fixture
def driver(journal, tenant):
    made: list[Driver] = []

    def make(cls, **kwargs) -> Driver:
        made.append(Driver(journal, tenant, cls, **kwargs))
        return made[-1]

    yield make
    for d in made:
        d.close()


class Replayed(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: os.getpid())
        await step.sleep("nap", "10 seconds")
        loop = [await step.do("same", lambda i=i: i) for i in range(3)]
        b = await step.do("b", lambda: os.getpid())
        return {"a": a, "b": b, "loop": loop, "params": event.payload,
                "tenant": event.metadata.get("tenant_id")}


def test_replay_across_the_boundary_runs_each_step_once(driver):
    d = driver(Replayed)
    d.binding.create(id="r", params={"k": 1})
    assert d.tick() == ["suspended"]
    d.now += 10
    assert d.tick() == ["complete"]
    out = d.info("r")
    import json
    output = json.loads(out.output_json)
    assert output["loop"] == [0, 1, 2] and output["params"] == {"k": 1}
    assert output["tenant"] == d.tenant
    assert output["a"] == output["b"] == d.sandboxes[0].pid  # one warm sandbox, replayed locally
    assert all(s.attempts == 1 for s in d.steps("r").values() if s.kind == "do")
    assert len(d.sandboxes) == 1


def _spy(d: Driver) -> list[dict]:
    """What the supervisor sends the sandbox, from now on."""
    session = d._session()
    sent: list[dict] = []
    send = session._send
    session._send = lambda message: (sent.append(message), send(message))[1]  # type: ignore[method-assign]
    return sent


class Flaky(WorkflowEntrypoint):
    async def run(self, event, step):
        def flaky(ctx):
            print(f"attempt {ctx.attempt}")
            if ctx.attempt < 3:
                raise KeyError(f"not yet {ctx.attempt}")
            return ctx.attempt

        got = await step.do("flaky", flaky, retries={"limit": 5, "delay": 1, "backoff": "constant"})
        try:
            await step.do("never", lambda: (_ for _ in ()).throw(NonRetryableError("no")))
        except Exception as exc:  # noqa: BLE001
            caught = f"{type(exc).__name__}: {exc}"
        return {"got": got, "caught": caught}


def test_retries_are_asked_for_keep_the_tenants_error_names_and_logs_per_attempt(driver):
    d = driver(Flaky)
    sent = _spy(d)
    d.binding.create(id="f")
    for _ in range(2):
        assert d.tick() == ["suspended"]
        d.now += 1
    assert d.tick() == ["complete"]
    calls = [m for m in sent if m["t"] == "call"]
    # Attempt 1 of 'flaky' and the first of 'never' ran at once; the retries were asked for.
    assert [c["attempt"] for c in calls] == [2, 3], calls
    activations = [m for m in sent if m["t"] == "activate"]
    assert [a["not_replayed"] for a in activations[1:]] == [["flaky\x001"], ["flaky\x001"]]
    import json
    out = json.loads(d.info("f").output_json)
    assert out["got"] == 3
    assert out["caught"].startswith("StepFailedError: step 'never' failed after 1 attempt(s): NonRetryableError: no")
    steps = d.steps("f")
    assert steps[("flaky", 1)].attempts == 3 and steps[("never", 1)].error_name == "NonRetryableError"
    lines = [(l.step, l.attempt, l.message) for l in d.journal.read_logs(d.info("f").pk)]
    assert ("flaky", 1, "attempt 1") in lines and ("flaky", 3, "attempt 3") in lines


class PrintsFromThreads(WorkflowEntrypoint):
    async def run(self, event, step):
        import threading

        def in_thread(text):
            t = threading.Thread(target=print, args=(text,))
            t.start()
            t.join()
            return text

        await step.do("work", lambda: in_thread("from a thread in a step"))
        in_thread("from a thread in run()")
        return "done"


def test_output_of_threads_the_tenant_starts_is_kept_as_run_lines(driver):
    """docs/observability.md: a thread's output is kept while an activation runs, as
    run()'s lines (a thread does not carry the step it was started in)."""
    d = driver(PrintsFromThreads)
    d.binding.create(id="t")
    assert d.tick() == ["complete"]
    lines = [(l.stream, l.step, l.message) for l in d.journal.read_logs(d.info("t").pk)]
    assert ("stdout", None, "from a thread in a step") in lines, lines
    assert ("stdout", None, "from a thread in run()") in lines, lines


class Creates(WorkflowEntrypoint):
    async def run(self, event, step):
        wf = self.env["WORKFLOWS"]
        if event.payload.get("child"):
            return "child"
        child = await step.do("spawn", lambda: wf.create(id="kid", params={"child": True}).id)
        status = wf.get(child).status()["status"]
        try:
            wf.get("nope")
        except Exception as exc:  # noqa: BLE001
            missing = type(exc).__name__
        print("token is s3cr3t-value")
        return {"child": child, "status": status, "missing": missing}


def test_the_workflows_binding_works_from_the_sandbox_and_secrets_are_redacted(driver):
    d = driver(Creates)
    d.binding.create(id="p", params={})
    outcomes = d.tick()
    assert "complete" in outcomes
    import json
    out = json.loads(d.info("p").output_json)
    assert out == {"child": "kid", "status": "queued", "missing": "InstanceNotFoundError"}
    messages = [l.message for l in d.journal.read_logs(d.info("p").pk)]
    assert "token is [secret]" in messages and not any("s3cr3t" in m for m in messages)


class CallsFromThreads(WorkflowEntrypoint):
    async def run(self, event, step):
        import asyncio as aio
        from concurrent.futures import ThreadPoolExecutor

        wf = self.env["WORKFLOWS"]

        def blocked():  # the loop waits here while two worker threads call the binding
            with ThreadPoolExecutor(2) as pool:
                return sorted(pool.map(lambda i: wf.create(id=f"t{i}").id, range(2)))

        made = await step.do("from workers", blocked)
        # and from a thread while the loop is free to read
        seen = await step.do("from to_thread", lambda: aio.to_thread(lambda: wf.get("t0").status()["status"]))
        return {"made": made, "seen": seen}


def test_binding_calls_from_other_threads_get_their_answers(driver):
    """A blocking binding call reads its own reply, whichever thread makes it and
    whether or not the sandbox's event loop is blocked meanwhile."""
    d = driver(CallsFromThreads)
    d.binding.create(id="p", params={})
    assert d.tick() == ["complete"]
    import json
    assert json.loads(d.info("p").output_json) == {"made": ["t0", "t1"], "seen": "queued"}


def test_the_channel_is_read_by_its_loop_or_by_a_blocked_request():
    """The sandbox's channel alone, with a plain fake supervisor on a thread: the event
    loop reads the replies; a blocking request reads its own, from the loop's thread
    (the loop is blocked) or from another one (the loop stops reading meanwhile and
    reads again after); frames split or packed together arrive whole and in order;
    and a blocked request that is never answered ends with the activation."""
    import threading

    from dynwf_ray.sandbox import protocol

    import selectors

    removed: list = []

    class Watched(selectors.DefaultSelector):  # what the loop stops watching
        def unregister(self, fileobj):  # noqa: ANN001, ANN202
            removed.append(fileobj)
            return super().unregister(fileobj)

    ours, theirs = socket.socketpair()
    loop = asyncio.SelectorEventLoop(Watched())
    channel = runtime._Channel(theirs, loop)
    seen: list[int] = []

    def supervisor() -> None:  # answers a request with ten times its id, but not "quiet" ones
        while (m := protocol.recv(ours)) is not None:
            if m.get("quiet"):
                continue
            reply = protocol.encode({"t": "ok", "id": m["id"], "value": m["id"] * 10})
            if m.get("split"):  # one frame in two writes
                ours.sendall(reply[:3])
                ours.sendall(reply[3:])
            elif m.get("packed"):  # a reply and an extra message in one write
                ours.sendall(reply + protocol.encode({"t": "extra", "n": m["id"]}))
            else:
                ours.sendall(reply)

    answering = threading.Thread(target=supervisor, daemon=True)
    answering.start()
    channel.on_message = lambda m: seen.append(m["n"])

    def ask(**flags) -> dict:
        return {"op": "bind", "id": channel.new_id(), **flags}

    async def main() -> list:
        channel.start_reading()
        got = [await channel.request(ask())]  # the loop reads
        got.append(channel.request_sync(ask(split=True)))  # the loop's thread, blocked, reads
        with channel._reading:  # as a thread reading for its request holds it:
            ours.sendall(protocol.encode({"t": "extra", "n": 0}))
            deadline = time.monotonic() + 10
            while not removed and time.monotonic() < deadline:
                await asyncio.sleep(0)  # the loop, told there is data, stops reading
        assert removed
        # Another thread's request reads the waiting message and its reply, then hands back.
        got.append(await asyncio.to_thread(channel.request_sync, ask(packed=True)))
        got.append(await asyncio.wait_for(channel.request(ask(packed=True)), 10))  # the loop reads again
        await asyncio.sleep(0)  # the extra messages were handed to the loop
        return got

    try:
        assert loop.run_until_complete(main()) == [10, 20, 30, 40]
        assert seen == [0, 3, 4]

        ended: list[BaseException] = []

        def unanswered() -> None:
            try:
                channel.request_sync(ask(quiet=True))
            except BaseException as exc:  # noqa: BLE001 - what the activation's end raises
                ended.append(exc)

        waiting = threading.Thread(target=unanswered)
        waiting.start()
        deadline = time.monotonic() + 10
        while not channel._pending and time.monotonic() < deadline:
            time.sleep(0.001)
        loop.call_soon(channel.fail_pending)  # what an `end` from the supervisor does
        loop.run_until_complete(asyncio.sleep(0))
        waiting.join(10)
        assert not waiting.is_alive() and [type(e) for e in ended] == [runtime._Over]
    finally:
        loop.close()
        theirs.close()  # the fake supervisor reads the end of the stream and returns
        answering.join(10)
        ours.close()
        theirs.close()
        ours.close()


def _channel_socket():
    import gc
    for obj in gc.get_objects():
        if isinstance(obj, runtime._Channel):
            return obj.sock
    raise AssertionError("no channel")


class Forges(WorkflowEntrypoint):
    async def run(self, event, step):
        how = event.payload["how"]

        def attack():
            sock = _channel_socket()
            if how == "oversized":
                sock.sendall((2**31 - 1).to_bytes(4, "big"))
            elif how == "forged answer":
                from dynwf_ray.sandbox import protocol
                protocol.send(sock, {"op": "result", "id": 10**6, "value": "forged"})
            elif how == "garbage":
                sock.sendall((5).to_bytes(4, "big") + b"\xff{not")
            elif how == "reused id":
                from dynwf_ray.sandbox import protocol
                protocol.send(sock, {"op": "do", "id": 1, "name": "x", "count": 1})
            return "sent"

        await step.do("attack", attack)
        return "should not complete"


@pytest.mark.parametrize("how", ["oversized", "forged answer", "garbage", "reused id"])
def test_a_forged_message_ends_the_sandbox_with_a_clear_error(driver, how):
    d = driver(Forges)
    d.binding.create(id="x", params={"how": how})
    assert d.tick() == ["errored"]
    info = d.info("x")
    assert info.error_name == "SandboxProtocolError", (info.error_name, info.error_message)
    assert d.sandboxes[0].wait(5) is not None  # the sandbox is gone
    assert ("attack", 1) not in d.steps("x") or d.steps("x")[("attack", 1)].status != "complete"


class Spins(WorkflowEntrypoint):
    async def run(self, event, step):
        def spin():
            while True:
                pass

        await step.do("spin", spin, retries={"limit": 0, "delay": 1})
        return "no"


def test_cpu_limit_ends_the_attempt_with_resource_limit_error(driver):
    d = driver(Spins, limits=SandboxLimits(cpu_seconds=0.5))
    d.binding.create(id="s")
    assert d.tick() == ["suspended"]  # the sandbox was killed; the failure is recorded
    step = d.steps("s")[("spin", 1)]
    assert step.status == "failed" and step.error_name == "ResourceLimitError"
    assert "CPU time limit of 0.5 s" in step.error_message
    assert d.sandboxes[0].wait(5) is not None
    assert d.tick() == ["errored"]  # replayed in a new sandbox: run() sees StepFailedError
    assert d.info("s").error_name == "ResourceLimitError"
    assert len(d.sandboxes) == 2


class ThreeSteps(WorkflowEntrypoint):
    async def run(self, event, step):
        out = [await step.do(f"s{i}", lambda i=i: i) for i in range(3)]
        return out + [await step.do("ctx", lambda ctx: [ctx.attempt, ctx.config.timeout], timeout=7)]


def test_a_new_step_runs_at_once_one_round_trip_and_no_call(driver):
    d = driver(ThreeSteps)
    sent = _spy(d)
    d.binding.create(id="n")
    assert d.tick() == ["complete"]
    import json
    assert json.loads(d.info("n").output_json) == [0, 1, 2, [1, 7.0]]
    kinds = [m["t"] for m in sent]
    assert kinds == ["activate", "ok", "ok", "ok", "ok"], kinds  # no `call`: the sandbox ran each
    assert sent[0]["steps_at_once"] is True and sent[0]["not_replayed"] == []
    assert all(s.status == "complete" and s.attempts == 1 for s in d.steps("n").values())


class PausesItself(WorkflowEntrypoint):
    async def run(self, event, step):
        wf = self.env["WORKFLOWS"]
        await step.do("first", lambda: wf.get(event.instance_id).pause())
        if event.payload.get("force"):  # a sandbox that ignores what it was told
            step._at_once, step._channel.ask_first = True, False
        await step.do("second", lambda: open(event.payload["mark"], "w").close() or 2)
        return "done"


@pytest.mark.parametrize("force", [False, True])
def test_a_pause_asked_during_an_activation_stops_before_the_next_step(driver, force, tmp_path):
    """The step's answer says a pause is pending, so the sandbox asks before the next
    step and the supervisor stops there. A sandbox that runs it anyway gets its result
    dropped: nothing is recorded, and the channel stays usable."""
    d = driver(PausesItself)
    sent = _spy(d)
    mark = tmp_path / "second-ran"
    d.binding.create(id="p", params={"force": force, "mark": str(mark)})
    assert d.tick() == ["paused"]
    # The answers of the two binding calls, then of the step 'first' (its write saw the pause).
    assert [m.get("ask_first") for m in sent if m["t"] == "ok"] == [None, None, True]
    assert ("second", 1) not in d.steps("p")
    assert mark.exists() is force
    d.binding.get("p").resume()
    assert d.tick() == ["complete"]
    assert d.steps("p")[("second", 1)].result_json == "2"
    assert d.session is not None and d.session.healthy and len(d.sandboxes) == 1


class SlowAtOnce(WorkflowEntrypoint):
    async def run(self, event, step):
        import time as t
        await step.do("slow", lambda: t.sleep(30), timeout=0.5, retries={"limit": 0, "delay": 1})
        return "no"


def test_a_step_run_at_once_still_times_out_on_the_trusted_side(driver):
    d = driver(SlowAtOnce)
    d.binding.create(id="t")
    started = time.monotonic()
    assert d.tick() == ["suspended"]
    assert time.monotonic() - started < 10
    step = d.steps("t")[("slow", 1)]
    assert step.status == "failed" and step.error_name == "StepTimeoutError", step
    assert d.sandboxes[0].wait(5) is not None  # the sandbox was ended at the timeout


class RunsRefusedStep(WorkflowEntrypoint):
    async def run(self, event, step):
        channel = step._channel  # forge what a lying sandbox would send
        rid = channel.new_id()
        channel.send({"op": "do", "id": rid, "name": "bad", "count": 1, "retries": "not options",
                      "timeout": None, "at_once": True, "span": "00000000000000ff"})
        channel.send({"op": "result", "id": rid, "value": "ran anyway"})
        return await step.do("after", lambda: "still served")


def test_the_answer_of_a_step_run_at_once_that_its_step_refused_is_dropped(driver):
    d = driver(RunsRefusedStep)
    d.binding.create(id="r")
    assert d.tick() == ["complete"]
    import json
    assert json.loads(d.info("r").output_json) == "still served"
    assert set(d.steps("r")) == {("after", 1)}  # nothing of 'bad' was recorded
    assert d.session is not None and d.session.healthy


class BigResults(WorkflowEntrypoint):
    async def run(self, event, step):
        parts = [await step.do(f"part{i}", lambda i=i: str(i) * 900_000) for i in range(3)]
        await step.sleep("nap", "1 second")
        return [len(p) for p in parts] + [p[0] for p in parts]


def test_a_message_larger_than_the_socket_takes_arrives_whole_and_in_order(driver):
    """The host writes straight to the sandbox's socket, and what it does not take
    through the event loop's writer: a 2.7 MB replay arrives whole."""
    from dynwf_ray.sandbox import protocol

    d = driver(BigResults)
    d.binding.create(id="big", params={})
    assert d.tick() == ["suspended"]
    d.now += 2
    sent = _spy(d)
    assert d.tick() == ["complete"]
    assert len(protocol.encode(sent[0])) > 2_700_000
    import json
    assert json.loads(d.info("big").output_json) == [900_000] * 3 + ["0", "1", "2"]


class WaitsThenSteps(WorkflowEntrypoint):
    async def run(self, event, step):
        if event.payload.get("both"):  # two waits at once: which one an event is for is the run's
            got = await asyncio.gather(step.wait_for_event("a", type="go"),
                                       step.wait_for_event("b", type="other"))
            return [g.payload for g in got]
        got = await step.wait_for_event("approval", type="go", timeout="1 hour")
        return await step.do("after", lambda: {"got": got.payload})


def test_the_claim_takes_the_event_its_wait_expects_so_the_run_does_not_ask(driver):
    d = driver(WaitsThenSteps)
    d.binding.create(id="w", params={})
    assert d.tick(load=True) == ["suspended"]
    assert d.info("w").waiting_for == "go"
    d.binding.get("w").send_event("go", {"n": 1})
    d.binding.get("w").send_event("go", {"n": 2})  # stays buffered for a later wait
    sent = _spy(d)
    assert d.tick(load=True) == ["complete"]
    import json
    assert json.loads(d.info("w").output_json) == {"got": {"n": 1}}
    # The wait came in the replay, received: no `wait` request, only the step's answer.
    assert [m["t"] for m in sent] == ["activate", "ok"], sent
    assert sent[0]["replay"]["approval\x001"][1]["payload"] == {"n": 1}
    wait = d.steps("w")[("approval", 1)]
    assert wait.status == "complete" and json.loads(wait.result_json)["payload"] == {"n": 1}
    assert d.info("w").waiting_for is None


def test_a_claim_takes_nothing_when_no_event_came_or_two_waits_are_open(driver):
    d = driver(WaitsThenSteps)
    d.binding.create(id="late", params={})
    d.binding.create(id="both", params={"both": True})
    assert d.tick(load=True) == ["suspended", "suspended"]
    d.now += 3601  # the wait's deadline passed with nothing buffered
    d.binding.get("both").send_event("go", {"n": 1})
    d.binding.get("both").send_event("other", {"n": 2})
    states = d.loop.run_until_complete(d.journal.grouped.claim_and_load(d.now, 10, "test", 30, d.tenant))
    by_id = {s.info.instance_id: s for s in states}
    assert set(by_id) == {"late", "both"}
    assert all(s.event_taken is None and s.info.waiting_for is None for s in states)
    assert all(r.status == "waiting" for s in states for r in s.steps if r.kind == "wait")
    assert d.info("both").waiting_for is None and d.info("late").waiting_for is None
    for s in states:  # run them: each wait takes its own event, or times out
        assert d.loop.run_until_complete(activate(
            d.journal, s.info.pk, s.info.lease_token, d._session(), clock=lambda: d.now, state=s,
        )) in ("complete", "errored")
    import json
    assert json.loads(d.info("both").output_json) == [{"n": 1}, {"n": 2}]
    assert d.info("late").error_name == "WorkflowTimeoutError"


class StepThenNap(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("a", lambda: 1)
        await step.sleep("nap", "1 hour")


class NewStepAfterA(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("a", lambda: 1)
        await step.do("new", lambda: open(event.payload["mark"], "w").close())


def test_a_replay_check_in_a_sandbox_runs_no_new_step(driver, tmp_path):
    """A check asks the sandbox to replay only: a step the journal does not hold stops
    it before its callback runs (the sandbox is not allowed to run steps at once)."""
    from dynwf_ray.replay_check import check_replay

    history = driver(StepThenNap)
    mark = tmp_path / "new-step-ran"
    history.binding.create(id="h", params={"mark": str(mark)})
    assert history.tick() == ["suspended"]
    state = history.journal.history(history.tenant, "h")
    candidate = driver(NewStepAfterA)
    sent = _spy(candidate)
    candidate.loop.run_until_complete(check_replay(state, "v2", candidate._session(),
                                                   clock=lambda: candidate.now))
    assert sent[0]["steps_at_once"] is False
    assert not mark.exists()


def test_the_claim_records_a_sleep_that_is_over_so_the_run_does_not_ask(driver):
    d = driver(Replayed)
    d.binding.create(id="z", params={})
    assert d.tick(load=True) == ["suspended"]
    d.now += 5
    states = d.loop.run_until_complete(d.journal.grouped.claim_and_load(d.now, 10, "test", 30, d.tenant))
    assert states == []  # not due yet: nothing claimed, nothing ended
    d.now += 5  # the nap's end
    sent = _spy(d)
    assert d.tick(load=True) == ["complete"]
    nap = d.steps("z")[("nap", 1)]
    assert nap.finished_at == d.now
    assert sent[0]["replay"]["nap\x001"] == ["ok", None]
    # Only the four steps after the nap asked anything: no `sleep` request.
    assert [m["t"] for m in sent] == ["activate", "ok", "ok", "ok", "ok"], sent


def test_a_claim_reads_each_instance_its_own_crashes_and_termination(driver):
    """The claim returns what each activation starts from (its row, its crash count,
    whether it is being terminated): of that instance only, with other instances'
    events and crashes in the same tables."""
    d = driver(WaitsThenSteps)
    for i in ("plain", "crashed", "ending"):
        d.binding.create(id=i, params={})
    assert d.tick(load=True) == ["suspended"] * 3
    d.binding.get("plain").send_event("other", {"n": 1})  # an event that is no termination
    crashed = d.info("crashed")
    d.journal.count_crash(crashed.pk)
    d.journal.count_crash(crashed.pk)
    d.journal.terminate(d.tenant, "ending", d.now, rollback=True)
    d.now += 3601
    states = d.loop.run_until_complete(d.journal.grouped.claim_and_load(d.now, 10, "test", 30, d.tenant))
    got = {s.info.instance_id: (s.crashes, s.terminating) for s in states}
    assert got == {"plain": (0, False), "crashed": (2, False), "ending": (0, True)}
    assert all(s.info.lease_token == d.info(s.info.instance_id).lease_token for s in states)
    assert {s.info.status for s in states} == {"running"}
    # read as their types, as SQLAlchemy reads them (SQLite gives a boolean as 0 or 1)
    assert all(s.info.pause_requested is False and type(s.crashes) is int for s in states)


class _SocketOnly:
    """A fake of template.Sandbox that is only its socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def kill(self) -> None:
        pass


def test_messages_to_a_sandbox_keep_their_order_when_its_socket_is_full():
    """`_send` writes straight to the socket while nothing is queued; a frame that does
    not fit is queued on the transport, and every later one goes behind it, even when
    the socket has room again before the transport wrote the rest."""
    from dynwf_ray.sandbox import protocol

    messages = [{"t": "ok", "id": 1, "value": "x" * 300_000}]  # more than the socket holds
    messages += [{"t": "ok", "id": i, "value": i} for i in range(2, 50)]
    total = sum(len(protocol.encode(m)) for m in messages)

    async def main() -> bytes:
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        session = SandboxSession(_SocketOnly(ours), tenant_id="t", limits=SandboxLimits())
        await session._connect()
        session._send(messages[0])
        assert session._transport.get_write_buffer_size() > 0
        received = bytearray()
        while True:  # empty the socket: room again, while the rest is still queued
            try:
                received += theirs.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        for m in messages[1:]:
            session._send(m)
        while len(received) < total:  # the loop writes what is queued meanwhile
            received += await asyncio.wait_for(asyncio.to_thread(theirs.recv, 1 << 20), 10)
        session._transport.close()
        theirs.close()
        return bytes(received)

    data, got = asyncio.run(main()), []
    while data:
        length = int.from_bytes(data[:4], "big")
        got.append(protocol.decode(data[4:4 + length]))
        data = data[4 + length:]
    assert got == messages
