"""Metrics: per-tenant counters and gauges as OpenTelemetry metrics, with a Prometheus endpoint.

Hosts count what their activations did in an `ActivityCounts` and report it
to the scheduler about every second; the scheduler's `EngineMetrics` adds the counts to
OpenTelemetry instruments labelled with the tenant, and observes the gauges
when a reader collects: live hosts per tenant (the scheduler's),
queued and hibernated instances per tenant (from the journal).

Readers: a Prometheus endpoint when `EngineConfig.metrics_port` is set (0
picks a free port; `engine.stats()["metrics_url"]` says which), and OTLP
export when the platform's settings ask for it: `OTEL_METRICS_EXPORTER=otlp` or
`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` (to `OTEL_EXPORTER_OTLP_ENDPOINT` +
`/v1/metrics` unless the latter is set). Unlike the SDK's default, an OTLP
endpoint alone does not turn metrics export on: many tracing backends (Phoenix,
for one) accept no metrics and would answer every export with an error.

Instruments (every one has the attribute `dynwf.tenant.id`; Prometheus names
in brackets):
- `dynwf.steps.started`, `.completed`, `.failed` [dynwf_steps_*_total]: step
  attempts begun, steps completed, steps failed for good;
- `dynwf.step.retries` [dynwf_step_retries_total]: failed attempts that will be retried;
- `dynwf.activations` [dynwf_activations_total], attribute `dynwf.activation.warm`;
- `dynwf.activation.latency` [dynwf_activation_latency_seconds]: from the
  moment an instance was due to its activation running;
- `dynwf.hosts.started`, `dynwf.hosts.stopped` [dynwf_hosts_*_total], attribute
  `dynwf.host.reason`: hosts started and stopped by the pool (`pool.py`)
  and why (`stopped` with reason "died" when one died);
- `dynwf.hosts.live`, `dynwf.instances.queued`, `dynwf.instances.hibernated`
  (waiting on a timer or an event, no process), `dynwf.instances.paused`: gauges;
- `dynwf.instances.blocked` [dynwf_instances_blocked]: gauge of instances whose
  activation a journal fault interrupted, waiting for the journal to work again.

And for the engine as a whole (no tenant):
- `dynwf.journal.write_failures` [dynwf_journal_write_failures_total], attribute
  `dynwf.journal.cause` ("disk full", "read-only", "unreachable"...): journal
  transactions that failed because the journal could not be used;
- `dynwf.journal.available` [dynwf_journal_available]: 1 while journal writes
  work, 0 while they fail (`Engine.health()`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from .errors import JournalUnavailableError
from .types import InstanceStatus

log = logging.getLogger("dynwf_ray.metrics")

TENANT = "dynwf.tenant.id"
_COUNTS_FRESH = 1.0  # seconds a count of instances serves the gauges
_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


@dataclass
class ActivityCounts:
    """What activations in one host did (filled by `Step` and the host, read by the scheduler)."""

    steps_started: int = 0
    steps_completed: int = 0
    steps_failed: int = 0
    retries: int = 0
    warm: int = 0
    cold: int = 0
    latencies: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EngineMetrics:
    """The scheduler's instruments and readers."""

    def __init__(
        self,
        otel_env: Mapping[str, str],
        port: int | None,
        host: str,
        hosts_by_tenant: Callable[[], Mapping[str, int]],
        instances_by_tenant: Callable[[], Mapping[tuple[str, str], int]],
        blocked_by_tenant: Callable[[], Mapping[str, int]] = dict,
        journal_available: Callable[[], bool] = lambda: True,
    ):
        from opentelemetry.metrics import Observation
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource

        self._observation = Observation
        self._hosts_by_tenant = hosts_by_tenant
        self._instances_by_tenant = instances_by_tenant
        self._counted: Mapping[tuple[str, str], int] = {}
        self._counted_at = float("-inf")
        self.url: str | None = None
        readers = []
        if port is not None:
            readers.append(self._prometheus(port, host))
        otlp = self._otlp_reader(otel_env)
        if otlp is not None:
            readers.append(otlp)
        service = otel_env.get("OTEL_SERVICE_NAME", "dynwf")
        self.provider = MeterProvider(
            metric_readers=readers, resource=Resource.create({"service.name": service})
        )
        meter = self.provider.get_meter("dynwf_ray")
        self._started = meter.create_counter("dynwf.steps.started", "{step}", "Step attempts begun")
        self._completed = meter.create_counter("dynwf.steps.completed", "{step}", "Steps completed")
        self._failed = meter.create_counter("dynwf.steps.failed", "{step}", "Steps failed for good")
        self._retries = meter.create_counter("dynwf.step.retries", "{attempt}", "Failed attempts to be retried")
        self._activations = meter.create_counter("dynwf.activations", "{activation}", "Activations")
        self._latency = meter.create_histogram(
            "dynwf.activation.latency", "s", "From an instance being due to its activation running",
            explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS,
        )
        self._host_changes = {
            kind: meter.create_counter(f"dynwf.hosts.{kind}", "{host}", f"Hosts {kind}, by reason")
            for kind in ("started", "stopped")
        }
        meter.create_observable_gauge("dynwf.hosts.live", [self._hosts], "{host}", "Live hosts")
        self._blocked_by_tenant = blocked_by_tenant
        meter.create_observable_gauge(
            "dynwf.instances.blocked", [self._blocked], "{instance}",
            "Instances whose activation waits for the journal to work again",
        )
        self._journal_failures = meter.create_counter(
            "dynwf.journal.write_failures", "{transaction}",
            "Journal transactions that failed because the journal could not be used, by cause",
        )
        meter.create_observable_gauge(
            "dynwf.journal.available",
            [lambda _o: [self._observation(1 if journal_available() else 0)]],
            "1", "1 while journal writes work, 0 while they fail",
        )
        for status, name in (
            (InstanceStatus.queued, "queued"), (InstanceStatus.waiting, "hibernated"),
            (InstanceStatus.paused, "paused"),
        ):
            meter.create_observable_gauge(
                f"dynwf.instances.{name}", [self._instances(status)], "{instance}",
                f"Instances {name} (status {status!r})",
            )

    def record(self, tenant_id: str, activity: "ActivityCounts") -> None:
        """Add what a host's activations of a tenant did (`ActivityCounts`)."""
        counts = activity.as_dict()
        attrs = {TENANT: tenant_id}
        for key, counter in (
            ("steps_started", self._started), ("steps_completed", self._completed),
            ("steps_failed", self._failed), ("retries", self._retries),
        ):
            if counts.get(key):
                counter.add(counts[key], attrs)
        if counts.get("warm"):
            self._activations.add(counts["warm"], {**attrs, "dynwf.activation.warm": True})
        if counts.get("cold"):
            self._activations.add(counts["cold"], {**attrs, "dynwf.activation.warm": False})
        for latency in counts.get("latencies", ()):
            self._latency.record(max(latency, 0.0), attrs)

    def journal_failures(self, cause: str, n: int) -> None:
        """`n` more journal transactions failed for `cause`."""
        self._journal_failures.add(n, {"dynwf.journal.cause": cause})

    def host_change(self, kind: str, tenant_id: str, reason: str) -> None:
        """A host was "started" or "stopped" (by the pool, or it "died") for a reason."""
        self._host_changes[kind].add(1, {TENANT: tenant_id, "dynwf.host.reason": reason})

    def shutdown(self) -> None:
        self.provider.shutdown()
        if self._server is not None:
            self._server.shutdown()

    # -- readers and gauges -------------------------------------------------------

    _server: Any = None

    def _prometheus(self, port: int, host: str) -> Any:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry)
        try:
            self._server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:  # e.g. the port is taken: run on, without the endpoint
            log.error("cannot serve Prometheus metrics on %s:%s: %s", host, port, exc)
        else:
            self.url = f"http://{host}:{self._server.server_port}/metrics"
        return reader

    @staticmethod
    def _otlp_reader(env: Mapping[str, str]) -> Any:
        names = env.get("OTEL_METRICS_EXPORTER", "")
        endpoint = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or names == "none":
            return None
        if "otlp" not in names.split(",") and not endpoint:
            return None
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from .tracing import parse_pairs

        url = endpoint or (base or "http://localhost:4318").rstrip("/") + "/v1/metrics"
        headers = parse_pairs(env.get("OTEL_EXPORTER_OTLP_HEADERS"))
        return PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=url, headers=headers or None))

    def _hosts(self, _options: Any) -> list[Any]:
        try:
            return [self._observation(n, {TENANT: t}) for t, n in self._hosts_by_tenant().items()]
        except Exception:  # noqa: BLE001 - a scrape must not fail because the loader is busy
            log.exception("could not read live hosts")
            return []

    def _blocked(self, _options: Any) -> list[Any]:
        return [self._observation(n, {TENANT: t}) for t, n in self._blocked_by_tenant().items()]

    def _counts(self) -> Mapping[tuple[str, str], int]:
        """Instances per (tenant, status): one journal query serves the gauges of one
        collection (they are observed one after the other)."""
        now = time.monotonic()
        if now - self._counted_at > _COUNTS_FRESH:
            self._counted = self._instances_by_tenant()
            self._counted_at = now
        return self._counted

    def _instances(self, status: str) -> Callable[[Any], list[Any]]:
        def observe(_options: Any) -> list[Any]:
            try:
                counts = self._counts()
            except JournalUnavailableError:  # the journal's health says so, once
                return []
            except Exception:  # noqa: BLE001 - a scrape must not fail
                log.exception("could not count instances")
                return []
            return [self._observation(n, {TENANT: t}) for (t, s), n in counts.items() if s == status]

        return observe
