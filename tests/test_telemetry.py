"""Telemetry on the running engine: per-tenant OTLP routing, one trace across host
processes, captured logs through the API and the CLI, and Prometheus metrics.

Spans travel as real OTLP/HTTP to two receivers on loopback (`OtlpReceiver`),
one per tenant, set with `Engine.set_tenant_telemetry`.
"""

from __future__ import annotations

import threading
import urllib.request
import uuid

import pytest
from opentelemetry.sdk.trace import TracerProvider

from dynwf_ray.cli import main as cli
from dynwf_ray.tracing import parse_traceparent

from .conftest import wait_status, wait_until
from .test_tenants import write_tenant
from .otlp_receiver import OtlpReceiver
from .workflows import Observed


@pytest.fixture(scope="module")
def receivers():
    pair = OtlpReceiver(), OtlpReceiver()
    yield pair
    for r in pair:
        r.close()


@pytest.fixture(scope="module")
def observed(make_engine, receivers):
    """An engine with Prometheus metrics and two tenants, each tracing to its own receiver."""
    engine = make_engine(metrics_port=0, telemetry_env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    tenants = [f"t{uuid.uuid4().hex[:8]}" for _ in receivers]
    for tenant, receiver in zip(tenants, receivers):
        engine.register(tenant, Observed)
        engine.set_tenant_telemetry(tenant, endpoint=receiver.endpoint, service_name=f"svc-{tenant}")
    return engine, tenants


def _tenant_hosts(engine, tenant) -> int:
    return engine.stats()["hosts_by_tenant"].get(tenant, 0)


def run_observed(engine, tenant, instance_id, caller=None):
    """Create an Observed instance, let its host be deactivated while it waits, approve it."""
    binding = engine.binding(tenant)
    if caller is not None:
        with caller.start_as_current_span("POST /approvals"):
            handle = binding.create(id=instance_id)
    else:
        handle = binding.create(id=instance_id)
    wait_until(
        lambda: engine.journal.get_instance(tenant, instance_id).waiting_for == "approval",
        what="the instance waits for its approval",
    )
    wait_until(lambda: _tenant_hosts(engine, tenant) == 0, what="the idle host is deactivated")
    handle.send_event("approval", {"by": "ops"})
    return wait_status(handle, "complete")


def test_each_tenant_endpoint_gets_one_trace_per_instance_and_only_its_own(observed, receivers):
    engine, tenants = observed
    caller = TracerProvider().get_tracer("platform")
    outputs = {t: run_observed(engine, t, "trip", caller if t == tenants[0] else None) for t in tenants}
    for tenant, receiver in zip(tenants, receivers):
        info = engine.journal.get_instance(tenant, "trip")
        trace_id = f"{parse_traceparent(info.trace_context).trace_id:032x}"
        root_id = f"{parse_traceparent(info.trace_context).span_id:016x}"
        wait_until(
            lambda: any(s.span_id == root_id for s in receiver.received()),
            what=f"the root span of {tenant}'s instance at its receiver",
        )
        spans = receiver.received()
        # Only this tenant's spans, under its own service name.
        assert {s.resource["dynwf.tenant.id"] for s in spans} == {tenant}
        assert {s.resource["dynwf.code.version"] for s in spans} == {info.code_version}
        assert {s.resource["service.name"] for s in spans} == {f"svc-{tenant}"}
        assert {s.trace_id for s in spans} == {trace_id}
        root = next(s for s in spans if s.span_id == root_id)
        assert root.attributes["dynwf.instance.status"] == "complete"
        activations = [s for s in spans if s.name == "activation"]
        assert len(activations) >= 2 and all(s.parent_span_id == root_id for s in activations)
        # Activated by two hosts (the first was deactivated in between, run_observed
        # waited for it), in two sandboxes; hosts of any tenant share host processes,
        # so the pid may be the same.
        out = outputs[tenant]["output"]
        assert out["before"] != out["after"]
        by_id = {s.span_id: s for s in spans}
        steps = sorted((s for s in spans if s.name.startswith("step ")), key=lambda s: s.start_ns)
        assert [(s.name, s.attributes["dynwf.step.attempt"]) for s in steps] == [
            ("step pid before", 1), ("step charge", 1), ("step charge", 2), ("step pid after", 1),
        ]
        assert all(by_id[s.parent_span_id].name == "activation" for s in steps)
        assert steps[1].status_code == 2  # the failed attempt is an error
        wait = next(s for s in spans if s.name == "wait_for_event approval")
        assert wait.parent_span_id == root_id
        assert steps[2].end_ns <= wait.start_ns < wait.end_ns <= steps[3].start_ns
    # The platform's request span is the parent of the first tenant's instance.
    first = engine.journal.get_instance(tenants[0], "trip")
    caller_ctx = parse_traceparent(first.trace_caller)
    root = next(s for s in receivers[0].received() if s.name.startswith("workflow "))
    assert root.parent_span_id == f"{caller_ctx.span_id:016x}"
    assert engine.journal.get_instance(tenants[1], "trip").trace_caller is None


PUSHED = """
from opentelemetry import trace
from dynwf_ray import WorkflowEntrypoint

class Pushed(WorkflowEntrypoint):
    async def run(self, event, step):
        def nested():
            with trace.get_tracer("tenant").start_as_current_span("tenant work"):
                return 42
        return await step.do("answer", nested)
"""


def test_a_pushed_tenant_routes_its_spans_with_its_own_manifest(observed, receivers, tmp_path):
    """OTEL_* in a tenant's dynwf.toml route the spans of its hosts (in its runtime env),
    and spans its code makes with the OpenTelemetry API nest under the step."""
    engine, _ = observed
    own = OtlpReceiver()
    try:
        tenant = f"t{uuid.uuid4().hex[:8]}"
        directory = write_tenant(
            tmp_path, tenant, PUSHED,
            f'''
            [env]
            OTEL_EXPORTER_OTLP_ENDPOINT = "{own.endpoint}"
            OTEL_SERVICE_NAME = "its-own"
            ''',
        )
        engine.push_tenant(tenant, str(directory))
        handle = engine.binding(tenant).create(id="q")
        assert wait_status(handle, "complete")["output"] == 42
        root_id = engine.journal.get_instance(tenant, "q").trace_context.split("-")[2]
        wait_until(lambda: any(s.span_id == root_id for s in own.received()), what="the root span")
        spans = {s.name: s for s in own.received()}
        assert {s.resource["service.name"] for s in spans.values()} == {"its-own"}
        assert spans["tenant work"].parent_span_id == spans["step answer"].span_id
        assert spans["step answer"].parent_span_id == spans["activation"].span_id
        for other in receivers:  # nothing of this tenant anywhere else
            assert all(s.resource.get("dynwf.tenant.id") != tenant for s in other.received())
    finally:
        own.close()


def test_logs_through_the_api_and_the_cli(observed, capsys):
    engine, tenants = observed
    tenant = tenants[0]
    run_observed(engine, tenant, "chatty")
    handle = engine.binding(tenant).get("chatty")
    lines = handle.logs()
    messages = [(line.stream, line.step, line.attempt, line.message) for line in lines]
    assert ("stdout", "charge", 1, "charging, attempt 1") in messages
    assert ("WARNING", "charge", 1, "tests.workflows: card declined") in messages
    assert ("stdout", None, None, "approved by ops") in messages
    assert all(line.trace_id and line.span_id for line in lines)

    def printed() -> list[str]:  # our lines (Ray also forwards its workers' output here)
        return [line for line in capsys.readouterr().out.splitlines() if line[:4].isdigit()]

    assert cli(["logs", "chatty", "--tenant", tenant, "--database-url", engine.config.database_url]) == 0
    out = printed()
    assert len(out) == len(lines)
    assert any("charge#1 attempt 2  charging, attempt 2" in line for line in out)
    assert out[-1].endswith("run()  approved by ops")
    # -f on a finished instance prints what there is and returns.
    assert cli(["logs", "chatty", "-f", "--tenant", tenant, "--database-url", engine.config.database_url]) == 0
    assert printed() == out


def test_cli_follows_logs_until_the_instance_finishes(observed, capsys):
    engine, tenants = observed
    tenant = tenants[1]
    handle = engine.binding(tenant).create(id="followed")
    wait_until(lambda: engine.journal.get_instance(tenant, "followed").waiting_for == "approval")
    done: list[int] = []
    argv = ["logs", "followed", "-f", "--interval", "0.1", "--tenant", tenant,
            "--database-url", engine.config.database_url]
    follower = threading.Thread(target=lambda: done.append(cli(argv)), daemon=True)
    follower.start()
    wait_until(lambda: "charging, attempt 2" in capsys.readouterr().out or None, what="the lines so far")
    assert follower.is_alive()  # the instance waits: -f keeps following
    handle.send_event("approval", {"by": "cli"})
    follower.join(timeout=60)
    assert done == [0]
    assert any(line.endswith("run()  approved by cli") for line in capsys.readouterr().out.splitlines())


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_prometheus_endpoint_has_per_tenant_metrics(observed):
    engine, tenants = observed
    tenant = tenants[1]
    run_observed(engine, tenant, "counted")
    run_observed(engine, tenant, "counted-again")  # so the test needs no other test before it
    run_observed(engine, tenants[0], "counted-other")
    sleeper = engine.binding(tenant).create(id="asleep")  # waits for an approval that never comes
    wait_status(sleeper, "waiting")
    url = engine.stats()["metrics_url"]
    assert url and url.startswith("http://127.0.0.1:")
    label = f'dynwf_tenant_id="{tenant}"'

    def metric(name: str, *labels: str) -> float:
        return sum(
            v for k, v in _scrape(url).items()
            if k.startswith(name + "{") and label in k and all(l in k for l in labels)
        )

    # This tenant ran at least these two to the end: 4 attempts and 1 retry each. (Hosts
    # report their counts to the scheduler about every second.)
    wait_until(lambda: metric("dynwf_steps_started_total") >= 8, what="the counts reported")
    assert metric("dynwf_steps_completed_total") >= 6
    assert metric("dynwf_step_retries_total") >= 2
    assert metric("dynwf_activations_total", 'dynwf_activation_warm="false"') >= 2
    assert metric("dynwf_activation_latency_seconds_count") >= 4
    wait_until(lambda: metric("dynwf_instances_hibernated") == 1, what="one hibernated instance")
    assert metric("dynwf_hosts_started_total", 'dynwf_host_reason="first host of its code"') >= 1
    other = f'dynwf_tenant_id="{tenants[0]}"'
    assert any(other in k for k in _scrape(url))  # both tenants, told apart
    sleeper.terminate()
