"""Tenant sandboxes: how long a new one takes to start, and what an idle one costs in memory.

Standalone (no Ray, no journal), the way an instance host does it (`host._Sandboxes`):
a template is started once in the code directory of tenants/acme (that directory
first on its sys.path, then the interpreter's own entries; preload
`dynwf_ray.sandbox.runtime` and `opentelemetry.sdk.trace`; strict jail; the minimal
environment a tenant without `[env]` gets), then:
- `spawn_ready`: `Template.spawn(...)` (fork, jail, import of the entry module)
  until the sandbox's `ready` frame arrives on its channel, which includes
  importing the tenant's code in the fresh sandbox; `spawn` alone is the part up
  to the template's answer. Each sample is a new sandbox, killed after it.
- `sandbox_uss_mb`: unique memory (Private_Clean + Private_Dirty from
  /proc/<pid>/smaps_rollup) of a sandbox that is ready and idle (never activated);
  `template_uss_mb` for context.

Through the engine (default configuration, a pushed tenant whose instances wait for
an event; each sample: event sent -> its next step runs, as bench/activation.py):
- `activation_warm_sandbox`: the host and its idle sandbox are warm.
- `activation_fresh_sandbox`: the same, but the host's idle sandbox was killed
  (SIGKILL to the pid `engine.sandboxes()` reports) before the event was sent, so
  the activation forks a new sandbox. The two kinds alternate; each fresh sample is
  checked to have started exactly one sandbox and each warm one none.
- `idle_sandbox_uss_mb` / `host_uss_mb` / `template_uss_mb`: unique memory of the
  warm sandbox (idle, after those activations), of its host process (one per
  (tenant, version)) and of the host's template, found with `engine.sandboxes()`.

Usage: python bench/sandbox.py [--spawns 60] [--samples 20] [--database-url URL]
"""

from __future__ import annotations

import os
import shutil
import signal
import site
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402  (installed with ray[default])

from bench._common import arg, database_url, emit, summary_ms, wait_until  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray import Engine  # noqa: E402
from dynwf_ray.sandbox import protocol  # noqa: E402
from dynwf_ray.sandbox.policy import JailSpec, SandboxLimits  # noqa: E402
from dynwf_ray.sandbox.template import Template  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ACME = str(REPO / "tenants" / "acme")
PRELOAD = ["dynwf_ray.sandbox.runtime", "opentelemetry.sdk.trace"]  # as host._Sandboxes
#: A sandbox's whole environment when its tenant sets none (as the host's).
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def runtime_sys_path() -> list[str]:
    """This interpreter's own entries of sys.path (stdlib, site-packages): a template's
    import path, as a host gives it (the tenant's code goes first in each sandbox only)."""
    roots = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                          sys.base_exec_prefix, *site.getsitepackages())}

    def inside(entry: str) -> bool:
        entry = os.path.abspath(entry)
        return any(entry == r or entry.startswith(r + "/") for r in roots)

    return [p for p in sys.path if p and os.path.exists(p) and inside(p)]


def uss_mb(pid: int) -> float | None:
    """Private_Clean + Private_Dirty of one process, in MiB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            kib = sum(int(line.split()[1]) for line in f
                      if line.startswith(("Private_Clean:", "Private_Dirty:")))
    except OSError:
        return None
    return round(kib / 1024, 2)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- standalone: a template and its sandboxes, no engine -------------------------------


def standalone(spawns: int) -> dict:
    t0 = time.perf_counter()
    template = Template.start(
        python=sys.executable, sys_path=runtime_sys_path(), env=dict(ENV),
        cwd="/", preload=PRELOAD, mode="strict", code_path=ACME,
    )
    template_start = time.perf_counter() - t0
    spawn, ready, uss = [], [], []
    try:
        for i in range(spawns + 1):
            scratch = tempfile.mkdtemp(prefix="dynwf-bench-sandbox-")
            spec = JailSpec(mode="strict", read_only=(ACME,), read_write=(scratch,),
                            limits=SandboxLimits())
            t0 = time.perf_counter()
            sb = template.spawn(spec, "dynwf_ray.sandbox.runtime:serve",
                                {"entrypoint": "workflow:OrderWorkflow"})
            t1 = time.perf_counter()
            sb.sock.settimeout(30)
            first = protocol.recv(sb.sock, protocol.MAX_SANDBOX_FRAME)
            t2 = time.perf_counter()
            assert first is not None and first.get("op") == "ready", first
            if i:  # the first one warms up the template's page cache
                spawn.append(t1 - t0)
                ready.append(t2 - t0)
                uss.append(sb.memory_uss() / 2**20)
            sb.kill()
            sb.wait(5)
            sb.sock.close()
            shutil.rmtree(scratch, ignore_errors=True)
        template_uss = uss_mb(template.pid)
    finally:
        template.close()
    return {
        "tenant_code": "tenants/acme (workflow:OrderWorkflow)",
        "template_start_s": round(template_start, 3),
        "spawn": summary_ms(spawn),
        "spawn_ready": summary_ms(ready),
        "spawn_ready_target_p50_ms": 50,
        "sandbox_uss_mb": round(statistics.median(uss), 2),
        "sandbox_uss_range_mb": [round(min(uss), 2), round(max(uss), 2)],
        "template_uss_mb": template_uss,
    }


# -- through the engine ------------------------------------------------------------------


def _hosts_of(engine: Engine, tenant: str) -> list[dict]:
    """The tenant's live hosts (the default warm pool may keep two)."""
    return [h for h in engine.sandboxes() if h["tenant"] == tenant]


def _started(engine: Engine, tenant: str) -> int:
    return sum(h["started"] for h in _hosts_of(engine, tenant))


def _kill_idle_sandboxes(engine: Engine, tenant: str) -> None:
    """SIGKILL every idle sandbox of the tenant's hosts, whichever host gets the next loan."""
    for host in _hosts_of(engine, tenant):
        for sb in host["sandboxes"]:
            if sb["instance"] is None and _running(sb["pid"]):
                os.kill(sb["pid"], signal.SIGKILL)  # a sandbox this benchmark's engine forked
                wait_until(lambda: not _running(sb["pid"]), 10, "the sandbox to end")
    time.sleep(0.2)  # each host sees the channel close and marks the session unhealthy


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def through_engine(url: str, samples: int) -> dict:
    engine = Engine.start(database_url=url, name=f"bench-sandbox-{os.getpid()}")
    try:
        engine.push_tenant("sbx", pushed_tenant_dir("wake", "sandbox"))
        wf = engine.binding("sbx")
        lat: dict[str, list[float]] = {"warm": [], "fresh": []}
        started: dict[str, list[int]] = {"warm": [], "fresh": []}
        order = ["warm", "fresh"]
        for i in range(2 * samples + 1):
            kind = order[i % 2] if i else "warm"  # sample 0 starts the host: not counted
            inst = wf.create(id=f"s{i}")
            wait_until(lambda: inst.status()["status"] == "waiting", 120, "the instance to wait")
            wait_until(lambda: engine.stats()["busy_hosts"] == 0, 60, "the host to be idle")
            if kind == "fresh":
                _kill_idle_sandboxes(engine, "sbx")
            before = _started(engine, "sbx")
            sent = time.time()
            inst.send_event("poke", {})
            out = wait_until(
                lambda: (s := inst.status())["status"] == "complete" and s["output"], 120,
                "completion", interval=0.001,
            )
            if i:
                lat[kind].append(out["resumed_at"] - sent)
                started[kind].append(_started(engine, "sbx") - before)
        wait_until(lambda: engine.stats()["busy_hosts"] == 0, 60, "the host to be idle")
        hosts = _hosts_of(engine, "sbx")
        # (a host lists a sandbox killed above until its next activation finds it dead)
        idle_entries = [sb for h in hosts for sb in h["sandboxes"]
                        if sb["instance"] is None and _running(sb["pid"])]
        idle = [sb["pid"] for sb in idle_entries]
        template_pids = sorted({psutil.Process(p).ppid() for p in idle})
        memory = {
            "idle_sandbox_uss_mb": [uss_mb(p) for p in idle],
            "idle_sandbox_uss_target_mb": 15,
            "idle_sandbox_activations": [sb["activations"] for sb in idle_entries],
            "host_uss_mb": [uss_mb(h["host_pid"]) for h in hosts],
            "template_uss_mb": [uss_mb(p) for p in template_pids],
        }
        stats = engine.stats()
    finally:
        engine.stop()
    assert set(started["warm"]) == {0}, started["warm"]
    assert set(started["fresh"]) == {1}, started["fresh"]
    return {
        "activation_warm_sandbox": summary_ms(lat["warm"]),
        "activation_fresh_sandbox": summary_ms(lat["fresh"]),
        "fresh_minus_warm_p50_ms": round(
            (statistics.median(lat["fresh"]) - statistics.median(lat["warm"])) * 1000, 3),
        **memory,
        "hosts": len(hosts),
        "sandboxes_started": sum(h["started"] for h in hosts),
        "cold_starts": stats["cold_starts"],
    }


def main() -> None:
    spawns = arg("--spawns", 60)
    samples = arg("--samples", 20)
    url = database_url()
    load_before = load()
    alone = standalone(spawns)
    engine = through_engine(url, samples)
    emit("sandbox", {
        "journal": url.split(":")[0],
        "load_before": load_before,
        "load_after": load(),
        "standalone": alone,
        "engine": engine,
    })


if __name__ == "__main__":
    main()
