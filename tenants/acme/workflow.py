"""Acme's order workflow: what a customer of the platform pushes (plain Python, no extra deps)."""

import logging
import os

from dynwf_ray import NonRetryableError, WorkflowEntrypoint

TENANT = "acme"
log = logging.getLogger("acme.orders")  # what it prints or logs is kept per step (`dynwf logs`)


class OrderWorkflow(WorkflowEntrypoint):
    async def run(self, event, step):
        order = event.payload or {}
        items = order.get("items", [{"sku": "A-1", "price": 12.5}])
        total = await step.do("price order", lambda: round(sum(i["price"] for i in items), 2))

        def charge(ctx):
            print(f"charging {total} (attempt {ctx.attempt})")
            if total > 10_000:
                raise NonRetryableError(f"order total {total} is over the card limit")
            if ctx.attempt < order.get("fail_charge_times", 0) + 1:
                log.warning("payment gateway timed out")
                raise RuntimeError(f"payment gateway timed out (attempt {ctx.attempt})")
            return {"charged": total, "attempts": ctx.attempt}

        receipt = await step.do(
            "charge card", charge,
            retries={"limit": 4, "delay": "1 second", "backoff": "exponential"},
            timeout="30 seconds",
        )
        await step.sleep("wait for the warehouse", order.get("sleep", "2 seconds"))
        approval = await step.wait_for_event(
            "manager approval", type="approval", timeout=order.get("approval_timeout", "1 hour")
        )
        shipped = await step.do("ship", lambda: {"tracking": f"ACME-{event.instance_id[:8]}"})
        print(f"approved by {approval.payload.get('by')}, shipped as {shipped['tracking']}")
        return {
            "tenant": TENANT,
            "module_file": os.path.abspath(__file__),
            "receipt": receipt,
            "approved_by": approval.payload.get("by"),
            **shipped,
        }
