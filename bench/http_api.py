"""Creating instances through the HTTP API, as a webhook handler or a platform service would.

`dynwf serve` runs as its own process with its defaults (embedded Ray, a fresh SQLite
journal); a 3-step tenant is pushed through the API (PUT .../code, a zip). Then, with
keep-alive `httpx` clients and an admin token:

- `one_by_one`: one client creates instances one after another: p50/p90/p99 latency of
  `POST /v1/tenants/{t}/instances` and creates per second;
- `concurrent`: `--clients` clients (threads, one connection each) create at once:
  creates per second and latency;
- `batches`: `POST .../instances/batch` of 100: instances per second;
- `completed_per_s`: the engine runs every created instance meanwhile (it shares the
  two cores with the server); instances completed per second over the whole run.

Each figure is the median of `--runs` runs (each run's own figures are listed too).

Usage: python bench/http_api.py [--creates 1000] [--clients 8] [--runs 3] [--database-url URL]
"""

from __future__ import annotations

import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from bench._common import arg, database_url, emit, summary_ms, wait_until  # noqa: E402
from bench.workflows import pushed_tenant_dir  # noqa: E402
from dynwf_ray.journal import Journal  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zipped(directory: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path in Path(directory).rglob("*"):
            if path.is_file():
                z.write(path, path.relative_to(directory))
    return buf.getvalue()


def one_by_one(client: httpx.Client, url: str, n: int, prefix: str) -> dict:
    times = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        r = client.post(url, json={"id": f"{prefix}-{i}", "params": {"i": i}})
        times.append(time.perf_counter() - t0)
        assert r.status_code == 201, r.text
    return {"per_s": round(n / (time.perf_counter() - start), 1), **summary_ms(times)}


def concurrent(base: str, headers: dict, url: str, n: int, clients: int, prefix: str) -> dict:
    times: list[float] = []
    lock = threading.Lock()

    def work(c: int) -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            for i in range(c, n, clients):
                t0 = time.perf_counter()
                r = client.post(url, json={"id": f"{prefix}-{i}", "params": {"i": i}})
                with lock:
                    times.append(time.perf_counter() - t0)
                assert r.status_code == 201, r.text

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"per_s": round(n / (time.perf_counter() - start), 1), **summary_ms(times)}


def batches(client: httpx.Client, url: str, n: int, prefix: str) -> dict:
    start = time.perf_counter()
    for b in range(0, n, 100):
        items = [{"id": f"{prefix}-{i}", "params": {"i": i}} for i in range(b, min(n, b + 100))]
        r = client.post(f"{url}/batch", json={"items": items})
        assert r.status_code == 200 and all(i["outcome"] == "created" for i in r.json()["items"]), r.text
    return {"per_s": round(n / (time.perf_counter() - start), 1)}


def main() -> None:
    creates, clients, runs = arg("--creates", 1000), arg("--clients", 8), arg("--runs", 3)
    url = database_url()
    journal = Journal(url)
    token = journal.create_token(None, "bench", time.time())[1]
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="dynwf-serve-", suffix=".log", delete=False)
    server = subprocess.Popen(
        [sys.executable, "-m", "dynwf_ray.cli", "--database-url", url, "serve", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        def up() -> bool:
            try:
                return httpx.get(f"{base}/v1/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 120, f"dynwf serve to be ready (log: {log.name})", interval=0.2)
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            r = client.put("/v1/tenants/bench/code", content=zipped(pushed_tenant_dir("three")),
                           headers={"Content-Type": "application/zip"})
            assert r.status_code == 201, r.text
            path = "/v1/tenants/bench/instances"
            one_by_one(client, path, 100, "warm")  # warm-up: the first host, the first requests
            started, results = time.time(), {"one_by_one": [], "concurrent": [], "batches": []}
            for run in range(runs):
                results["one_by_one"].append(one_by_one(client, path, creates, f"seq{run}"))
                results["concurrent"].append(
                    concurrent(base, headers, path, creates, clients, f"con{run}"))
                results["batches"].append(batches(client, path, creates, f"bat{run}"))
            total = 100 + 3 * creates * runs

            def done() -> bool:
                counts = client.get("/v1/stats").json()["by_tenant"].get("bench", {})
                return counts.get("complete", 0) >= total

            wait_until(done, 600, "every instance to complete", interval=0.5)
            completed_per_s = round(total / (time.time() - started), 1)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    def median(kind: str, key: str) -> float:
        return round(statistics.median(r[key] for r in results[kind]), 3)

    emit("http_api", {
        "config": {"server": "dynwf serve, defaults", "journal": url.split(":")[0],
                   "creates_per_run": creates, "clients": clients, "runs": runs,
                   "tenant": "pushed (3 steps)"},
        "one_by_one": {"creates_per_s": median("one_by_one", "per_s"),
                       "p50_ms": median("one_by_one", "p50_ms"), "p99_ms": median("one_by_one", "p99_ms")},
        "concurrent": {"creates_per_s": median("concurrent", "per_s"),
                       "p50_ms": median("concurrent", "p50_ms"), "p99_ms": median("concurrent", "p99_ms")},
        "batches": {"instances_per_s": median("batches", "per_s")},
        "completed_per_s": completed_per_s,
        "runs": results,
    })


if __name__ == "__main__":
    main()
