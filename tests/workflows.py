"""Workflow classes the tests register.

They live in an importable module so Ray workers load them by reference.
Workflows that must be observed or steered from a test take a `dir` param:
a directory the test lends the tenant (`Engine.set_tenant_policy(paths=...)`)
where steps append to logs (to count executions), say which process ran them,
and wait for a `release` file the test creates.

Tenant code runs in sandboxes with their own PID namespace, so a pid says
nothing there; `PROCESS` tells processes apart instead: each sandbox imports
this module afresh.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path

from dynwf_ray import NonRetryableError, WorkflowEntrypoint
from dynwf_ray.dynamic import create_dynamic_workflow_entrypoint


PROCESS = uuid.uuid4().hex


def process() -> str:
    return PROCESS


#: How often each name was passed to `count` by step callbacks run in this process
#: (in-process activations and the test harness); tests/conftest.py clears it per test.
CALLS: dict[str, int] = {}


def count(name: str) -> int:
    CALLS[name] = CALLS.get(name, 0) + 1
    return CALLS[name]


def append(directory: str, name: str, line: str = "x") -> None:
    with open(Path(directory) / name, "a") as f:
        f.write(line + "\n")


async def wait_for_file(path: Path, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.02)


class Hello(WorkflowEntrypoint):
    async def run(self, event, step):
        name = (event.payload or {}).get("name", "world")
        hello = await step.do("greet", lambda: f"Hello, {name}!")
        return {"hello": hello, "instance": event.instance_id}


def _confinement() -> dict:
    """What a step can see of its own confinement: its pid and its seccomp mode
    ("0": none, "2": a filter; None where /proc/self/status cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    except OSError:
        status = {}
    return {"pid": os.getpid(), "seccomp": status.get("Seccomp", "").strip() or None}


class Confinement(WorkflowEntrypoint):
    """Reports, from a step, the process it ran in and its seccomp mode."""

    async def run(self, event, step):
        return await step.do("confinement", _confinement)


class ThreeSteps(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: 1)
        b = await step.do("b", lambda: a + 1)
        return await step.do("c", lambda: b + 1)


class Steered(WorkflowEntrypoint):
    """a runs once; b records its process and blocks until `release` exists; then c."""

    async def run(self, event, step):
        d = event.payload["dir"]

        def a():
            append(d, "a.log")
            return "a"

        async def b():
            append(d, "b.log", PROCESS)
            await wait_for_file(Path(d) / "release")
            return "b"

        first = await step.do("a", a)
        second = await step.do("b", b)
        third = await step.do("c", lambda: "c")
        return [first, second, third]


class SleepThenPid(WorkflowEntrypoint):
    """Reports which process ran it before and after a durable sleep."""

    async def run(self, event, step):
        before = await step.do("pid before", process)
        await step.sleep("nap", event.payload.get("sleep", 3))
        after = await step.do("pid after", process)
        return {"before": before, "after": after}


class Approval(WorkflowEntrypoint):
    async def run(self, event, step):
        before = await step.do("pid before", process)
        timeout = (event.payload or {}).get("timeout", "1 hour")
        ok = await step.wait_for_event("approval", type="approval", timeout=timeout)
        after = await step.do("pid after", process)
        return {"by": ok.payload["by"], "before": before, "after": after}


class Flaky(WorkflowEntrypoint):
    """Fails twice, then succeeds; retries with a short constant delay."""

    async def run(self, event, step):
        def charge(ctx):
            if ctx.attempt < 3:
                raise RuntimeError(f"card declined (attempt {ctx.attempt})")
            return ctx.attempt

        attempts = await step.do(
            "charge", charge, retries={"limit": 3, "delay": "200 milliseconds", "backoff": "constant"}
        )
        return {"attempts": attempts}


class Observed(WorkflowEntrypoint):
    """Prints and logs; a step fails once; waits for an approval (its host may be
    deactivated meanwhile); reports its process before and after the wait."""

    async def run(self, event, step):
        before = await step.do("pid before", process)

        def charge(ctx):
            print(f"charging, attempt {ctx.attempt}")
            if ctx.attempt == 1:
                logging.getLogger(__name__).warning("card declined")
                raise RuntimeError("card declined")
            return ctx.attempt

        await step.do("charge", charge, retries={"limit": 2, "delay": "100 milliseconds", "backoff": "constant"})
        ok = await step.wait_for_event("approval", type="approval", timeout="1 hour")
        print(f"approved by {ok.payload['by']}")
        after = await step.do("pid after", process)
        return {"before": before, "after": after}


class BlockingStep(WorkflowEntrypoint):
    """A synchronous step that never yields: only ending its sandbox can stop it."""

    async def run(self, event, step):
        def spin():
            time.sleep(3600)

        return await step.do("spin", spin, retries={"limit": 0}, timeout="3 seconds")


class Heavy(WorkflowEntrypoint):
    """`steps` steps with 20 KB results (each logs its run to `<dir>/<id>.log`); step
    "s1" first waits for a `go` file. Catches every exception, as careless tenant
    code does: a platform fault must still never reach it."""

    async def run(self, event, step):
        d, n = event.payload["dir"], event.payload["steps"]
        sizes = []
        try:
            for i in range(n):
                async def work(i=i):
                    if i == 1:
                        await wait_for_file(Path(d) / "go")
                    append(d, f"{event.instance_id}.log", f"s{i}")
                    return "x" * 20_000

                sizes.append(len(await step.do(f"s{i}", work)))
        except Exception as exc:  # noqa: BLE001
            return {"caught": repr(exc)}
        return sizes


class Saga(WorkflowEntrypoint):
    """Books, charges and ships an order; shipping fails for good, so the charge is
    refunded and the booking released (each compensation logs to `<dir>/undo.log`).
    `refund_fails`: how many refund attempts fail (with `refund_retries` retries);
    `refund_waits`: each refund waits for `<dir>/refund-go` before it returns."""

    async def run(self, event, step):
        d, p = event.payload["dir"], event.payload

        async def refund(receipt):
            append(d, "undo.log", f"refund {receipt['charged']}")
            if len(Path(d, "undo.log").read_text().splitlines()) <= p.get("refund_fails", 0):
                raise RuntimeError("the bank is down")
            if p.get("refund_waits"):
                await wait_for_file(Path(d) / "refund-go")
            return "refunded"

        booking = await step.do("book", lambda: {"seat": 7},
                                rollback=lambda b: append(d, "undo.log", f"release {b['seat']}"))
        receipt = await step.do("charge", lambda: {"charged": 30}, rollback=refund,
                                rollback_retries={"limit": p.get("refund_retries", 0), "delay": 1,
                                                  "backoff": "constant"})

        def ship():
            append(d, "ship.log")
            raise NonRetryableError("no courier today")

        await step.do("log", lambda: "no rollback for this one")
        await step.do("ship", ship)
        return [booking, receipt]


class Booked(WorkflowEntrypoint):
    """Books and charges (each with a compensation that logs to `<dir>/undo.log`), then
    waits for an approval before it ships: what `terminate(rollback=True)` unwinds."""

    async def run(self, event, step):
        d = event.payload["dir"]
        await step.do("book", lambda: {"seat": 7},
                      rollback=lambda b: append(d, "undo.log", f"release {b['seat']}"))
        await step.do("charge", lambda: 30, rollback=lambda c: append(d, "undo.log", f"refund {c}"))
        try:
            await step.wait_for_event("approval", type="approval", timeout="1 hour")
        except Exception:  # noqa: BLE001 - a careless tenant: it cannot keep the instance
            await step.do("ship anyway", lambda: append(d, "ship.log"))
        await step.do("ship", lambda: append(d, "ship.log"))
        return "shipped"


class Drifting(WorkflowEntrypoint):
    """Runs step "a" unless `<dir>/skip-a` exists: a run that takes another path on
    replay once the file appears (what a determinism warning is about)."""

    async def run(self, event, step):
        d = Path(event.payload["dir"])
        if not (d / "skip-a").exists():
            await step.do("a", lambda: 1)
        await step.wait_for_event("go", type="go", timeout="1 hour")
        return await step.do("b", lambda: 2)


class SpawnsChildren(WorkflowEntrypoint):
    """Creates child instances of its own tenant in a batch, one of them invalid (the
    children, created without params, create none)."""

    async def run(self, event, step):
        if not event.payload:
            return []

        def spawn():
            made = self.env["WORKFLOWS"].create_batch(
                [{"id": f"{event.instance_id}-child"}, {"id": "not an id"}])
            return [[h.id, h.outcome, h.error is not None] for h in made]

        return await step.do("spawn", spawn)


class StepOptions(WorkflowEntrypoint):
    """Returns what its step's context says of the step's options (seen in the sandbox)."""

    async def run(self, event, step):
        return await step.do(
            "options", lambda ctx: ctx.config.model_dump(mode="json"),
            retries={"limit": None, "delay": "2 seconds"}, timeout="1 minute",
        )


class NotAWorkflow:
    async def run(self, event, step):
        return None


def load_runner(metadata, env):
    """The platform's loader for the dynamic dispatcher: metadata names the workflow."""
    return {"hello": Hello, "three": ThreeSteps}[metadata["workflow"]](env)


Dispatcher = create_dynamic_workflow_entrypoint(load_runner)


class Counter:
    """A platform binding (lives in the trusted host): a per-tenant counter."""

    def __init__(self, tenant_id: str):
        self.tenant_id = tenant_id
        self.value = 0

    def add(self, n: int) -> dict:
        self.value += n
        return {"tenant": self.tenant_id, "value": self.value}

    def fail(self) -> None:
        raise ValueError("counter is read-only today")

    def _internal(self) -> str:  # not callable from a sandbox: private
        return "private"


def counter_binding(tenant_id: str) -> Counter:
    return Counter(tenant_id)


class UsesEnv(WorkflowEntrypoint):
    """Reads platform values and secrets, calls a platform binding, prints a secret."""

    async def run(self, event, step):
        counter = self.env["COUNTER"]
        added = await step.do("add", lambda: counter.add(2))

        def private():
            try:
                counter._internal()
                return "reached"
            except Exception as exc:  # noqa: BLE001
                return type(exc).__name__

        def missing():
            try:
                counter.nope()
                return "reached"
            except Exception as exc:  # noqa: BLE001
                return f"{type(exc).__name__}: {exc}"

        def failing():
            try:
                counter.fail()
                return "reached"
            except Exception as exc:  # noqa: BLE001
                return f"{type(exc).__name__}: {exc}"

        print(f"using key {self.env['API_KEY']}")
        return {
            "region": self.env["REGION"], "key_length": len(self.env["API_KEY"]),
            "added": added, "private": await step.do("private", private),
            "missing": await step.do("missing", missing),
            "failing": await step.do("failing", failing),
            "env": sorted(k for k in os.environ),
        }
