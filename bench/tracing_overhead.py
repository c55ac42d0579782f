"""What tracing and log capture add to a trivial `step.do` (durable commit per step).

A workflow of N trivial steps is activated in this process (journal, replay,
telemetry hooks; no Ray), once per mode, the modes interleaved run after run
so that drift hits them alike. Modes:
- `off`: no tracing, no log capture (the bare step path);
- `off_capture`: log capture on, tracing off: what a host does when no
  exporter is configured;
- `memory`: spans to an in-memory exporter through a batching processor;
- `otlp`: spans over OTLP/HTTP (protobuf, batched) to a receiver in another
  process on loopback (`tests/otlp_receiver.py`), which decodes every span after
  the runs (a collector's CPU is not the engine's); or,
  with `--otlp-endpoint URL`, to that endpoint (e.g. a local Arize Phoenix).

Figures: median ms per step of each mode, and each mode's median ratio to
`off` (target: tracing adds at most 10 %, i.e. ratio <= 1.10).

Usage: python bench/tracing_overhead.py [--steps 2000] [--runs 7] [--database-url URL]
                                        [--otlp-endpoint URL]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from bench._common import arg, database_url, emit  # noqa: E402
from bench.workflows import trivial_steps_in_process  # noqa: E402
from dynwf_ray.journal import Journal  # noqa: E402
from dynwf_ray.logs import LogCapture  # noqa: E402
from dynwf_ray.tracing import Tracing, tracing_for  # noqa: E402

RECEIVER = """
import sys, time
from tests.otlp_receiver import OtlpReceiver
r = OtlpReceiver(decode_later=True)  # decodes after the runs, off the clock
print(r.endpoint, flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
print(len(r.received()), flush=True)
"""


def run_once(journal: Journal, steps: int, tag: str, **options) -> float:
    return trivial_steps_in_process(journal, steps, f"b-{tag}", **options)


def main() -> None:
    steps = arg("--steps", 2000)
    runs = arg("--runs", 7)
    journal = Journal(database_url())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    endpoint = arg("--otlp-endpoint", None, str)
    receiver = None
    if endpoint is None:
        receiver = subprocess.Popen(
            [sys.executable, "-c", RECEIVER], cwd=root, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )
        endpoint = receiver.stdout.readline().strip()
    memory = InMemorySpanExporter()
    in_memory = Tracing([BatchSpanProcessor(memory)])
    otlp = tracing_for({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}, "bench")
    capture = LogCapture().install()
    modes = {
        "off": {},
        "off_capture": {"capture_logs": True},
        "memory": {"tracing": in_memory, "capture_logs": True},
        "otlp": {"tracing": otlp, "capture_logs": True},
    }
    results: dict[str, list[float]] = {m: [] for m in modes}
    try:
        run_once(journal, 200, "warmup")
        for r in range(runs):
            for mode, options in modes.items():
                results[mode].append(run_once(journal, steps, f"{mode}-{r}", **options))
                if "tracing" in options:
                    options["tracing"].flush(30)
    finally:
        capture.uninstall()
        received = None
        if receiver is not None:
            receiver.stdin.close()
            received = int(receiver.stdout.readline() or 0)
            receiver.wait(30)
    ms = {m: statistics.median(v) * 1000 for m, v in results.items()}
    ratio = {
        m: round(statistics.median(a / b for a, b in zip(results[m], results["off"])), 3)
        for m in modes
    }
    expected_spans = runs * (steps + 2)  # steps, the activation, the root
    emit("tracing_overhead", {
        "journal": journal.url.split(":")[0],
        "steps_per_run": steps,
        "runs": runs,
        "ms_per_step": {m: round(v, 4) for m, v in ms.items()},
        "ratio_to_off": ratio,
        "added_ms_per_step": {m: round(v - ms["off"], 4) for m, v in ms.items()},
        "otlp_endpoint": "loopback receiver process" if receiver is not None else endpoint,
        "otlp_spans_received": received,
        "otlp_spans_expected": expected_spans,
        "memory_spans": len(memory.get_finished_spans()),
        "target_ratio": 1.10,
    })


if __name__ == "__main__":
    main()
