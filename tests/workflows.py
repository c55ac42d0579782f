"""Workflow classes the tests register (importable by Ray workers as tests.workflows)."""
from dynwf_ray import WorkflowEntrypoint

class Hello(WorkflowEntrypoint):
    async def run(self, event, step):
        name = event.payload.get("name", "world")
        hello = await step.do("greet", lambda: f"Hello, {name}!")
        await step.sleep("pause", "1 second")
        return {"hello": hello}
