"""`Driver`: plays the scheduler in-process with a fake clock (no Ray)."""

from __future__ import annotations

import asyncio

from dynwf_ray.activation import activate
from dynwf_ray.binding import WorkflowBinding


class Driver:
    """Plays the scheduler for one tenant with a fake clock."""

    def __init__(self, journal, tenant, workflow_cls, **options):
        self.journal = journal
        self.options = options  # more keyword arguments of activate()
        self.tenant = tenant
        self.cls = workflow_cls
        self.now = 1_000_000.0
        journal.save_code(tenant, "v1", "test", b"", self.now)
        self.binding = WorkflowBinding(journal, tenant, clock=lambda: self.now)

    def clock(self) -> float:
        return self.now

    def tick(self) -> list[str]:
        """Claim and activate every due instance of this tenant."""
        outcomes = []
        for claim in self.journal.claim_due(self.now, 1000, "test", 30, tenant_id=self.tenant):
            outcomes.append(
                asyncio.run(
                    activate(
                        self.journal, claim.pk, claim.token, self.cls, clock=self.clock,
                        **self.options,
                    )
                )
            )
        return outcomes

    def info(self, instance_id):
        return self.journal.get_instance(self.tenant, instance_id)

    def steps(self, instance_id):
        return {(s.name, s.seq): s for s in self.journal.list_steps(self.info(instance_id).pk)}
