"""Globex's report workflow: uses `humanize`, which only Globex's runtime env has."""

import os

import humanize

from dynwf_ray import WorkflowEntrypoint

TENANT = "globex"


class ReportWorkflow(WorkflowEntrypoint):
    async def run(self, event, step):
        sizes = (event.payload or {}).get("sizes", [1_500_000, 42_000_000])
        total = await step.do("sum sizes", lambda: sum(sizes))
        pretty = await step.do("format", lambda: humanize.naturalsize(total))
        await step.sleep("let it settle", (event.payload or {}).get("sleep", 1))
        return {
            "tenant": TENANT,
            "title": os.environ.get("REPORT_TITLE"),
            "module_file": os.path.abspath(__file__),
            "total": pretty,
            "humanize": humanize.__version__,
        }
