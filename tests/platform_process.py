"""A whole platform in a process of its own, for tests that kill it (tests/test_restart.py).

Owns: the workflow class `Journaled` and the `ENGINE` binding (`EngineLabel`) that
those tests register, and the script

    python -m tests.platform_process '<json args>'        (cwd: the repo root)

which starts a Ray session of its own (`ray.init(_temp_dir=...)`, so every process of
that session names the temp dir in its command line and the test can find and kill
them all), starts an engine on the given journal and name with the default
`lease_ttl` (30 s), registers `Journaled` (tenant `TENANT`, its directory lent rw)
and `tests.workflows.Approval` (tenant `ASK`), creates the instances the test asks
for, waits until each is where the test wants it, prints one line

    READY {"pid": ..., "ray_temp_dir": ..., "name": ..., "instances": {...}}

and sleeps until it is killed. Any failure before that prints `FAILED <reason>` and
exits 1.

Args (JSON): database_url, name, ray_temp_dir, dir (lent to TENANT: each instance
works in dir/<id>), label (what the ENGINE binding answers: which engine ran a step),
hibernate_after, instances: a list of {"id", "kind"}, kind one of
- "quick": runs to completion at once (READY once it is complete);
- "slow": blocks in step b until dir/<id>/release exists (READY once b started);
- "sleep": a durable sleep of "sleep" seconds between steps a and b (READY once it
  waits; these are created last, after every other instance is where it should be);
- "ask": `Approval`, waits for an "approval" event (READY once it waits).

This module is also imported by sandboxes (a registered class is stored by
reference): importing it must stay cheap and start nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from dynwf_ray import WorkflowEntrypoint

from .workflows import PROCESS, wait_for_file

#: The tenant that runs `Journaled`, and the one that runs `tests.workflows.Approval`.
TENANT = "journaled"
ASK = "ask"


def note(directory: str, step: str, engine: str) -> str:
    """Append one run of `step` to directory/<step>.log: when, which engine, which sandbox."""
    line = json.dumps({"t": time.time(), "engine": engine, "proc": PROCESS})
    with open(Path(directory) / f"{step}.log", "a") as f:
        f.write(line + "\n")
    return engine


def runs(directory: Path, step: str) -> list[dict]:
    """Every recorded run of `step` in an instance's directory, oldest first."""
    path = Path(directory) / f"{step}.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class EngineLabel:
    """The `ENGINE` binding: says which engine's host a step runs in."""

    def __init__(self, label: str, tenant_id: str):
        self._label = label

    def label(self) -> str:
        return self._label


def engine_label(label: str):
    """The binding factory for `Engine.start(bindings={"ENGINE": ...})` (picklable)."""
    import functools

    return functools.partial(EngineLabel, label)


class Journaled(WorkflowEntrypoint):
    """Steps a, b, c, each logged to <dir>/<step>.log (`note`) and returning the label of
    the engine that ran it. With "block", b waits for <dir>/release after logging; with
    "sleep", a durable sleep "nap" of that many seconds comes between a and b."""

    async def run(self, event, step):
        params = event.payload
        d = params["dir"]
        engine = self.env["ENGINE"]

        def a():
            return note(d, "a", engine.label())

        async def b():
            who = note(d, "b", engine.label())
            if params.get("block"):
                await wait_for_file(Path(d) / "release", limit=600.0)
            return who

        def c():
            return note(d, "c", engine.label())

        first = await step.do("a", a)
        if params.get("sleep"):
            await step.sleep("nap", params["sleep"])
        second = await step.do("b", b)
        third = await step.do("c", c)
        return {"a": first, "b": second, "c": third}


def main(args: dict) -> None:
    import ray

    from tests.conftest import wait_until

    from dynwf_ray import Engine

    if __name__ != "tests.platform_process":  # see the __main__ block
        raise RuntimeError(f"main() must run in tests.platform_process, not {__name__}")

    from .workflows import Approval

    ray.init(
        _temp_dir=args["ray_temp_dir"], num_cpus=2, include_dashboard=False,
        namespace="dynwf", logging_level="WARNING",
    )
    engine = Engine.start(
        database_url=args["database_url"], name=args["name"],
        hibernate_after=args.get("hibernate_after", 60.0), poll_interval=0.5,
        max_hosts=args.get("max_hosts", 4),
        bindings={"ENGINE": engine_label(args.get("label", "A"))},
    )  # lease_ttl: the default (30 s)
    root = Path(args["dir"])
    kinds = {spec["id"]: spec for spec in args["instances"]}
    if any(s["kind"] != "ask" for s in kinds.values()):
        engine.register(TENANT, Journaled)
        engine.set_tenant_policy(TENANT, paths={str(root): "rw"})
    if any(s["kind"] == "ask" for s in kinds.values()):
        engine.register(ASK, Approval)

    def create(spec: dict):
        if spec["kind"] == "ask":
            return engine.binding(ASK).create(id=spec["id"])
        d = root / spec["id"]
        d.mkdir(parents=True, exist_ok=True)
        params = {"dir": str(d), "block": spec["kind"] == "slow"}
        if spec["kind"] == "sleep":
            params["sleep"] = spec["sleep"]
        return engine.binding(TENANT).create(id=spec["id"], params=params)

    def reached(spec: dict, handle) -> bool:
        status = handle.status()["status"]
        if status in ("errored", "terminated"):
            raise RuntimeError(f"instance {spec['id']} ended {status}: {handle.status()}")
        if spec["kind"] == "quick":
            return status == "complete"
        if spec["kind"] == "slow":
            return status == "running" and bool(runs(root / spec["id"], "b"))
        return status == "waiting"

    def settle(specs: list[dict]) -> None:
        handles = [(s, create(s)) for s in specs]
        for spec, handle in handles:
            wait_until(lambda: reached(spec, handle), 120.0, f"instance {spec['id']} ({spec['kind']})")

    settle([s for s in kinds.values() if s["kind"] != "sleep"])
    settle([s for s in kinds.values() if s["kind"] == "sleep"])  # last: their timers stay ahead
    ready = {
        "pid": os.getpid(), "ray_temp_dir": args["ray_temp_dir"],
        "name": args["name"], "ready_at": time.time(),
        "instances": {i: s["kind"] for i, s in kinds.items()},
    }
    print("READY " + json.dumps(ready), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    # Run main() of the module imported by its name: classes registered from __main__
    # would be pickled by value (with this process's globals), not by reference.
    from tests.platform_process import main as _main

    try:
        _main(json.loads(sys.argv[1]))
    except Exception as exc:  # noqa: BLE001 - the test reads why
        print(f"FAILED {type(exc).__name__}: {exc}", flush=True)
        raise SystemExit(1)
