"""The workflow `dynwf demo` runs: a few steps, a durable sleep, a flaky step, an approval."""

from __future__ import annotations

from dynwf_ray import WorkflowEntrypoint


class DemoWorkflow(WorkflowEntrypoint):
    async def run(self, event, step):
        name = (event.payload or {}).get("name", "world")
        greeting = await step.do("greet", lambda: f"Hello, {name}!")
        order = await step.do("create order", lambda: {"order": 42, "items": 3})
        await step.sleep("cool down", "2 seconds")

        def charge(ctx):
            if ctx.attempt < 3:
                raise RuntimeError(f"payment gateway timed out (attempt {ctx.attempt})")
            return {"charged": 99.5, "attempts": ctx.attempt}

        payment = await step.do(
            "charge card", charge,
            retries={"limit": 4, "delay": "1 second", "backoff": "exponential"},
            timeout="30 seconds",
        )
        approval = await step.wait_for_event("manager approval", type="approval", timeout="5 minutes")
        return {
            "greeting": greeting, "order": order["order"], "payment": payment,
            "approved_by": approval.payload.get("by"),
        }
