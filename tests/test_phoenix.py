"""Integration: a tenant's spans exported to a real OTLP backend, Arize Phoenix, and read
back through Phoenix's own REST API.

Phoenix runs from its own virtualenv (`./dev test` installs it into `.venv-phoenix`;
`DYNWF_PHOENIX_BIN` may point at another `phoenix` executable). Without it the test
is skipped, saying why, unless `DYNWF_REQUIRE_PHOENIX=1` (set by `./dev test`), which
turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from dynwf_ray.tracing import parse_traceparent

from .conftest import wait_until
from .test_telemetry import run_observed
from .workflows import Observed

ROOT = Path(__file__).resolve().parent.parent


def _phoenix_bin() -> str | None:
    path = os.environ.get("DYNWF_PHOENIX_BIN") or str(ROOT / ".venv-phoenix" / "bin" / "phoenix")
    return path if os.access(path, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory):
    binary = _phoenix_bin()
    if binary is None:
        reason = "Arize Phoenix is not installed (./dev test installs it into .venv-phoenix)"
        if os.environ.get("DYNWF_REQUIRE_PHOENIX") == "1":
            pytest.fail(reason + ", and DYNWF_REQUIRE_PHOENIX=1")
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("phoenix")
    port = _free_port()
    env = dict(
        os.environ,
        PHOENIX_WORKING_DIR=str(workdir), PHOENIX_HOST="127.0.0.1", PHOENIX_PORT=str(port),
        PHOENIX_GRPC_PORT=str(_free_port()), PHOENIX_TELEMETRY_ENABLED="false",
        PHOENIX_ALLOW_EXTERNAL_RESOURCES="false",
    )
    log = open(workdir / "server.log", "wb")
    proc = subprocess.Popen(
        [binary, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"phoenix exited; see {workdir / 'server.log'}"
        try:
            return urllib.request.urlopen(base + "/readyz", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(ready, timeout=180, what="Phoenix to answer /readyz")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_spans_reach_phoenix_and_read_back_through_its_api(make_engine, phoenix):
    engine = make_engine(telemetry_env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    tenant = f"t{uuid.uuid4().hex[:8]}"
    engine.register(tenant, Observed)
    # Phoenix files spans under the project named by this resource attribute.
    engine.set_tenant_telemetry(
        tenant, endpoint=phoenix, service_name=f"svc-{tenant}",
        resource_attributes={"openinference.project.name": tenant},
    )
    run_observed(engine, tenant, "order-1")
    info = engine.journal.get_instance(tenant, "order-1")
    root = parse_traceparent(info.trace_context)
    trace_id, root_id = f"{root.trace_id:032x}", f"{root.span_id:016x}"
    url = f"{phoenix}/v1/projects/{tenant}/spans?trace_id={trace_id}&limit=100"

    def spans() -> list[dict] | None:
        try:
            data = _get(url)["data"]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # the project appears with its first span
                return None
            raise
        return data if any(s["context"]["span_id"] == root_id for s in data) else None

    got = wait_until(spans, timeout=60, what="the instance's root span in Phoenix")
    by_id = {s["context"]["span_id"]: s for s in got}
    assert {s["context"]["trace_id"] for s in got} == {trace_id}
    assert by_id[root_id]["name"] == f"workflow {tenant}"
    assert by_id[root_id]["parent_id"] is None
    assert by_id[root_id]["attributes"]["dynwf.instance.status"] == "complete"
    assert by_id[root_id]["attributes"]["dynwf.instance.id"] == "order-1"
    activations = [s for s in got if s["name"] == "activation"]
    assert len(activations) >= 2 and all(s["parent_id"] == root_id for s in activations)
    steps = sorted(
        (s for s in got if s["name"].startswith("step ")),
        key=lambda s: datetime.fromisoformat(s["start_time"]),
    )
    assert [s["name"] for s in steps] == ["step pid before", "step charge", "step charge", "step pid after"]
    assert all(by_id[s["parent_id"]]["name"] == "activation" for s in steps)
    assert [s["attributes"]["dynwf.step.attempt"] for s in steps] == [1, 1, 2, 1]
    assert steps[1]["status_code"] == "ERROR" and steps[2]["status_code"] in ("OK", "UNSET")
    assert steps[1]["events"][0]["attributes"]["exception.type"] == "RuntimeError"
    wait = next(s for s in got if s["name"] == "wait_for_event approval")
    assert wait["parent_id"] == root_id
