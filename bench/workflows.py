"""Workflows the benchmarks run (importable by Ray workers as bench.workflows)."""

from __future__ import annotations

import os
import time

from dynwf_ray import WorkflowEntrypoint


class TrivialSteps(WorkflowEntrypoint):
    """`steps` trivial steps in a row."""

    async def run(self, event, step):
        for i in range(event.payload["steps"]):
            await step.do("s", lambda: 1)
        return "done"


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
