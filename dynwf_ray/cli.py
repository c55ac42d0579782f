"""`dynwf`: the command line. `demo` starts an engine, `push` joins Ray; the rest use the journal only.

    dynwf demo                         push the example tenants and run them (embedded default)
    dynwf push <tenant> <dir>          package, validate and store a tenant's code
    dynwf versions <tenant>            a tenant's code versions
    dynwf ls [--tenant T] [--status S] list instances
    dynwf status <id> [--tenant T]     status, version, output and steps of one instance
    dynwf send-event <id> <type> <json> [--tenant T]
    dynwf logs <id> [--tenant T] [-f]   what an instance's code printed; -f follows it
    dynwf delete <id> [--tenant T] [--force]  delete an instance with its steps, events, logs
    dynwf health                       can the journal be written; which engines heartbeat
    dynwf db upgrade                   upgrade the journal's schema to this version's
    dynwf db current                   the journal's schema revision

Every command takes --database-url (default: $DYNWF_DATABASE_URL, else the
embedded SQLite file under ~/.dynwf/). `demo` starts an engine and `push`
joins Ray (RAY_ADDRESS, else a local Ray) to validate code in its runtime env;
the others only use the journal. An event sent from the CLI is picked up by
the running engine's scheduler on its next poll.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from .binding import WorkflowBinding
from .config import default_database_url
from .package import push
from .errors import DynwfError
from . import migrations
from .journal import InstanceInfo, Journal, StepRecord, unavailable
from .types import TERMINAL, InstanceStatus
from .types import LogLine


def main(argv: Sequence[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url", default=argparse.SUPPRESS,
        help="journal URL (default: $DYNWF_DATABASE_URL, else the embedded SQLite file)",
    )
    parser = argparse.ArgumentParser(
        prog="dynwf", description="durable, per-tenant workflows on Ray", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    demo = command("demo", "push the example tenants and run them on the embedded engine")
    demo.add_argument(
        "--tenants", default=str(EXAMPLE_TENANTS),
        help="directory holding the example tenants acme/ and globex/",
    )

    push_cmd = command("push", "package, validate and store a tenant's code")
    push_cmd.add_argument("tenant")
    push_cmd.add_argument("dir")

    versions = command("versions", "list a tenant's code versions")
    versions.add_argument("tenant")

    ls = command("ls", "list instances")
    ls.add_argument("--tenant")
    ls.add_argument("--status")
    ls.add_argument("--limit", type=int, default=50)

    status = command("status", "status of one instance")
    status.add_argument("id")
    status.add_argument("--tenant")

    send = command("send-event", "send an event to an instance")
    send.add_argument("id")
    send.add_argument("type")
    send.add_argument("payload", help="JSON payload")
    send.add_argument("--tenant")

    logs = command("logs", "what an instance's code printed or logged")
    logs.add_argument("id")
    logs.add_argument("--tenant")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the instance finishes")
    logs.add_argument("--interval", type=float, default=0.5, help="seconds between polls with -f")

    delete = command("delete", "delete an instance with its steps, events and logs")
    delete.add_argument("id")
    delete.add_argument("--tenant")
    delete.add_argument("--force", action="store_true", help="delete it even while it runs")

    command("health", "whether the journal can be written, and the engines using it (exit 1: not)")

    db = command("db", "the journal's schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", parents=[common],
                      help="upgrade the journal's schema to this version's (engines do it when they start)")
    db_sub.add_parser("current", parents=[common], help="print the journal's schema revision")

    args = parser.parse_args(argv)
    url = getattr(args, "database_url", None) or default_database_url()
    try:
        if args.command == "demo":
            return _demo(url, Path(args.tenants))
        if args.command == "db":
            return _db(url, args.db_command)
        journal = Journal(url)
        if args.command == "push":
            return _push(journal, args.tenant, args.dir)
        if args.command == "versions":
            return _versions(journal, args.tenant)
        if args.command == "ls":
            return _ls(journal, args.tenant, args.status, args.limit)
        if args.command == "status":
            return _status(journal, _find(journal, args.id, args.tenant))
        if args.command == "send-event":
            return _send_event(journal, _find(journal, args.id, args.tenant), args.type, args.payload)
        if args.command == "logs":
            return _logs(journal, _find(journal, args.id, args.tenant), args.follow, args.interval)
        if args.command == "health":
            return _health(journal)
        if args.command == "delete":
            info = _find(journal, args.id, args.tenant)
            WorkflowBinding(journal, info.tenant_id).get(info.instance_id).delete(force=args.force)
            print(f"deleted {info.tenant_id}/{info.instance_id}")
            return 0
    except DynwfError as exc:
        print(f"dynwf: {exc}", file=sys.stderr)
        return 2
    return 1


#: The repository's example tenants (present in a source checkout).
EXAMPLE_TENANTS = Path(__file__).resolve().parent.parent / "tenants"


def _push(journal: Journal, tenant: str, directory: str) -> int:
    import ray

    from .types import validate_id

    validate_id(tenant, "tenant id")
    ray.init(logging_level="WARNING", include_dashboard=False)
    try:
        started = time.monotonic()
        version = push(journal, tenant, directory, time.time())
    finally:
        ray.shutdown()
    print(f"pushed {tenant} {version} ({time.monotonic() - started:.1f} s)")
    return 0


def _db(url: str, what: str) -> int:
    """`db current` reads the schema revision; `db upgrade` upgrades to this code's."""
    journal = Journal(url, create_tables=False)  # no DDL
    try:
        with journal.engine.connect() as conn:
            before = migrations.read_state(conn)
    except Exception as exc:  # noqa: BLE001 - a journal that cannot be read says why
        error = unavailable(exc)
        if error is None:
            raise
        raise error from exc
    finally:
        journal.close()
    where = _safe_url(url)
    if what == "current":
        print(before.describe())
        return 0
    if before.at_head:
        print(f"{where}: at {migrations.HEAD} (head), nothing to do")
        return 0
    Journal(url).close()  # upgrades, or says why it cannot
    found = before.revision or before.detected
    if found is None:
        print(f"{where}: created the journal's tables at {migrations.HEAD}")
    elif before.revision is None and found == migrations.HEAD:
        print(f"{where}: recorded schema revision {migrations.HEAD} (head)")
    else:
        print(f"{where}: upgraded from {found} to {migrations.HEAD}")
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


def _versions(journal: Journal, tenant: str) -> int:
    latest = journal.latest_version(tenant)
    rows = journal.list_versions(tenant)
    if not rows:
        raise _CliError(f"tenant {tenant!r} has no code versions")
    for version, kind, created in rows:
        print(f"{version}  {kind:<14} {_when(created)} UTC{'  (latest)' if version == latest else ''}")
    return 0


def _find(journal: Journal, instance_id: str, tenant: str | None) -> InstanceInfo:
    if tenant is not None:
        return journal.require_instance(tenant, instance_id)
    found = journal.find_instances(instance_id)
    if not found:
        raise _CliError(f"no instance {instance_id!r} in {journal.url}")
    if len(found) > 1:
        tenants = ", ".join(sorted(i.tenant_id for i in found))
        raise _CliError(f"{len(found)} tenants have an instance {instance_id!r} ({tenants}): pass --tenant")
    return found[0]


class _CliError(DynwfError):
    pass


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _ls(journal: Journal, tenant: str | None, status: str | None, limit: int) -> int:
    rows = journal.list_instances(tenant, status, limit)
    print(f"{'TENANT':<20} {'ID':<36} {'STATUS':<16} {'VERSION':<20} {'NEXT WAKE (UTC)':<20}")
    for i in rows:
        print(f"{i.tenant_id:<20} {i.instance_id:<36} {i.status:<16} {i.code_version:<20} {_when(i.wake_at):<20}")
    counts = journal.count_by_status(tenant)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"\n{summary}" if counts else "no instances")
    return 0


def _status(journal: Journal, info: InstanceInfo) -> int:
    doc = {
        "tenant": info.tenant_id,
        "id": info.instance_id,
        "status": info.status,
        "version": info.code_version,
        "error": {"name": info.error_name, "message": info.error_message} if info.error_name else None,
        "output": json.loads(info.output_json) if info.output_json else None,
        "metadata": json.loads(info.metadata_json),
        "next_wake": _when(info.wake_at) if info.wake_at else None,
        "waiting_for": info.waiting_for,
        "activations": info.activations,
        "trace_id": info.trace_context.split("-")[1] if info.trace_context else None,
        "condition": WorkflowBinding(journal, info.tenant_id, condition=lambda: _probed(journal))
        .get(info.instance_id).status()["condition"],
        "steps": [_step_doc(s) for s in journal.list_steps(info.pk)],
    }
    print(json.dumps(doc, indent=2))
    return 0


def _probed(journal: Journal) -> str | None:
    """What keeps instances from going on: tries a write that changes nothing."""
    try:
        journal.probe()
    except DynwfError:
        pass
    return journal.health.condition()


#: An engine whose heartbeat is older than this (seconds) is not counted as running.
_HEARTBEAT_FRESH = 5.0


def _health(journal: Journal) -> int:
    condition = _probed(journal)
    now = time.time()
    engines = [
        {"epoch": s.epoch, "engine": s.engine_name, "node": s.node, "started": _when(s.started_at),
         "heartbeat_age_s": round(now - s.heartbeat_at, 1)}
        for s in journal.live_sessions()
    ]
    running = [e for e in engines if e["heartbeat_age_s"] <= _HEARTBEAT_FRESH]
    doc = {"ready": condition is None and bool(running), "journal": condition or "ok",
           "engines": engines}
    print(json.dumps(doc, indent=2))
    return 0 if doc["ready"] else 1


def _step_doc(s: StepRecord) -> dict:
    return {
        # a rollback's record holds its step's count negated
        "name": s.name, "count": abs(s.seq), "kind": s.kind, "status": s.status, "attempts": s.attempts,
        "error": f"{s.error_name}: {s.error_message}" if s.error_name else None,
    }


def _send_event(journal: Journal, info: InstanceInfo, event_type: str, payload: str) -> int:
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise _CliError(f"payload is not valid JSON: {exc}") from None
    WorkflowBinding(journal, info.tenant_id).get(info.instance_id).send_event(event_type, data)
    print(f"sent {event_type!r} to {info.tenant_id}/{info.instance_id}")
    return 0


def _logs(journal: Journal, info: InstanceInfo, follow: bool, interval: float) -> int:
    """Print the instance's log lines; with follow, poll for more until it finishes."""
    after = 0
    try:
        while True:
            lines = journal.read_logs(info.pk, after)
            for line in lines:
                print(_log_line(line), flush=True)
            if lines:
                after = lines[-1].id
                continue
            if not follow:
                return 0
            status = journal.get_instance(info.tenant_id, info.instance_id)
            if status is None or status.status in ("complete", "errored", "terminated"):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def _log_line(line: LogLine) -> str:
    at = datetime.fromtimestamp(line.at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    where = f"{line.step}#{line.count} attempt {line.attempt}" if line.step else "run()"
    return f"{at}  {line.stream:<7} {where}  {line.message}"


def _demo(url: str, tenants: Path) -> int:
    from .engine import Engine

    if not (tenants / "acme").is_dir() or not (tenants / "globex").is_dir():
        raise _CliError(f"no example tenants in {tenants}; pass --tenants DIR")
    print(f"journal: {url}")
    print("starting the engine (local Ray)...", flush=True)
    engine = Engine.start(database_url=url, hibernate_after=5)
    try:
        # globex's dynwf.toml asks for a pip package: only the platform can allow that.
        engine.set_tenant_policy("globex", pip=True)
        for tenant in ("acme", "globex"):
            started = time.monotonic()
            version = engine.push_tenant(tenant, str(tenants / tenant))
            print(f"pushed {tenant}: {version} ({time.monotonic() - started:.1f} s)", flush=True)
        order = engine.binding("acme").create(
            id=f"order-{int(time.time() * 1000)}",
            params={"items": [{"sku": "A-1", "price": 12.5}, {"sku": "B-7", "price": 30}],
                    "fail_charge_times": 2, "sleep": "2 seconds"},
        )
        report = engine.binding("globex").create(id=f"report-{int(time.time() * 1000)}")
        print(f"created acme/{order.id} and globex/{report.id}; following acme/{order.id}:")
        pk = engine.journal.get_instance("acme", order.id).pk
        shown: dict[tuple[str, int], tuple[str, int]] = {}
        approved = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for s in engine.journal.list_steps(pk):
                key, state = (s.name, s.seq), (s.status, s.attempts)
                if shown.get(key) != state:
                    shown[key] = state
                    print("  " + _progress_line(s), flush=True)
            status = order.status()
            if status["status"] == InstanceStatus.waiting and not approved and ("manager approval", 1) in shown:
                print("  -> sending the 'approval' event the workflow waits for", flush=True)
                order.send_event("approval", {"by": "the demo"})
                approved = True
            if status["status"] in TERMINAL:
                break
            time.sleep(0.1)
        else:
            print("the demo did not finish within 5 minutes", file=sys.stderr)
            return 1
        while report.status()["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                print("the globex report did not finish within 5 minutes", file=sys.stderr)
                return 1
            time.sleep(0.1)
        print(f"what acme/{order.id} printed and logged (dynwf logs {order.id}):")
        for line in order.logs():
            print("  " + _log_line(line))
        ok = True
        for tenant, inst in (("acme", order), ("globex", report)):
            status = inst.status()
            ok = ok and status["status"] == InstanceStatus.complete
            print(f"{tenant}/{inst.id}: {status['status']} on {status['version']}")
            print(json.dumps(status["output"] or status["error"], indent=2))
        stats = engine.stats()
        print(
            f"activations: {stats['activations']} ({stats['cold_starts']} cold, "
            f"{stats['warm_starts']} warm); live hosts: {stats['live_hosts']}"
        )
        return 0 if ok else 1
    finally:
        engine.stop()


def _progress_line(s: StepRecord) -> str:
    if s.kind == "sleep":
        return f"[sleep] {s.name}: until {_when(json.loads(s.result_json))} UTC (the instance hibernates)"
    if s.kind == "wait" and s.status == "waiting":
        return f"[wait]  {s.name}: waiting for an event (the instance hibernates)"
    if s.kind == "wait" and s.status == "complete":
        return f"[event] {s.name}: {s.result_json}"
    if s.status == "complete":
        result = s.result_json if len(s.result_json or "") < 120 else s.result_json[:117] + "..."
        return f"[done]  {s.name} (attempt {s.attempts}): {result}"
    if s.status == "retrying":
        wait = max(0.0, (s.next_attempt_at or 0) - time.time())
        return f"[retry] {s.name}: attempt {s.attempts} failed ({s.error_message}); next in {wait:.1f} s"
    return f"[{s.status}] {s.name}: {s.error_name}: {s.error_message}"


if __name__ == "__main__":
    sys.exit(main())
