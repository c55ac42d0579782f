"""What a warm activation costs a sandbox: CPU and wall time of a 3-step run.

Standalone (no Ray, no journal): a template and its sandboxes as an instance host
makes them (strict jail, the pushed "three" tenant of bench/workflows.py), driven
directly on their channels by a minimal stand-in for the supervisor that answers at
once: it sends `activate` (steps may run at once, as a new instance's do) and
answers each step's `result` with `ok`, until `return`. So it measures the sandbox's
side of the protocol alone: the runtime, its event loop, the channel's messages and
the tenant's code, not the journal or the host.

- `one`: every activation on the same sandbox.
- `rotating`: the same number of activations spread over `--sandboxes` (16) warm
  sandboxes in turn, one at a time, as a host under load runs them (each activation
  in its own sandbox, most recently idle first, so with 16 at once they take turns).
  Only the order differs from `one`: the difference is what a sandbox loses by
  running cold in the CPU's caches.

Figures per activation: `wall_us` as seen by the stand-in, and `cpu_us` (user +
system time of the sandboxes, from /proc). Rounds alternate the two kinds; medians
over `--rounds` rounds.

Usage: python bench/sandbox_activation.py [--activations 3000] [--rounds 3] [--sandboxes 16]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import arg, emit  # noqa: E402
from bench.sandbox import ENV, PRELOAD, load, runtime_sys_path  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray.sandbox import protocol  # noqa: E402
from dynwf_ray.sandbox.policy import JailSpec, SandboxLimits  # noqa: E402
from dynwf_ray.sandbox.template import Template  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICK


def _activate(sock, i: int) -> None:
    """One activation, answered at once; raises unless it returns the workflow's output."""
    protocol.send(sock, {
        "t": "activate",
        "event": {"payload": {}, "timestamp": time.time(), "instance_id": f"i{i}"},
        "metadata": {}, "env": {}, "bindings": ["WORKFLOWS"], "replay": {},
        "trace": f"00-{i + 1:032x}-{i + 1:016x}-01", "steps_at_once": True, "not_replayed": [],
    })
    while True:
        message = protocol.recv(sock, protocol.MAX_SANDBOX_FRAME)
        if message is None:
            raise RuntimeError("the sandbox closed its channel")
        op = message.get("op")
        if op == "result":
            protocol.send(sock, {"t": "ok", "id": message["id"], "value": message.get("value")})
        elif op == "return":
            if message.get("value") != 3:
                raise RuntimeError(f"unexpected output {message.get('value')!r}")
            return
        elif op in ("raise", "fail"):
            raise RuntimeError(f"the run failed: {message}")


def main() -> None:
    n, rounds, count = arg("--activations", 3000), arg("--rounds", 3), arg("--sandboxes", 16)
    code = pushed_tenant_dir("three")
    template = Template.start(python=sys.executable, sys_path=runtime_sys_path(), env=dict(ENV),
                              cwd="/", preload=PRELOAD, mode="strict", code_path=code)
    sandboxes, scratches = [], []
    try:
        for _ in range(count):
            scratch = tempfile.mkdtemp(prefix="dynwf-bench-sandbox-")
            scratches.append(scratch)
            spec = JailSpec(mode="strict", read_only=(code,), read_write=(scratch,), limits=SandboxLimits())
            sandbox = template.spawn(spec, "dynwf_ray.sandbox.runtime:serve", {"entrypoint": "workflow:ThreeSteps"})
            sandbox.sock.settimeout(30)
            first = protocol.recv(sandbox.sock, protocol.MAX_SANDBOX_FRAME)
            assert first is not None and first.get("op") == "ready", first
            sandboxes.append(sandbox)
        pids = [s.pid for s in sandboxes]
        for i in range(300):  # warm-up: every sandbox has run
            _activate(sandboxes[i % count].sock, i)
        samples: dict[str, dict[str, list[float]]] = {k: {"wall_us": [], "cpu_us": []} for k in ("one", "rotating")}
        for _ in range(rounds):
            for kind in ("one", "rotating"):
                cpu0, t0 = _cpu_seconds(pids), time.perf_counter()
                for i in range(n):
                    _activate(sandboxes[i % count if kind == "rotating" else 0].sock, i)
                wall, cpu = time.perf_counter() - t0, _cpu_seconds(pids) - cpu0
                samples[kind]["wall_us"].append(round(wall / n * 1e6, 1))
                samples[kind]["cpu_us"].append(round(cpu / n * 1e6, 1))
    finally:
        for sandbox in sandboxes:
            sandbox.kill()
        template.close()
        for scratch in scratches:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(code, ignore_errors=True)
    figures = {
        kind: {f"{k}_median": statistics.median(v) for k, v in s.items()} | {"rounds": s}
        for kind, s in samples.items()
    }
    emit("sandbox_activation", {
        "what": "a warm 3-step activation's cost to its sandbox, driven directly on its channel "
                "(no Ray, no journal), per activation",
        "tenant_code": "pushed 'three' (bench/workflows.py)",
        "activations_per_round": n,
        "sandboxes": count,
        **figures,
        "rotating_over_one_cpu": round(figures["rotating"]["cpu_us_median"] / figures["one"]["cpu_us_median"], 2),
        "load_after": load(),
    })


if __name__ == "__main__":
    main()
