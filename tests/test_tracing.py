"""Tracing and log capture of activations, in-process with a fake clock and an in-memory exporter.

Each activation here is a fresh `Step` and workflow object built from the
journal alone (as in a new host actor): what joins the spans of different
activations into one trace is only what the journal carries.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from dynwf_ray import InvalidInputError, WorkflowEntrypoint
from dynwf_ray.binding import WorkflowBinding
from dynwf_ray.logs import MAX_LINE_CHARS, LogCapture
from dynwf_ray.tracing import (
    TenantTelemetry,
    Tracing,
    merge_otel_env,
    new_trace_context,
    otel_environ,
    parse_pairs,
    parse_traceparent,
    tenant_telemetry,
    trace_id_of,
    tracing_for,
)

from .driver import Driver
from .otlp_receiver import OtlpReceiver

FAILS_ONCE: dict[str, int] = {}


class Journey(WorkflowEntrypoint):
    """A step, a sleep, a step, an event wait, then a step that fails once."""

    async def run(self, event, step):
        a = await step.do("a", lambda: 1)
        await step.sleep("nap", 10)
        b = await step.do("b", lambda: 2)
        got = await step.wait_for_event("approval", type="approval", timeout="1 hour")

        def flaky():
            FAILS_ONCE[event.instance_id] = FAILS_ONCE.get(event.instance_id, 0) + 1
            if FAILS_ONCE[event.instance_id] == 1:
                raise RuntimeError("first attempt fails")
            return 3

        c = await step.do("c", flaky, retries={"limit": 2, "delay": 5, "backoff": "constant"})
        return a + b + c + got.payload["n"]


@pytest.fixture
def exporter():
    return InMemorySpanExporter()


def test_one_trace_across_hibernations_with_parentage_in_order(journal, tenant, exporter):
    FAILS_ONCE.clear()  # the same instance id runs on each backend
    tracing = Tracing([SimpleSpanProcessor(exporter)])
    d = Driver(journal, tenant, Journey, tracing=tracing)
    caller_tracer = tracing.provider.get_tracer("platform")
    with caller_tracer.start_as_current_span("POST /orders") as request:
        d.binding.create(id="j1")
    caller = request.get_span_context()

    assert d.tick() == ["suspended"]  # a, then the sleep
    d.now += 10
    assert d.tick() == ["suspended"]  # the sleep is over, b, then the wait
    d.binding.get("j1").send_event("approval", {"n": 4})
    d.now += 1
    assert d.tick() == ["suspended"]  # the event is taken; c's first attempt fails
    d.now += 5
    assert d.tick() == ["complete"]
    assert d.info("j1").output_json == "10"

    spans = [s for s in exporter.get_finished_spans() if s.name != "POST /orders"]
    assert {s.context.trace_id for s in spans} == {caller.trace_id}
    root = next(s for s in spans if s.name == f"workflow {tenant}")
    assert root.parent.span_id == caller.span_id  # the platform's request span
    assert root.context.span_id == parse_traceparent(d.info("j1").trace_context).span_id
    assert root.attributes["dynwf.instance.status"] == "complete"
    assert root.start_time == int(1_000_000.0 * 1e9) and root.end_time == int(d.now * 1e9)

    activations = sorted((s for s in spans if s.name == "activation"), key=lambda s: s.start_time)
    assert [s.attributes["dynwf.activation.outcome"] for s in activations] == [
        "suspended", "suspended", "suspended", "complete",
    ]
    assert all(s.parent.span_id == root.context.span_id for s in activations)

    steps = sorted((s for s in spans if s.name.startswith("step ")), key=lambda s: s.start_time)
    assert [(s.name, s.attributes["dynwf.step.attempt"]) for s in steps] == [
        ("step a", 1), ("step b", 1), ("step c", 1), ("step c", 2),
    ]
    owner = [0, 1, 2, 3]  # which activation ran each attempt
    for span, i in zip(steps, owner):
        assert span.parent.span_id == activations[i].context.span_id
        assert span.attributes["dynwf.instance.id"] == "j1"
        assert span.attributes["dynwf.step.count"] == 1
    for span in [root, *activations]:  # tenant and version: here, and in a host's resource
        assert span.attributes["dynwf.tenant.id"] == tenant
        assert span.attributes["dynwf.code.version"] == "v1"
    failed = steps[2]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["dynwf.step.will_retry"] is True
    assert [e.name for e in failed.events] == ["exception"]
    assert steps[3].status.status_code is StatusCode.UNSET

    sleep = next(s for s in spans if s.name == "sleep nap")
    wait = next(s for s in spans if s.name == "wait_for_event approval")
    for span in (sleep, wait):  # they straddle hibernation: children of the root
        assert span.parent.span_id == root.context.span_id
    assert sleep.end_time - sleep.start_time == int(10 * 1e9)
    assert wait.attributes["dynwf.event.type"] == "approval"
    assert steps[0].end_time <= sleep.start_time < sleep.end_time <= steps[1].start_time
    assert steps[1].end_time <= wait.start_time < wait.end_time <= steps[2].start_time
    assert len(spans) == 1 + 4 + 4 + 2  # nothing replayed was traced again


class TwoSleeps(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep("one", 1)
        await step.sleep("two", 1)
        return "ok"


def test_a_sleep_is_traced_once_however_often_it_is_replayed(journal, tenant, exporter):
    d = Driver(journal, tenant, TwoSleeps, tracing=Tracing([SimpleSpanProcessor(exporter)]))
    d.binding.create(id="s1")
    for _ in range(3):
        d.tick()
        d.now += 1
    assert d.info("s1").status == "complete"
    names = [s.name for s in exporter.get_finished_spans() if s.name.startswith("sleep")]
    assert names == ["sleep one", "sleep two"]
    assert all(s.finished_at is not None for s in d.steps("s1").values())


class Failing(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("boom", _boom, retries={"limit": 0, "delay": 1})


def _boom():
    raise ValueError("no stock")


def test_an_errored_instance_ends_its_trace_with_the_error(journal, tenant, exporter):
    d = Driver(journal, tenant, Failing, tracing=Tracing([SimpleSpanProcessor(exporter)]))
    d.binding.create(id="f1")
    assert d.tick() == ["errored"]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans[f"workflow {tenant}"]
    assert root.parent is None  # created outside any span: a trace of its own
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes["error.type"] == "ValueError"
    assert "no stock" in root.status.description
    assert spans["step boom"].attributes["dynwf.step.will_retry"] is False


def test_terminate_and_restart_end_the_trace_and_restart_begins_a_new_one(journal, tenant):
    receiver = OtlpReceiver()
    try:
        d = Driver(journal, tenant, TwoSleeps)
        # The platform's process: its binding routes root spans with the tenant's settings.
        binding = WorkflowBinding(
            journal, tenant, clock=d.clock, otel_env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        )
        handle = binding.create(id="r1")
        d.tick()
        before = d.info("r1").trace_context
        handle.restart()
        after = d.info("r1").trace_context
        assert parse_traceparent(after).trace_id != parse_traceparent(before).trace_id
        handle.terminate()
        tracing_for({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}).flush()
        ended = [(s.trace_id, s.span_id, s.attributes["dynwf.instance.status"]) for s in receiver.received()]
        assert ended == [
            (trace_id_of(before), before.split("-")[2], "restarted"),
            (trace_id_of(after), after.split("-")[2], "terminated"),
        ]
    finally:
        receiver.close()


def test_a_tenant_endpoint_never_gets_the_platforms_exporter_credentials(monkeypatch):
    """The OTLP exporter adds the headers it finds in its process's environment to those it
    is given. The platform's OTEL_EXPORTER_OTLP_HEADERS are in that environment (a Ray
    worker inherits them), so they went to a tenant's own endpoint: a tenant's dynwf.toml
    could collect the platform's collector token."""
    from dynwf_ray import tracing as tracing_module

    monkeypatch.setattr(tracing_module, "_HIDDEN", {})  # what this test takes out of os.environ
    platform_receiver, tenant_receiver = OtlpReceiver(), OtlpReceiver()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", platform_receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer platform-secret")
        platform = otel_environ()
        tenant = {"OTEL_EXPORTER_OTLP_ENDPOINT": tenant_receiver.endpoint,
                  "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=acme"}
        for env, tenant_id in ((merge_otel_env(platform), "p"), (merge_otel_env(platform, tenant), "acme")):
            tracing = tracing_for(env, tenant_id)
            root = parse_traceparent(new_trace_context()[0])
            tracing.emit(tracing.open("work", root, 1, {}), 2)
            assert tracing.flush()
        assert otel_environ() == platform  # still the platform's layer, though hidden
        assert tenant_receiver.received() and platform_receiver.received()
        assert [h.get("authorization") for h in tenant_receiver.headers] == [None]
        assert [h.get("x-tenant") for h in tenant_receiver.headers] == ["acme"]
        assert [h.get("authorization") for h in platform_receiver.headers] == ["Bearer platform-secret"]
    finally:
        platform_receiver.close()
        tenant_receiver.close()


def test_a_tenant_span_cannot_carry_the_platforms_attributes(exporter):
    """dynwf.* attributes are the platform's (the tenant, the instance, the step): a span
    the tenant makes in its sandbox arrives as data, and those it names are dropped."""
    tracing = Tracing([SimpleSpanProcessor(exporter)], tenant_id="acme")
    tracing.emit_tenant_span({
        "name": "mine", "trace_id": "1" * 32, "span_id": "2" * 16, "start": 1, "end": 2,
        "attributes": {"dynwf.tenant.id": "victim", "dynwf.instance.id": "x", "order": 7},
    }, lambda text: text)
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes) == {"order": 7}
    assert span.resource.attributes["dynwf.tenant.id"] == "acme"


def test_a_tenant_telemetry_setting_that_would_not_survive_its_variables_is_refused():
    """Headers and resource attributes travel as OTEL_* variables, `k1=v1,k2=v2`: a ',' in
    a value split it (`{"x-key": "a,b=c"}` became x-key=a and a header b). An endpoint must
    be an http(s) URL with a host."""
    assert parse_pairs(TenantTelemetry(headers={"authorization": "Basic dXNlcg=="}).env()[
        "OTEL_EXPORTER_OTLP_HEADERS"]) == {"authorization": "Basic dXNlcg=="}
    for bad in (dict(headers={"x-key": "a,b=c"}), dict(resource_attributes={"a=b": "c"}),
                dict(headers={"x": "line\nInjected: 1"}), dict(endpoint="http://"),
                dict(endpoint="https://x\nInjected: 1"), dict(endpoint="ftp://collector")):
        with pytest.raises(InvalidInputError, match="invalid tenant telemetry setting"):
            tenant_telemetry(**bad)


def test_tracing_is_off_without_an_exporter_and_settings_layer_per_tenant():
    assert tracing_for({}, "t") is None
    assert tracing_for({"OTEL_SERVICE_NAME": "x"}, "t") is None
    assert tracing_for({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318", "OTEL_SDK_DISABLED": "true"}, "t") is None
    platform = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://platform:4318/v1/traces",
        "OTEL_EXPORTER_OTLP_HEADERS": "key=platform-secret",
        "OTEL_SERVICE_NAME": "platform",
    }
    tenant_own = {"OTEL_SERVICE_NAME": "acme-workflows"}
    setting = TenantTelemetry(endpoint="http://acme:4318", headers={"key": "acme"}).env()
    merged = merge_otel_env(platform, tenant_own, setting)
    # The tenant's endpoint replaces every endpoint and header of the platform's.
    assert merged == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://acme:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "key=acme",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_SERVICE_NAME": "acme-workflows",
    }
    assert merge_otel_env(platform, TenantTelemetry(enabled=False).env())["OTEL_TRACES_EXPORTER"] == "none"
    assert tracing_for(merge_otel_env(platform, TenantTelemetry(enabled=False).env()), "t") is None
    with pytest.raises(ValueError, match="endpoint 'acme:4318'"):
        TenantTelemetry(endpoint="acme:4318")


# -- logs ---------------------------------------------------------------------------

log = logging.getLogger("tenant.code")


class Chatty(WorkflowEntrypoint):
    async def run(self, event, step):
        print("starting", event.instance_id)

        def work(ctx):
            print(f"working, attempt {ctx.attempt}")
            log.info("via logging")
            if ctx.attempt == 1:
                raise RuntimeError("again")
            return 1

        await step.do("work", work, retries={"limit": 1, "delay": 1, "backoff": "constant"})
        print("x" * (MAX_LINE_CHARS + 10))
        print("done", end="")  # no newline: stored when the activation ends
        return "ok"


@contextmanager
def capturing():
    """Install the capture inside the test body (pytest swaps sys.stdout between phases)."""
    capture = LogCapture().install()
    try:
        yield
    finally:
        capture.uninstall()


def test_output_is_captured_per_step_and_attempt_with_trace_ids(journal, tenant, exporter):
    d = Driver(journal, tenant, Chatty, tracing=Tracing([SimpleSpanProcessor(exporter)]), capture_logs=True)
    handle = d.binding.create(id="c1")
    with capturing():
        d.tick()
        d.now += 1
        d.tick()
    assert d.info("c1").status == "complete"
    lines = handle.logs()
    got = [(line.stream, line.step, line.attempt, line.message[:20]) for line in lines]
    assert got == [
        ("stdout", None, None, "starting c1"),
        ("stdout", "work", 1, "working, attempt 1"),
        ("INFO", "work", 1, "tenant.code: via log"),
        ("stdout", None, None, "starting c1"),  # run() is replayed: it prints again
        ("stdout", "work", 2, "working, attempt 2"),
        ("INFO", "work", 2, "tenant.code: via log"),
        ("stdout", None, None, "x" * 20),
        ("stdout", None, None, "done"),
    ]
    assert lines[6].message.endswith(f"[cut: {MAX_LINE_CHARS + 10} characters]")
    assert [line.id for line in lines] == sorted(line.id for line in lines)
    attempts = {
        s.attributes["dynwf.step.attempt"]: s for s in exporter.get_finished_spans() if s.name == "step work"
    }
    trace_id = f"{parse_traceparent(d.info('c1').trace_context).trace_id:032x}"
    assert {line.trace_id for line in lines} == {trace_id}
    assert lines[1].span_id == f"{attempts[1].context.span_id:016x}"
    assert lines[4].span_id == f"{attempts[2].context.span_id:016x}"
    assert handle.logs(after=lines[5].id) == lines[6:]


def test_logs_keep_only_the_newest_lines_of_an_instance(journal, tenant):
    d = Driver(journal, tenant, Chatty, capture_logs=True, keep_logs=3)
    handle = d.binding.create(id="c2")
    with capturing():
        d.tick()
        d.now += 1
        d.tick()
    lines = handle.logs()
    assert [line.message[:4] for line in lines] == ["tena", "xxxx", "done"]
    assert lines[0].trace_id is not None and lines[0].span_id is None  # tracing off: no spans


def test_code_outside_an_activation_is_not_captured(journal, tenant):
    """Output of the platform's own code (before, during and after an activation, from
    its own thread) is not the instance's, while the activation's own is."""
    d = Driver(journal, tenant, Chatty, capture_logs=True)
    handle = d.binding.create(id="c3")
    stop, printed = threading.Event(), threading.Event()

    def platform_thread():
        while not stop.is_set():
            print("the platform's thread")
            logging.getLogger("platform").warning("the platform's thread logs")
            printed.set()
            stop.wait(0.001)

    with capturing():
        print("the platform's own output")
        logging.getLogger("platform").warning("not a tenant's")
        other = threading.Thread(target=platform_thread)
        other.start()
        try:
            printed.wait(10)
            d.tick()
        finally:
            stop.set()
            other.join()
        print("the platform's output after")
    messages = [line.message for line in handle.logs()]
    assert messages[:2] == ["starting c3", "working, attempt 1"], messages
    assert not [m for m in messages if "platform" in m or "not a tenant" in m], messages
    assert trace.get_current_span().get_span_context().is_valid is False
