"""Peer benchmark: Restate (its server and its Python SDK) running 3-step workflows.

Same workload as `bench/throughput.py` (`three_step`): a workflow of 3 trivial steps
(step i returns i + 1; the workflow returns their sum, 6), here a Restate `Workflow`
whose steps are `ctx.run` actions (`restate_service.py`, served by Hypercorn).

The script starts what a Restate user runs on one machine, all with their defaults: the
Restate server (a single binary: ingress, log, partition processors, RocksDB, its
write-ahead log fsync'd) in a fresh temporary directory, and the service in one
Hypercorn process; it registers the service with the server's admin API and drives
the server's HTTP ingress with an aiohttp client. Only the addresses (free ports on
127.0.0.1, TCP only) and the telemetry (off: this machine has no network) are set.

After a warm-up of 200 workflows, runs (interleaved, `--runs` of each):

- `one_by_one_per_s`: one ingress request per instance, `POST /three_step/<id>/run/send`
  (start the workflow `<id>` and return once the server has accepted it), each awaited
  before the next, as a webhook handler would; then wait until all are complete.
- `concurrent_100_per_s`: Restate has no call that starts many workflows at once; the
  closest to our `create_batch` is 100 such requests at once, awaited together, per
  group of 100.

Rate = N / (first create -> last completion). Completion is observed with one
`GET /restate/workflow/three_step/<id>/attach` per instance, all at once (each returns
the workflow's result when it has one).

Runs inside `.venv-restate` (see bench/peers/setup_restate.sh). Prints one JSON object;
the server's and Hypercorn's logs go to files in the temporary directory, shown on
failure.

Usage: .venv-restate/bin/python bench/peers/restate_three_step.py [--workflows 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(
    os.path.dirname(os.path.dirname(HERE)), ".venv-restate", "server", "node_modules",
    "@restatedev", "restate-server-linux-x64", "bin", "restate-server",
)
GROUP = 100
NO_BODY = {"skip_auto_headers": ["Content-Type"]}  # the handler takes no input


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The Restate server and the service's Hypercorn process, started and ended by pid."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.ingress, self.admin, node, service = (free_port() for _ in range(4))
        self.service_url = f"http://127.0.0.1:{service}"
        config = os.path.join(tmp, "restate.toml")
        with open(config, "w") as f:
            f.write(
                f'base-dir = "{os.path.join(tmp, "restate-data")}"\n'
                'disable-telemetry = true\nlisten-mode = "tcp"\n'
                f'bind-address = "127.0.0.1:{node}"\n'
                f'advertised-address = "http://127.0.0.1:{node}"\n'
                f'[ingress]\nbind-address = "127.0.0.1:{self.ingress}"\n'
                f'[admin]\nbind-address = "127.0.0.1:{self.admin}"\n'
            )
        self.logs = [os.path.join(tmp, "restate-server.log"), os.path.join(tmp, "hypercorn.log")]
        self.procs = [
            subprocess.Popen([SERVER, "--config-file", config, "--no-logo"],
                             stdout=open(self.logs[0], "w"), stderr=subprocess.STDOUT),
            subprocess.Popen([sys.executable, "-m", "hypercorn", "restate_service:app",
                              "--bind", f"127.0.0.1:{service}"], cwd=HERE,
                             stdout=open(self.logs[1], "w"), stderr=subprocess.STDOUT),
        ]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log_tails(self) -> str:
        out = []
        for path in self.logs:
            with open(path, errors="replace") as f:
                out.append(f"--- {path}\n" + f.read()[-3000:])
        return "\n".join(out)


async def until(what: str, attempt, timeout: float = 60.0):
    """Poll `attempt()` (an awaitable returning a value, or None to try again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = await attempt()
        except aiohttp.ClientError:
            out = None
        if out is not None:
            return out
        if time.monotonic() > deadline:
            raise RuntimeError(f"Restate: {what} within {timeout} s")
        await asyncio.sleep(0.1)


async def register(session: aiohttp.ClientSession, stack: Stack) -> None:
    async def healthy():
        async with session.get(f"http://127.0.0.1:{stack.admin}/health") as r:
            return True if r.status == 200 else None

    async def registered():
        async with session.post(f"http://127.0.0.1:{stack.admin}/deployments",
                                json={"uri": stack.service_url}) as r:
            return True if r.status in (200, 201) else None

    await until("the admin API to answer", healthy)
    await until("the service's registration", registered)


async def send(session: aiohttp.ClientSession, ingress: str, wid: str) -> None:
    async with session.post(f"{ingress}/three_step/{wid}/run/send", **NO_BODY) as r:
        if r.status not in (200, 202):
            raise RuntimeError(f"Restate refused {wid}: {r.status} {await r.text()}")
        await r.read()


async def all_complete(session: aiohttp.ClientSession, ingress: str, ids: list[str]) -> None:
    async def attach(wid: str) -> None:
        async with session.get(f"{ingress}/restate/workflow/three_step/{wid}/attach") as r:
            result = await r.json(content_type=None)
            if r.status != 200 or result != 6:
                raise RuntimeError(f"Restate: {wid} ended with {r.status} {result}")

    await asyncio.gather(*(attach(w) for w in ids))


async def one_by_one(session: aiohttp.ClientSession, ingress: str, run: str, n: int) -> float:
    ids = [f"{run}-{i}" for i in range(n)]
    start = time.perf_counter()
    for wid in ids:
        await send(session, ingress, wid)
    await all_complete(session, ingress, ids)
    return n / (time.perf_counter() - start)


async def concurrent(session: aiohttp.ClientSession, ingress: str, run: str, n: int) -> float:
    ids = [f"{run}-{i}" for i in range(n)]
    start = time.perf_counter()
    for b in range(0, n, GROUP):
        await asyncio.gather(*(send(session, ingress, w) for w in ids[b:b + GROUP]))
    await all_complete(session, ingress, ids)
    return n / (time.perf_counter() - start)


async def measure(stack: Stack, workflows: int, runs: int) -> dict[str, list[float]]:
    ingress = f"http://127.0.0.1:{stack.ingress}"
    async with aiohttp.ClientSession() as session:
        await register(session, stack)

        async def first():  # the ingress learns of the new deployment shortly after
            async with session.post(f"{ingress}/three_step/warmup-first/run/send", **NO_BODY) as r:
                return True if r.status in (200, 202) else None

        await until("the ingress to accept the workflow", first)
        await one_by_one(session, ingress, "warmup-a", 100)
        await concurrent(session, ingress, "warmup-b", 100)
        rates: dict[str, list[float]] = {"one_by_one_per_s": [], "concurrent_100_per_s": []}
        for r in range(runs):
            rates["one_by_one_per_s"].append(await one_by_one(session, ingress, f"one{r}", workflows))
            rates["concurrent_100_per_s"].append(
                await concurrent(session, ingress, f"conc{r}", workflows))
        return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workflows", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if not os.path.exists(SERVER):
        raise SystemExit(f"no Restate server at {SERVER}: run bench/peers/setup_restate.sh")

    tmp = tempfile.mkdtemp(prefix="restate-bench-")
    stack = Stack(tmp)
    try:
        rates = asyncio.run(measure(stack, args.workflows, args.runs))
    except Exception:
        print(stack.log_tails(), file=sys.stderr)
        raise
    finally:
        stack.stop()
        server_version = subprocess.run([SERVER, "--version"], capture_output=True, text=True).stdout
        shutil.rmtree(tmp, ignore_errors=True)

    print(json.dumps({
        "benchmark": "restate_three_step",
        "restate_server_version": server_version.split()[-1],
        "restate_sdk_version": version("restate-sdk"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "workflows_per_run": args.workflows,
        **{k: {"runs": [round(x, 1) for x in v], "median": round(statistics.median(v), 1)}
           for k, v in rates.items()},
        "method": (
            "Restate Workflow of 3 ctx.run actions (returns 1+2+3), Python SDK served by one "
            "Hypercorn process; warm-up 200 (100 each way); runs interleaved; rate = N / "
            "(first create -> last completion). one_by_one: POST /three_step/<id>/run/send "
            "per instance, each awaited before the next (aiohttp); concurrent_100: no batch "
            f"API in Restate, {GROUP} such requests at once per group; completion: GET "
            "/restate/workflow/three_step/<id>/attach for every instance at once."
        ),
        "settings": "Restate server defaults (24 partitions, RocksDB WAL fsync on, one node "
                    "with every role) in a fresh temp dir, telemetry off, TCP on free ports; "
                    "Hypercorn defaults (1 worker)",
    }))


if __name__ == "__main__":
    main()
