"""The cluster guide (cluster/README.md, sections 2 to 4), followed as a newcomer would.

Every command this test runs is taken from the guide: `Guide.say` fails when the
guide no longer contains it (whitespace and `\\` line breaks aside), and then
replaces the guide's placeholders with this machine's values (HEAD -> 127.0.0.1,
the journal's URL -> a fresh test database, Ray's and the server's ports -> free
ones, `scp` -> `cp`). So the guide cannot drift from what works, nor the code
from the guide.

What it covers, in the guide's order: a wheel built from this checkout and
installed with pip into a new virtualenv (everything afterwards runs from that
virtualenv, not from the checkout); a Ray token; a head and a worker node
started with `ray start` and token authentication; an admin token; `dynwf serve`
submitted with `ray job submit`; a tenant pushed over HTTP from a directory of
its own, an instance created, sent its event and read until complete; the same
with the `dynwf` CLI; `ray job stop`, after which the engine's session has
ended; then `cluster/platform/`: a detached engine started by a Ray job with
`--working-dir`, a webhook server joining it from a second process, an order
through it, and the engine stopped by another job.

What it changes, to share this machine: Ray's temp dir is private (RAY_TMPDIR,
so `ray_current_cluster` and the nodes' sockets are ours alone), HOME is private
per node (each node's `~/.ray/auth_token`), `ray start` runs with `--block` and
with Ray's other listening ports chosen free, and the processes are ended by pid
(`ray start --block` ends its node's processes on SIGTERM), never `ray stop`.
Section 1 (the database) is replaced by a fresh test database.

pip fetches Ray and the other dependencies from the package registry, so the test
needs it (it is skipped where `DYNWF_TEST_POSTGRES_URL` is unset, like the other
cluster tests, and fails under DYNWF_REQUIRE_POSTGRES=1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy

from dynwf_ray.journal import Journal

REPO = Path(__file__).resolve().parent.parent
GUIDE_TEXT = (REPO / "cluster" / "README.md").read_text()
#: pip install of Ray and its dependencies from the registry, on a cold cache.
INSTALL_TIMEOUT = 900
STEP_TIMEOUT = 180


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\\\n\s*", " ", text)).strip()


GUIDE = _flat(GUIDE_TEXT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guide:
    """Runs the guide's commands, checked against it, with placeholders replaced."""

    def __init__(self, work: Path, subs: list[tuple[str, str]], env: dict[str, str]):
        self.work, self.subs, self.env = work, subs, env
        self.started: list[subprocess.Popen] = []

    def say(self, command: str) -> str:
        assert _flat(command) in GUIDE, f"cluster/README.md no longer says: {command}"
        for old, new in self.subs:
            command = command.replace(old, new)
        return command

    def run(self, command: str, *, env: dict[str, str] | None = None,
            timeout: float = STEP_TIMEOUT, cwd: Path | None = None, after: str = "") -> str:
        line = self.say(command) + after
        p = subprocess.run(["bash", "-c", line], cwd=cwd or self.work, env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, (f"`{line}` failed (exit {p.returncode})\n--- stdout ---\n"
                                   f"{p.stdout[-5000:]}\n--- stderr ---\n{p.stderr[-5000:]}")
        return p.stdout

    def start(self, command: str, extra: str, log: Path, env: dict[str, str],
              ready: str = "Ray runtime started") -> subprocess.Popen:
        """A command that keeps running (a `ray start --block`: `extra` holds --block and
        the ports), in its own group, once its output says `ready`."""
        line = f"{self.say(command)} {extra}".rstrip()
        proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=self.work, env={**self.env, **env},
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(proc)
        deadline = time.monotonic() + STEP_TIMEOUT
        while ready not in log.read_text():
            assert proc.poll() is None, f"`{line}` exited {proc.returncode}:\n{log.read_text()[-5000:]}"
            assert time.monotonic() < deadline, f"`{line}` did not start:\n{log.read_text()[-5000:]}"
            time.sleep(0.2)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):  # the newest first: the worker before the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group is left
            except ProcessLookupError:
                pass
            proc.wait()


def refused_worker(guide: Guide, env: dict[str, str], worker: dict[str, str], log: Path) -> str:
    """What the guide warns of: a worker started without `RAY_AUTH_MODE=token` (and here
    without the token) is refused by a head that has authentication on. Its output; the
    command is ended by pid, with whatever of its group is left, if it did not exit."""
    line = guide.say("ray start --address=HEAD:6379")
    bare = {k: v for k, v in {**env, **worker}.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.Popen(["bash", "-c", f"exec {line} --num-cpus=1"], cwd=guide.work, env=bare,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    out = log.read_text()
    assert proc.returncode != 0 or "InvalidAuthToken" in out, f"the worker was not refused:\n{out[-5000:]}"
    return out


def poll_json(guide: Guide, command: str, done, what: str, env=None, timeout: float = 120.0):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        out = guide.run(command, env=env)
        try:
            last = json.loads(out)
        except ValueError:
            last = out
        if done(last):
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout} s; last: {last}")


def test_the_cluster_guide_works_as_written(pg_database_url, tmp_path):
    work = tmp_path / "newcomer"
    src = work / "checkout"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    shutil.copytree(REPO / "cluster" / "platform", work / "cluster" / "platform",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # "a directory of its own": the tenant's code, outside any checkout
    shutil.copytree(REPO / "tenants" / "acme", work / "tenants" / "acme",
                    ignore=shutil.ignore_patterns("__pycache__", "tests"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    ray_tmp = tempfile.mkdtemp(prefix="dynwf-guide-", dir="/tmp")  # short: Ray's sockets
    homes = {n: work / f"home-{n}" for n in ("head", "worker")}
    for h in homes.values():
        h.mkdir()
    gcs, dash, http, hook = _free_port(), _free_port(), _free_port(), _free_port()
    api = f"http://127.0.0.1:{http}"
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("DYNWF_", "RAY_", "OTEL_", "VIRTUAL_ENV", "PYTHON"))}
    env = {**base, "PATH": f"{venv / 'bin'}:{base['PATH']}", "RAY_TMPDIR": ray_tmp,
           "HOME": str(homes["head"]), "PIP_CACHE_DIR": os.path.expanduser("~/.cache/pip")}
    guide = Guide(work, [
        ("scp HEAD:.ray/auth_token", f"cp {homes['head']}/.ray/auth_token"),
        ("HEAD:6379", f"127.0.0.1:{gcs}"), ("--port=6379", f"--port={gcs}"),
        ("http://HEAD:8265", f"http://127.0.0.1:{dash}"),
        ("--dashboard-host=0.0.0.0", "--dashboard-host=127.0.0.1"),
        ("--host 0.0.0.0 --port 8750", f"--host 127.0.0.1 --port {http}"),
        ("8080", str(hook)),
    ], env)
    node = {"RAY_AUTH_MODE": "token", "DYNWF_DATABASE_URL": pg_database_url,
            "RAY_JOB_STOP_WAIT_TIME_S": "60"}
    for export in ("export RAY_AUTH_MODE=token",
                   "export DYNWF_DATABASE_URL='postgresql+psycopg://dynwf:PASSWORD@DBHOST:5432/dynwf'",
                   "export RAY_JOB_STOP_WAIT_TIME_S=60", "API=http://HEAD:8750"):
        guide.say(export)  # the guide sets these; `node` and API= below are their values here
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        # Section 2: a wheel from the checkout, installed with its dependencies.
        guide.run("python -m pip wheel --no-deps -w dist .", cwd=src, timeout=INSTALL_TIMEOUT)
        (work / "dist").mkdir()
        wheel = src / "dist" / "dynwf_ray-0.1.0-py3-none-any.whl"
        assert wheel.is_file(), f"the guide's wheel name is wrong: {list((src / 'dist').iterdir())}"
        shutil.copy2(wheel, work / "dist")
        shutil.rmtree(src)  # from here on nothing of the checkout is at hand
        guide.run('python -m pip install "dist/dynwf_ray-0.1.0-py3-none-any.whl[postgres]" '
                  '"ray[default]==2.60.0"', timeout=INSTALL_TIMEOUT)
        timings["install_s"] = round(time.monotonic() - t0, 1)
        where = subprocess.run([str(venv / "bin" / "python"), "-c", "import dynwf_ray; "
                                "print(dynwf_ray.__file__)"], cwd=work, env=env,
                               capture_output=True, text=True, check=True).stdout
        assert where.startswith(str(venv)), where

        # Section 3: a token, a head and a worker.
        t = time.monotonic()
        guide.run("ray get-auth-token --generate > /dev/null")
        assert (homes["head"] / ".ray" / "auth_token").is_file()
        guide.start("ray start --head --port=6379 --dashboard-host=0.0.0.0",
                    f"--dashboard-port={dash} --ray-client-server-port={_free_port()} "
                    f"--dashboard-agent-listen-port={_free_port()} "
                    f"--metrics-export-port={_free_port()} --num-cpus=2 --block",
                    work / "head.log", node)
        worker = {**node, "HOME": str(homes["worker"])}
        refused = refused_worker(guide, env, worker, work / "refused.log")
        assert "InvalidAuthToken" in refused, refused[-5000:]
        guide.run("mkdir -p ~/.ray && scp HEAD:.ray/auth_token ~/.ray/auth_token", env=worker)
        guide.start("ray start --address=HEAD:6379",
                    f"--dashboard-agent-listen-port={_free_port()} "
                    f"--metrics-export-port={_free_port()} --num-cpus=1 --block",
                    work / "worker.log", worker)
        timings["nodes_s"] = round(time.monotonic() - t, 1)

        # Section 4: an admin token, then `dynwf serve` as a Ray job.
        admin = guide.run("dynwf token create --admin --name ops", env=node).strip()
        assert admin and "\n" not in admin
        t = time.monotonic()
        job = {**node, "ID": f"dynwf-{int(time.time())}"}
        guide.run("ray job submit --address http://HEAD:8265 --submission-id $ID --no-wait "
                  "-- dynwf serve --host 0.0.0.0 --port 8750", env=job)
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            probe = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                    f"{api}/v1/ready"], capture_output=True, text=True)
            if probe.stdout == "200":
                break
            if time.monotonic() > deadline:
                logs = subprocess.run(  # not the guide's --follow: the job still runs
                    ["ray", "job", "logs", "--address", f"http://127.0.0.1:{dash}", job["ID"]],
                    env={**env, **job}, capture_output=True, text=True, timeout=60)
                pytest.fail(f"dynwf serve was not ready in {STEP_TIMEOUT} s (/v1/ready: "
                            f"{probe.stdout}):\n{logs.stdout[-8000:]}\n{logs.stderr[-3000:]}")
            time.sleep(0.5)
        timings["serve_ready_s"] = round(time.monotonic() - t, 1)

        # Over HTTP, from the tenant's own directory.
        http_env = {"API": api, "ADMIN": admin}
        pushed = json.loads(guide.run(
            "tar -czf - -C tenants/acme workflow.py | curl -s -X PUT -H \"Authorization: Bearer $ADMIN\" "
            "-H 'Content-Type: application/gzip' --data-binary @- $API/v1/tenants/acme/code",
            env=http_env))
        assert pushed.get("version"), pushed
        created = json.loads(guide.run(
            "curl -s -X POST -H \"Authorization: Bearer $ADMIN\" -H 'Content-Type: application/json' "
            "-d '{\"id\": \"order-1\", \"params\": {\"items\": [{\"sku\": \"A-1\", \"price\": 12.5}]}}' "
            "$API/v1/tenants/acme/instances", env=http_env))
        assert created.get("id") == "order-1", created
        sent = json.loads(guide.run(
            "curl -s -X POST -H \"Authorization: Bearer $ADMIN\" -H 'Content-Type: application/json' "
            "-d '{\"type\": \"approval\", \"payload\": {\"by\": \"ann\"}}' "
            "$API/v1/tenants/acme/instances/order-1/events", env=http_env))
        assert "detail" not in sent, sent
        status = poll_json(guide, "curl -s -H \"Authorization: Bearer $ADMIN\" "
                           "$API/v1/tenants/acme/instances/order-1",
                           lambda s: isinstance(s, dict) and s.get("status") in
                           ("complete", "errored", "terminated"), "order-1 did not end", env=http_env)
        assert status["status"] == "complete", status
        assert status["output"]["approved_by"] == "ann"
        assert status["output"]["receipt"] == {"charged": 12.5, "attempts": 1}

        # With the CLI, on a node of the cluster.
        version = guide.run("dynwf push acme tenants/acme", env=node).strip()
        assert re.fullmatch(r"pushed acme v-[0-9a-f]{32} \(.*\)", version), version
        guide.run("dynwf trigger acme --id order-2 --params "
                  "'{\"items\": [{\"sku\": \"A-1\", \"price\": 12.5}]}'", env=node)
        guide.run("dynwf send-event order-2 approval '{\"by\": \"ann\"}'", env=node)
        deadline = time.monotonic() + 120
        while not re.search(r"^status\s+complete$", described := guide.run(
                "dynwf describe order-2", env=node), re.M):
            assert time.monotonic() < deadline, f"order-2 did not complete:\n{described}"
            time.sleep(0.5)
        assert "ship" in described and "manager approval" in described, described
        journal = Journal(pg_database_url)
        try:
            assert len(journal.live_sessions()) == 1  # the job's engine

            # Stopping: the server and its engine.
            t = time.monotonic()
            guide.run("ray job stop --address http://HEAD:8265 $ID", env=job)
            logs = guide.run("ray job logs --address http://HEAD:8265 --follow $ID", env=job)
            timings["job_stop_s"] = round(time.monotonic() - t, 1)
            assert journal.live_sessions() == [], "ray job stop left the engine's session open"

            # A detached engine started by a Ray job, and a webhook server that joins it.
            t = time.monotonic()
            started = guide.run("ray job submit --address http://HEAD:8265 --working-dir "
                                "cluster/platform -- python engine.py start", env=node)
            assert "engine 'default' runs" in started, started
            assert len(journal.live_sessions()) == 1  # the job ended, the engine did not
            webhook = guide.start("python cluster/platform/webhook.py --port 8080", "",
                                  work / "webhook.log", node, ready="webhook server for tenant 'acme'")
            order = guide.run(
                "ORDER=$(curl -s -X POST -d '{\"items\": [{\"sku\": \"A-1\", \"price\": 12.5}]}' "
                "http://127.0.0.1:8080/orders | python -c 'import json, sys; "
                "print(json.load(sys.stdin)[\"id\"])')", after="; echo $ORDER").strip()
            assert order.startswith("order-"), order
            sent = json.loads(guide.run("curl -s -X POST -d '{\"by\": \"ann\"}' "
                                        "http://127.0.0.1:8080/orders/$ORDER/approval",
                                        env={"ORDER": order}))
            assert sent == {"sent": True}, sent
            status = poll_json(guide, "curl -s http://127.0.0.1:8080/orders/$ORDER",
                               lambda s: isinstance(s, dict) and s.get("status") in
                               ("complete", "errored", "terminated"), f"{order} did not end",
                               env={"ORDER": order})
            assert status["status"] == "complete" and status["output"]["approved_by"] == "ann", status
            timings["detached_engine_order_s"] = round(time.monotonic() - t, 1)
            guide.say("kill %1")  # the guide's shell job: here, the process by its pid
            webhook.terminate()
            webhook.wait(30)
            assert len(journal.live_sessions()) == 1  # the webhook only joined
            stopped = guide.run("ray job submit --address http://HEAD:8265 --working-dir "
                                "cluster/platform -- python engine.py stop", env=node)
            assert "engine stopped" in stopped, stopped
            assert journal.live_sessions() == [], "engine.py stop left the engine's session open"
        finally:
            journal.close()
        assert f"serving the HTTP API and dashboard at http://127.0.0.1:{http}/" in logs, logs[-3000:]
        password = sqlalchemy.make_url(pg_database_url).password
        assert password and f":{password}@" not in logs and ":***@" in logs  # the journal, without it
    finally:
        guide.stop_all()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    timings["total_s"] = round(time.monotonic() - t0, 1)
    print(f"\ncluster guide: {json.dumps(timings)}")
