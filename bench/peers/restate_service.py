"""The workflow of the Restate peer benchmark (bench/peers/restate_three_step.py),
served by Hypercorn as an ASGI app: 3 steps, each a `ctx.run` (a journaled action;
step i returns i + 1), and the sum, 6, as the workflow's result."""

import restate

three_step = restate.Workflow("three_step")


def step(i: int) -> int:
    return i + 1


@three_step.main()
async def run(ctx: restate.WorkflowContext) -> int:
    total = 0
    for i in range(3):
        total += await ctx.run_typed(f"step{i}", step, restate.RunOptions(), i)
    return total


app = restate.app(services=[three_step])
