"""Helpers shared by the benchmarks: temp journals, percentiles, busy cores, CPU by kind
of process, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence


#: This invocation's mark: its instance ids (and tenants where a count is per tenant) carry
#: it, so runs on a reused `--database-url` never collide with earlier ones.
RUN = f"r{os.getpid():x}{int(time.time()) % 0xFFFFF:x}"


def busy_jiffies() -> tuple[int, float]:
    """(jiffies every CPU spent busy since boot, now): /proc/stat's first line less idle and iowait."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, time.monotonic()


def busy_cores(before: tuple[int, float], after: tuple[int, float]) -> float:
    return (after[0] - before[0]) / os.sysconf("SC_CLK_TCK") / (after[1] - before[1])


def _kind(pid: int, argv: list[str]) -> str:
    if pid == os.getpid():
        return "creating process"
    head = argv[0] if argv else ""
    if head.startswith("ray::HostProcess"):
        return "host processes"
    if head.startswith("ray::Scheduler"):
        return "scheduler"
    if head.startswith("ray::Loader"):
        return "loader"  # with the machine writer, its commits too
    if argv[1:3] == ["-I", "-c"] and "_serve" in (argv[3] if len(argv) > 3 else ""):
        return "sandboxes"  # templates and the sandboxes they fork (sandbox/template.py)
    if head.startswith("postgres"):
        return "postgresql"
    return "other"


def cpu_by_kind() -> dict[int, tuple[str, int]]:
    """Every process's kind and CPU ticks (user + system) so far."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except OSError:  # ended meanwhile
                continue
            out[int(entry)] = (_kind(int(entry), argv), int(fields[11]) + int(fields[12]))
    return out


def cpu_per_workflow(before: dict, after: dict, n: int) -> dict[str, int]:
    """Microseconds of CPU per workflow by kind between two `cpu_by_kind` snapshots
    (a process that ended in between is not counted)."""
    ticks: dict[str, int] = {}
    for pid, (kind, t) in after.items():
        ticks[kind] = ticks.get(kind, 0) + t - before.get(pid, (kind, 0))[1]
    per = {k: round(v / os.sysconf("SC_CLK_TCK") / n * 1e6) for k, v in sorted(ticks.items())}
    return {**per, "all": sum(per.values())}


def temp_sqlite_url() -> str:
    return f"sqlite:///{tempfile.mkdtemp(prefix='dynwf-bench-')}/journal.db"


def database_url(argv: Sequence[str] | None = None) -> str:
    """--database-url URL on the command line, else a fresh SQLite file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--database-url" in argv:
        return argv[argv.index("--database-url") + 1]
    return temp_sqlite_url()


def arg(name: str, default: Any, cast: Callable[[str], Any] = int) -> Any:
    argv = sys.argv[1:]
    return cast(argv[argv.index(name) + 1]) if name in argv else default


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3),
    }


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def emit(name: str, figures: dict[str, Any]) -> None:
    doc = {
        "benchmark": name,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **figures,
    }
    print(json.dumps(doc, indent=2))
