"""Workflow classes the tests register.

They live in an importable module so Ray workers load them by reference.
Workflows that must be observed or steered from a test take a `dir` param:
a scratch directory where steps append to logs (to count executions), write
their pid, and wait for a `release` file the test creates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from dynwf_ray import WorkflowEntrypoint
from dynwf_ray.dynamic import create_dynamic_workflow_entrypoint


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


class ThreeSteps(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: 1)
        b = await step.do("b", lambda: a + 1)
        return await step.do("c", lambda: b + 1)


class Steered(WorkflowEntrypoint):
    """a runs once; b records its pid and blocks until `release` exists; then c."""

    async def run(self, event, step):
        d = event.payload["dir"]

        def a():
            append(d, "a.log")
            return "a"

        async def b():
            append(d, "b.log", str(os.getpid()))
            await wait_for_file(Path(d) / "release")
            return "b"

        first = await step.do("a", a)
        second = await step.do("b", b)
        third = await step.do("c", lambda: "c")
        return [first, second, third]


class SleepThenPid(WorkflowEntrypoint):
    """Reports the pid of the host before and after a durable sleep."""

    async def run(self, event, step):
        before = await step.do("pid before", os.getpid)
        await step.sleep("nap", event.payload.get("sleep", 3))
        after = await step.do("pid after", os.getpid)
        return {"before": before, "after": after}


class Approval(WorkflowEntrypoint):
    async def run(self, event, step):
        before = await step.do("pid before", os.getpid)
        timeout = (event.payload or {}).get("timeout", "1 hour")
        ok = await step.wait_for_event("approval", type="approval", timeout=timeout)
        after = await step.do("pid after", os.getpid)
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
    deactivated meanwhile); reports the host pid before and after the wait."""

    async def run(self, event, step):
        before = await step.do("pid before", os.getpid)

        def charge(ctx):
            print(f"charging, attempt {ctx.attempt}")
            if ctx.attempt == 1:
                logging.getLogger(__name__).warning("card declined")
                raise RuntimeError("card declined")
            return ctx.attempt

        await step.do("charge", charge, retries={"limit": 2, "delay": "100 milliseconds", "backoff": "constant"})
        ok = await step.wait_for_event("approval", type="approval", timeout="1 hour")
        print(f"approved by {ok.payload['by']}")
        after = await step.do("pid after", os.getpid)
        return {"before": before, "after": after}


class BlockingStep(WorkflowEntrypoint):
    """A synchronous step that never yields: only the host watchdog can stop it."""

    async def run(self, event, step):
        def spin():
            time.sleep(3600)

        return await step.do("spin", spin, retries={"limit": 0}, timeout="1 second")


class NotAWorkflow:
    async def run(self, event, step):
        return None


def load_runner(metadata, env):
    """The platform's loader for the dynamic dispatcher: metadata names the workflow."""
    return {"hello": Hello, "three": ThreeSteps}[metadata["workflow"]](env)


Dispatcher = create_dynamic_workflow_entrypoint(load_runner)
