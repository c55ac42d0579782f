"""Workflows the benchmarks run (importable by Ray workers as bench.workflows)."""

from __future__ import annotations

import asyncio
import os
import time

from dynwf_ray import WorkflowEntrypoint
from dynwf_ray.activation import activate
from dynwf_ray.journal import Journal
from dynwf_ray.tracing import new_trace_context


class TrivialSteps(WorkflowEntrypoint):
    """`steps` trivial steps in a row."""

    async def run(self, event, step):
        for i in range(event.payload["steps"]):
            await step.do("s", lambda: 1)
        return "done"


def trivial_steps_in_process(journal: Journal, steps: int, tenant: str, **options) -> float:
    """Seconds per step of one `TrivialSteps` activation run in this process (no Ray);
    `options` go to `activate` (tracing, log capture)."""
    journal.save_code(tenant, "v", "bench", b"", time.time())
    journal.create_instances(
        tenant, "v", [("i", f'{{"steps": {steps}}}', "{}", *new_trace_context())], time.time(),
        skip_existing=False,
    )
    (claim,) = journal.claim_due(time.time(), 1, "bench", 600, tenant_id=tenant)
    start = time.perf_counter()
    outcome = asyncio.run(activate(journal, claim.pk, claim.token, TrivialSteps, lease_ttl=600, **options))
    elapsed = time.perf_counter() - start
    assert outcome == "complete", outcome
    return elapsed / steps


class ThreeSteps(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: 1)
        b = await step.do("b", lambda: a + 1)
        return await step.do("c", lambda: b + 1)


class WakeAndStamp(WorkflowEntrypoint):
    """Sleeps until `until` (or waits for an event), then records when it ran again."""

    async def run(self, event, step):
        p = event.payload
        pid = await step.do("pid", os.getpid)
        if "until" in p:
            await step.sleep_until("timer", p["until"])
        else:
            await step.wait_for_event("poke", type="poke", timeout="1 hour")
        return {"resumed_at": await step.do("resumed at", time.time), "pid": pid}


class LongReplay(WorkflowEntrypoint):
    """`steps` steps, then waits for an event: replaying it re-reads every step."""

    async def run(self, event, step):
        for i in range(event.payload["steps"]):
            await step.do("s", lambda: i)
        await step.wait_for_event("end", type="end", timeout="1 hour")
        return "done"


# -- the same workflows as pushed tenant code ---------------------------------------------
# What a user of the platform does: a directory of plain Python, pushed with
# `engine.push_tenant`. `salt` makes the content (hence the code version) distinct.

PUSHED_SOURCES = {
    "trivial": '''
from dynwf_ray import WorkflowEntrypoint

SALT = {salt!r}

class TrivialSteps(WorkflowEntrypoint):
    async def run(self, event, step):
        for i in range(event.payload["steps"]):
            await step.do("s", lambda: 1)
        return "done"
''',
    "three": '''
from dynwf_ray import WorkflowEntrypoint

SALT = {salt!r}

class ThreeSteps(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: 1)
        b = await step.do("b", lambda: a + 1)
        return await step.do("c", lambda: b + 1)
''',
    "wake": '''
import os, time
from dynwf_ray import WorkflowEntrypoint

SALT = {salt!r}

class WakeAndStamp(WorkflowEntrypoint):
    async def run(self, event, step):
        pid = await step.do("pid", os.getpid)
        await step.wait_for_event("poke", type="poke", timeout="1 hour")
        return {{"resumed_at": await step.do("resumed at", time.time), "pid": pid}}
''',
    "timer": '''
import time
from dynwf_ray import WorkflowEntrypoint

SALT = {salt!r}

class SleepUntilThenStamp(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep_until("timer", event.payload["until"])
        return {{"resumed_at": await step.do("resumed at", time.time)}}
''',
    "long": '''
from dynwf_ray import WorkflowEntrypoint

SALT = {salt!r}

class LongReplay(WorkflowEntrypoint):
    async def run(self, event, step):
        for i in range(event.payload["steps"]):
            await step.do("s", lambda: i)
        await step.wait_for_event("end", type="end", timeout="1 hour")
        return "done"
''',
    "stamp": '''
import time
from dynwf_ray import WorkflowEntrypoint

SALT = {salt!r}

class StampThenTwoSteps(WorkflowEntrypoint):
    async def run(self, event, step):
        started = await step.do("started at", time.time)
        await step.do("b", lambda: 2)
        await step.do("c", lambda: 3)
        return {{"started_at": started}}
''',
}


def pushed_tenant_dir(kind: str, salt: str = "") -> str:
    """A fresh tenant directory holding one of PUSHED_SOURCES as workflow.py."""
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix=f"dynwf-bench-{kind}-"))
    (d / "workflow.py").write_text(PUSHED_SOURCES[kind].format(salt=salt))
    return str(d)
