"""`dynwf`: the command line. `demo` and `serve` start an engine, `push` joins Ray; the rest use the journal only.

    dynwf demo                         push the example tenants and run them (embedded default)
    dynwf serve [--host H] [--port P] [--trace-url T] [--code-limit BYTES] [--ray-address A]
                [--sandbox MODE] [--control-resource NAME]
                                       serve the HTTP API and dashboard (docs/cli.md)
    dynwf push <tenant> <dir>          package, validate and store a tenant's code
    dynwf versions <tenant>            a tenant's code versions
    dynwf trigger <tenant> [--id ID] [--params JSON]   create an instance
    dynwf ls [--tenant T] [--status S] [--since W] [--until W] [--limit N] [--cursor C]
                                       list instances, newest first, a page at a time
    dynwf status <id> [--tenant T]     status, version, output and steps of one instance
    dynwf describe <id> [--tenant T]   one instance for people: params, output, a table of steps
    dynwf pause|resume <id> [--tenant T]
    dynwf terminate <id> [--tenant T] [--rollback]
    dynwf restart <id> [--tenant T] [--from-step NAME:COUNT]
    dynwf send-event <id> <type> <json> [--tenant T]
    dynwf logs <id> [--tenant T] [-f]   what an instance's code printed; -f follows it
    dynwf delete <id> [--tenant T] [--force]  delete an instance with its steps, events, logs
    dynwf token create (--admin | --tenant T) [--name N]   an API token (shown once)
    dynwf token revoke <token_id>      revoke an API token for good
    dynwf token ls [--tenant T]        API tokens (never their secrets)
    dynwf webhook-secret set|clear <tenant>   the secret a tenant's webhooks are signed with
    dynwf health                       can the journal be written; which engines heartbeat
    dynwf db upgrade                   upgrade the journal's schema to this version's
    dynwf db current                   the journal's schema revision

Every command takes --database-url (default: $DYNWF_DATABASE_URL, else the
embedded SQLite file under ~/.dynwf/) and --json (its result as one JSON
document on stdout; `logs -f --json`: one JSON object per line; errors stay on
stderr, exit status 2). `demo` and `serve` start an engine and `push` joins Ray
(RAY_ADDRESS, else a local Ray) to validate code in its runtime env; the others
only use the journal. What the CLI does to an instance (an event, trigger,
resume, restart...) is picked up at the running engine's next poll (by a host of that
code version, or by the scheduler's tick where none runs), within `poll_interval`.
"""

from __future__ import annotations

import argparse
import functools
import json
import secrets
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TextIO

from .binding import WorkflowBinding
from .config import default_database_url
from .package import push
from .errors import DynwfError, InvalidInputError
from . import migrations
from .journal import InstanceInfo, Journal, StepRecord, TokenInfo, unavailable
from .journal.dialect import shown_url
from .journal.schema import MAX_ROW_ID
from .types import TERMINAL, InstanceStatus, LogLine, parse_duration, validate_id


def main(argv: Sequence[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url", default=argparse.SUPPRESS,
        help="journal URL (default: $DYNWF_DATABASE_URL, else the embedded SQLite file)",
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the result as JSON (one document; logs -f: one per line)")
    parser = argparse.ArgumentParser(
        prog="dynwf", description="durable, per-tenant workflows on Ray", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, run: Callable[..., int], within: Any = sub) -> argparse.ArgumentParser:
        cmd = within.add_parser(name, help=help, parents=[common])
        cmd.set_defaults(run=run)
        return cmd

    def instance_command(name: str, help: str, run: Callable[..., int]) -> argparse.ArgumentParser:
        cmd = command(name, help, run)
        cmd.add_argument("id")
        cmd.add_argument("--tenant", help="the instance's tenant (needed when several have the id)")
        return cmd

    demo = command("demo", "push the example tenants and run them on the embedded engine", _demo)
    demo.add_argument(
        "--tenants", default=str(EXAMPLE_TENANTS),
        help="directory holding the example tenants acme/ and globex/",
    )

    serve = command("serve", "serve the HTTP API and dashboard (starts an engine)", _serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8750)
    serve.add_argument("--trace-url", help="link to a trace viewer: a template with {trace_id} and {tenant}")
    serve.add_argument("--code-limit", type=int, help="largest code upload, in bytes (default: 16 MiB)")
    serve.add_argument("--ray-address", help="the Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    serve.add_argument("--sandbox", choices=["strict", "process"], default="strict",
                       help="how tenant code is isolated (EngineConfig.sandbox; docs/security.md)")
    serve.add_argument("--control-resource", metavar="NAME",
                       help="run the engine's scheduler and loader only on nodes started with "
                            "this Ray custom resource (EngineConfig.control_resources)")

    push_cmd = command("push", "package, validate and store a tenant's code", _push)
    push_cmd.add_argument("tenant")
    push_cmd.add_argument("dir")
    push_cmd.add_argument("--sandbox", choices=["strict", "process"], default="strict",
                          help="the sandbox the code is validated in: the engine's mode")

    versions = command("versions", "list a tenant's code versions", _versions)
    versions.add_argument("tenant")

    trigger = command("trigger", "create an instance of a tenant's latest code", _trigger)
    trigger.add_argument("tenant")
    trigger.add_argument("--id", help="the instance id (default: a new random one)")
    trigger.add_argument("--params", help="its params, as JSON")

    ls = command("ls", "list instances, newest first", _ls)
    ls.add_argument("--tenant")
    ls.add_argument("--status", choices=[s.value for s in InstanceStatus])
    ls.add_argument("--since", help="created at or after: ISO-8601 (UTC unless it says) or how long ago (10m, 2h, 1d)")
    ls.add_argument("--until", help="created before: ISO-8601 or how long ago")
    ls.add_argument("--limit", type=int, default=50, help="rows per page (default 50)")
    ls.add_argument("--cursor", help="the next page: the cursor the previous page printed")

    instance_command("status", "status of one instance (JSON)", _status)
    instance_command("describe", "one instance for people: params, output, steps", _describe)
    instance_command("pause", "pause an instance (at its next step when it runs)", _lifecycle)
    instance_command("resume", "resume a paused instance", _lifecycle)
    terminate = instance_command("terminate", "end an instance now", _lifecycle)
    terminate.add_argument("--rollback", action="store_true",
                           help="first run the compensations of its completed steps")
    restart = instance_command("restart", "run an instance again", _lifecycle)
    restart.add_argument("--from-step", metavar="NAME:COUNT",
                         help="keep the results before this step (COUNT: its occurrence, 1 the first)")

    send = instance_command("send-event", "send an event to an instance", _send_event)
    send.add_argument("type")
    send.add_argument("payload", help="JSON payload")

    logs = instance_command("logs", "what an instance's code printed or logged", _logs)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the instance finishes")
    logs.add_argument("--interval", type=_interval, default=0.5, help="seconds between polls with -f")

    delete = instance_command("delete", "delete an instance with its steps, events and logs", _delete)
    delete.add_argument("--force", action="store_true", help="delete it even while it runs")

    token = command("token", "the HTTP API's bearer tokens", _token)
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = command("create", "create a token; its secret is printed once", _token, token_sub)
    whose = create.add_mutually_exclusive_group(required=True)
    whose.add_argument("--admin", action="store_true", help="a token for every tenant and admin routes")
    whose.add_argument("--tenant", help="a token for this tenant only")
    create.add_argument("--name", default="cli", help="what it is for (default: cli)")
    revoke = command("revoke", "revoke a token for good", _token, token_sub)
    revoke.add_argument("token_id")
    token_ls = command("ls", "list tokens (never their secrets)", _token, token_sub)
    token_ls.add_argument("--tenant")

    webhook = command("webhook-secret", "the secret a tenant's webhooks are signed with", _webhook_secret)
    webhook_sub = webhook.add_subparsers(dest="webhook_command", required=True)
    for name, help in (("set", "generate a new secret (printed once) and use it"),
                       ("clear", "remove it: the tenant's webhooks are refused")):
        command(name, help, _webhook_secret, webhook_sub).add_argument("tenant")

    command("health", "whether the journal can be written, and the engines using it (exit 1: not)", _health)

    db = command("db", "the journal's schema", _db)
    db_sub = db.add_subparsers(dest="db_command", required=True)
    command("upgrade", "upgrade the journal's schema to this version's (engines do it when they start)",
            _db, db_sub)
    command("current", "print the journal's schema revision", _db, db_sub)

    args = parser.parse_args(argv)
    cli = _Cli(getattr(args, "database_url", None) or default_database_url(), getattr(args, "json", False))
    try:
        return args.run(cli, args)
    except DynwfError as exc:
        print(f"dynwf: {exc}", file=sys.stderr)
        return 2
    finally:
        cli.close()


class _Cli:
    """What a command runs with: the journal (opened when first used) and where its result goes."""

    def __init__(self, url: str, as_json: bool):
        self.url = url
        self.json = as_json

    @functools.cached_property
    def journal(self) -> Journal:
        return Journal(self.url)

    def close(self) -> None:
        if "journal" in self.__dict__:
            self.journal.close()

    def emit(self, doc: Any, lines: Iterable[str] = ()) -> int:
        """The result: `doc` as JSON with --json, else `lines` for people."""
        if self.json:
            print(json.dumps(doc))
        else:
            for line in lines:
                print(line)
        return 0

    def note(self, text: str) -> None:
        """A word for people that is not the result (stderr)."""
        print(f"dynwf: {text}", file=sys.stderr)


#: The repository's example tenants (present in a source checkout).
EXAMPLE_TENANTS = Path(__file__).resolve().parent.parent / "tenants"


class _CliError(DynwfError):
    pass


def _table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]]) -> list[str]:
    """Rows (and headers) as lines whose columns line up; None shows as "-"."""
    cells = [["-" if c is None else str(c) for c in row] for row in rows]
    if headers is not None:
        cells.insert(0, list(headers))
    if not cells:
        return []
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h {minutes % 60}m" if minutes >= 60 else f"{minutes}m {secs}s"


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _interval(value: str) -> float:
    """--interval: seconds, finite, from 0.05 to 3600."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0.05 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"must be seconds from 0.05 to 3600, got {value!r}")
    return seconds


def _json_arg(value: str, what: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:  # JSONDecodeError, or a number of more than 4300 digits
        raise _CliError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise _CliError(f"{what} is not valid JSON: nested too deeply") from None


def _time_arg(value: str | None, what: str) -> float | None:
    """A time given as ISO-8601 (UTC unless it says) or as how long ago ("10m", "2h", "1d")."""
    if value is None:
        return None
    try:
        return time.time() - parse_duration(value, what)
    except InvalidInputError:
        pass
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise _CliError(
            f"{what} {value!r} is not a time: give ISO-8601 (2024-05-01T12:00:00, UTC unless it "
            "says) or how long ago (30s, 10m, 2h, 1d)"
        ) from None
    return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()


def _find(journal: Journal, instance_id: str, tenant: str | None) -> InstanceInfo:
    if tenant is not None:
        return journal.require_instance(tenant, instance_id)
    found = journal.find_instances(instance_id)
    if not found:
        raise _CliError(f"no instance {instance_id!r} in {shown_url(journal.url)}")
    if len(found) > 1:
        tenants = ", ".join(sorted(i.tenant_id for i in found))
        raise _CliError(f"{len(found)} tenants have an instance {instance_id!r} ({tenants}): pass --tenant")
    return found[0]


# -- code ------------------------------------------------------------------------------


class _Progress:
    """Says on `stream` what a long command is doing: on a terminal, one line redrawn with a
    spinner, the stage and the time so far; elsewhere (a log, a pipe) a line per stage."""

    FRAMES = "|/-\\"

    def __init__(self, stream: TextIO, what: str, interval: float = 0.1):
        self._stream, self._what, self._interval = stream, what, interval
        self._tty = stream.isatty()
        self._stage = "starting"
        self._frame = 0
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._spinner: threading.Thread | None = None

    def __call__(self, stage: str) -> None:
        self._stage = stage
        if self._tty:
            self._draw()
        else:
            print(f"dynwf: {self._what}: {stage}", file=self._stream, flush=True)

    def _draw(self) -> None:
        with self._lock:
            frame = self.FRAMES[self._frame % len(self.FRAMES)]
            self._frame += 1
            elapsed = time.monotonic() - self._started
            self._stream.write(f"\r\x1b[K{frame} {self._what}: {self._stage} ({elapsed:.1f} s)")
            self._stream.flush()

    def _spin(self) -> None:
        while not self._done.wait(self._interval):
            self._draw()

    def __enter__(self) -> "_Progress":
        if self._tty:
            self._spinner = threading.Thread(target=self._spin, name="dynwf-progress", daemon=True)
            self._spinner.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._spinner is not None:
            self._done.set()
            self._spinner.join()
            with self._lock:
                self._stream.write("\r\x1b[K")  # the line goes: the result follows
                self._stream.flush()


def _push(cli: _Cli, args: argparse.Namespace) -> int:
    import ray

    validate_id(args.tenant, "tenant id")
    started = time.monotonic()
    with _Progress(sys.stderr, f"push {args.tenant}") as progress:
        progress("starting Ray")
        ray.init(logging_level="WARNING", include_dashboard=False)
        try:
            version = push(cli.journal, args.tenant, args.dir, time.time(), args.sandbox,
                           progress=progress)
        finally:
            ray.shutdown()
    seconds = round(time.monotonic() - started, 1)
    return cli.emit({"tenant": args.tenant, "version": version, "seconds": seconds},
                    [f"pushed {args.tenant} {version} ({seconds} s)"])


def _versions(cli: _Cli, args: argparse.Namespace) -> int:
    latest = cli.journal.latest_version(args.tenant)
    rows = cli.journal.list_versions(args.tenant)
    if not rows:
        raise _CliError(f"tenant {args.tenant!r} has no code versions")
    doc = {"tenant": args.tenant, "versions": [
        {"version": v, "kind": kind, "created_at": at, "latest": v == latest} for v, kind, at in rows
    ]}
    table = [(v, kind, _when(at), "latest" if v == latest else "") for v, kind, at in rows]
    return cli.emit(doc, _table(("VERSION", "KIND", "CREATED (UTC)", ""), table))


# -- instances -------------------------------------------------------------------------


def _summary(i: InstanceInfo) -> dict:
    """An instance as the HTTP API's InstanceSummary."""
    return {
        "tenant": i.tenant_id, "id": i.instance_id, "status": i.status, "version": i.code_version,
        "created_at": i.created_at, "updated_at": i.updated_at,
        "error": {"name": i.error_name, "message": i.error_message} if i.error_name else None,
    }


def _trigger(cli: _Cli, args: argparse.Namespace) -> int:
    params = _json_arg(args.params, "--params") if args.params is not None else None
    handle = WorkflowBinding(cli.journal, args.tenant).create(id=args.id, params=params)
    return cli.emit({"tenant": args.tenant, "id": handle.id, "outcome": handle.outcome},
                    [f"created {args.tenant}/{handle.id}"])


def _ls(cli: _Cli, args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 10_000:
        raise _CliError(f"--limit must be from 1 to 10000, got {args.limit}")
    before = None
    if args.cursor is not None:
        if not args.cursor.isdigit() or len(args.cursor) > 18 or int(args.cursor) < 1:
            raise _CliError(f"--cursor {args.cursor!r} is not a cursor `dynwf ls` printed")
        before = int(args.cursor)
    rows = cli.journal.list_instances(
        args.tenant, args.status, args.limit + 1, before_pk=before,
        created_after=_time_arg(args.since, "--since"), created_before=_time_arg(args.until, "--until"),
    )
    page = rows[: args.limit]
    cursor = str(page[-1].pk) if len(rows) > args.limit else None
    counts = cli.journal.count_by_status(args.tenant)
    doc = {"instances": [_summary(i) for i in page], "next_cursor": cursor, "counts": counts}
    lines = _table(
        ("TENANT", "ID", "STATUS", "VERSION", "CREATED (UTC)", "NEXT WAKE (UTC)"),
        [(i.tenant_id, i.instance_id, i.status, i.code_version, _when(i.created_at), _when(i.wake_at))
         for i in page],
    ) if page else ["no instances match"]
    if cursor is not None:
        lines.append(f"next page: --cursor {cursor}")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines.append(f"\nin all: {summary}" if counts else "\nno instances")
    return cli.emit(doc, lines)


def _status(cli: _Cli, args: argparse.Namespace) -> int:
    journal = cli.journal
    info = _find(journal, args.id, args.tenant)
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
    return cli.emit(doc, [json.dumps(doc, indent=2)])


def _step_doc(s: StepRecord) -> dict:
    return {
        # a rollback's record holds its step's count negated
        "name": s.name, "count": abs(s.seq), "kind": s.kind, "status": s.status, "attempts": s.attempts,
        "error": f"{s.error_name}: {s.error_message}" if s.error_name else None,
    }


def _step_detail(s: StepRecord) -> dict:
    """A step as the HTTP API's Step."""
    return {
        "name": s.name, "count": abs(s.seq), "kind": s.kind, "status": s.status,
        "attempts": s.attempts, "result": json.loads(s.result_json) if s.result_json else None,
        "error": {"name": s.error_name, "message": s.error_message} if s.error_name else None,
        "started_at": s.started_at, "finished_at": s.finished_at, "next_attempt_at": s.next_attempt_at,
    }


def _describe(cli: _Cli, args: argparse.Namespace) -> int:
    info = _find(cli.journal, args.id, args.tenant)
    steps = cli.journal.list_steps(info.pk)
    doc = {
        **_summary(info), "params": json.loads(info.params_json),
        "output": json.loads(info.output_json) if info.output_json else None,
        "waiting_for": info.waiting_for, "wake_at": info.wake_at, "activations": info.activations,
        "steps": [_step_detail(s) for s in steps],
    }
    fields = [("instance", f"{info.tenant_id}/{info.instance_id}"), ("status", info.status),
              ("version", info.code_version), ("created", f"{_when(info.created_at)} UTC"),
              ("updated", f"{_when(info.updated_at)} UTC"), ("params", _clip(info.params_json, 100))]
    if info.error_name:
        fields.append(("error", f"{info.error_name}: {info.error_message}"))
    elif info.output_json is not None:
        fields.append(("output", _clip(info.output_json, 100)))
    if info.waiting_for:
        fields.append(("waiting for", f"event {info.waiting_for!r} until {_when(info.wake_at)} UTC"))
    elif info.wake_at is not None and info.status not in TERMINAL:
        fields.append(("next wake", f"{_when(info.wake_at)} UTC"))
    lines = _table(None, fields) + [""]
    lines += _table(
        ("STEP", "COUNT", "KIND", "STATUS", "ATTEMPTS", "STARTED (UTC)", "DURATION", "RESULT / ERROR"),
        [(s.name, abs(s.seq), s.kind, s.status, s.attempts, _when(s.started_at),
          _duration(s.finished_at - s.started_at) if s.finished_at is not None else None,
          f"{s.error_name}: {_clip(s.error_message or '')}" if s.error_name else _clip(s.result_json or "-"))
         for s in steps],
    ) if steps else ["no steps yet"]
    return cli.emit(doc, lines)


def _from_step(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    name, _, count = value.rpartition(":")
    if not name or not count.isdigit() or not 1 <= int(count) <= MAX_ROW_ID:
        raise _CliError(f"--from-step {value!r} is not NAME:COUNT (COUNT: 1 for the step's first occurrence)")
    return name, int(count)


_DONE = {"pause": "paused", "resume": "resumed", "terminate": "terminated", "restart": "restarted"}


def _lifecycle(cli: _Cli, args: argparse.Namespace) -> int:
    """pause, resume, terminate, restart: what the binding does, then the instance's status."""
    info = _find(cli.journal, args.id, args.tenant)
    handle = WorkflowBinding(cli.journal, info.tenant_id).get(info.instance_id)
    if args.command == "terminate":
        handle.terminate(rollback=args.rollback)
    elif args.command == "restart":
        handle.restart(from_step=_from_step(args.from_step))
    else:
        getattr(handle, args.command)()
    status = cli.journal.require_instance(info.tenant_id, info.instance_id).status
    said = f"{_DONE[args.command]} {info.tenant_id}/{info.instance_id}: now {status}"
    if args.command == "terminate" and args.rollback:
        said = (f"terminating {info.tenant_id}/{info.instance_id}: its next activation runs the "
                f"compensations of its completed steps, then it ends terminated (now {status})")
    return cli.emit({"tenant": info.tenant_id, "id": info.instance_id, "status": status}, [said])


def _send_event(cli: _Cli, args: argparse.Namespace) -> int:
    info = _find(cli.journal, args.id, args.tenant)
    data = _json_arg(args.payload, "payload")
    WorkflowBinding(cli.journal, info.tenant_id).get(info.instance_id).send_event(args.type, data)
    return cli.emit({"tenant": info.tenant_id, "id": info.instance_id, "type": args.type},
                    [f"sent {args.type!r} to {info.tenant_id}/{info.instance_id}"])


def _delete(cli: _Cli, args: argparse.Namespace) -> int:
    info = _find(cli.journal, args.id, args.tenant)
    WorkflowBinding(cli.journal, info.tenant_id).get(info.instance_id).delete(force=args.force)
    return cli.emit({"tenant": info.tenant_id, "id": info.instance_id, "deleted": True},
                    [f"deleted {info.tenant_id}/{info.instance_id}"])


def _logs(cli: _Cli, args: argparse.Namespace) -> int:
    """Print the instance's log lines; with follow, poll for more until it finishes
    (--json: one document, or with -f one JSON object per line)."""
    journal = cli.journal
    info = _find(journal, args.id, args.tenant)
    after, kept = 0, []
    try:
        while True:
            lines = journal.read_logs(info.pk, after)
            for line in lines:
                if cli.json and not args.follow:
                    kept.append(line.model_dump())
                else:
                    print(json.dumps(line.model_dump()) if cli.json else _log_line(line), flush=True)
            if lines:
                after = lines[-1].id
                continue
            if not args.follow:
                break
            status = journal.get_instance(info.tenant_id, info.instance_id)
            if status is None or status.status in TERMINAL:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    if cli.json and not args.follow:
        cli.emit({"tenant": info.tenant_id, "id": info.instance_id, "lines": kept})
    return 0


def _log_line(line: LogLine) -> str:
    at = datetime.fromtimestamp(line.at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    where = f"{line.step}#{line.count} attempt {line.attempt}" if line.step else "run()"
    return f"{at}  {line.stream:<7} {where}  {line.message}"


# -- access: tokens, webhook secrets ----------------------------------------------------


def _token_doc(t: TokenInfo) -> dict:
    return {"token_id": t.token_id, "tenant": t.tenant_id, "admin": t.tenant_id is None,
            "name": t.name, "created_at": t.created_at, "revoked_at": t.revoked_at}


def _token(cli: _Cli, args: argparse.Namespace) -> int:
    journal = cli.journal
    if args.token_command == "create":
        info, secret = journal.create_token(None if args.admin else args.tenant, args.name, time.time())
        whose = "an admin token" if info.tenant_id is None else f"a token of tenant {info.tenant_id!r}"
        cli.note(f"created {whose}, id {info.token_id} ({info.name}); this is the only time "
                 "its secret is shown: store it now")
        # stdout: the secret alone, so that TOKEN=$(dynwf token create ...) works
        return cli.emit({**_token_doc(info), "secret": secret}, [secret])
    if args.token_command == "revoke":
        info = journal.revoke_token(args.token_id, time.time())
        return cli.emit(_token_doc(info), [f"revoked token {info.token_id} at {_when(info.revoked_at)} UTC"])
    tokens = journal.list_tokens(args.tenant)
    lines = _table(
        ("TOKEN ID", "TENANT", "NAME", "CREATED (UTC)", "REVOKED (UTC)"),
        [(t.token_id, t.tenant_id or "(admin)", t.name, _when(t.created_at),
          _when(t.revoked_at) if t.revoked_at else None) for t in tokens],
    ) if tokens else ["no tokens"]
    return cli.emit({"tokens": [_token_doc(t) for t in tokens]}, lines)


def _webhook_secret(cli: _Cli, args: argparse.Namespace) -> int:
    if args.webhook_command == "clear":
        cli.journal.set_webhook_secret(args.tenant, None, time.time())
        return cli.emit({"tenant": args.tenant, "secret": None},
                        [f"cleared the webhook secret of {args.tenant}: its webhooks are refused"])
    secret = secrets.token_hex(32)
    cli.journal.set_webhook_secret(args.tenant, secret, time.time())
    cli.note(f"webhooks of {args.tenant} must now be signed (HMAC-SHA256) with this secret; "
             "this is the only time it is shown: give it to the sender now")
    return cli.emit({"tenant": args.tenant, "secret": secret}, [secret])


# -- the journal, the server ------------------------------------------------------------


def _serve(cli: _Cli, args: argparse.Namespace) -> int:
    from .server import serve

    if args.code_limit is not None and args.code_limit < 1:
        raise _CliError(f"--code-limit must be a positive number of bytes, got {args.code_limit}")
    url = f"http://{args.host}:{args.port}/"
    cli.emit({"url": url, "database_url": shown_url(cli.url)},
             [f"serving the HTTP API and dashboard at {url} (journal: {shown_url(cli.url)})"])
    sys.stdout.flush()
    control = {"control_resources": {args.control_resource: 0.01}} if args.control_resource else {}
    serve(database_url=cli.url, host=args.host, port=args.port, trace_url=args.trace_url,
          code_limit=args.code_limit, ray_address=args.ray_address, sandbox=args.sandbox, **control)
    return 0


def _db(cli: _Cli, args: argparse.Namespace) -> int:
    """`db current` reads the schema revision; `db upgrade` upgrades to this code's."""
    url = cli.url
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
    where = shown_url(url)
    if args.db_command == "current":
        return cli.emit({"revision": before.revision, "detected": before.detected,
                         "head": migrations.HEAD, "at_head": before.at_head,
                         "description": before.describe()}, [before.describe()])
    found = before.revision or before.detected
    doc = {"from": found, "to": migrations.HEAD, "changed": not before.at_head}
    if before.at_head:
        return cli.emit(doc, [f"{where}: at {migrations.HEAD} (head), nothing to do"])
    Journal(url).close()  # upgrades, or says why it cannot
    if found is None:
        said = f"{where}: created the journal's tables at {migrations.HEAD}"
    elif before.revision is None and found == migrations.HEAD:
        said = f"{where}: recorded schema revision {migrations.HEAD} (head)"
    else:
        said = f"{where}: upgraded from {found} to {migrations.HEAD}"
    return cli.emit(doc, [said])


def _probed(journal: Journal) -> str | None:
    """What keeps instances from going on: tries a write that changes nothing."""
    try:
        journal.probe()
    except DynwfError:
        pass
    return journal.health.condition()


#: An engine whose heartbeat is older than this (seconds) is not counted as running.
_HEARTBEAT_FRESH = 5.0


def _health(cli: _Cli, args: argparse.Namespace) -> int:
    journal = cli.journal
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
    cli.emit(doc, [json.dumps(doc, indent=2)])
    return 0 if doc["ready"] else 1


# -- the demo ---------------------------------------------------------------------------


def _demo(cli: _Cli, args: argparse.Namespace) -> int:
    """With --json, what it shows along the way goes to stderr and the outcome is the document."""
    from .engine import Engine

    url, tenants = cli.url, Path(args.tenants)
    say = functools.partial(print, file=sys.stderr if cli.json else sys.stdout, flush=True)

    if not (tenants / "acme").is_dir() or not (tenants / "globex").is_dir():
        raise _CliError(f"no example tenants in {tenants}; pass --tenants DIR")
    say(f"journal: {url}")
    say("starting the engine (local Ray)...")
    engine = Engine.start(database_url=url, hibernate_after=5)
    try:
        # globex's dynwf.toml asks for a pip package: only the platform can allow that.
        engine.set_tenant_policy("globex", pip=True)
        for tenant in ("acme", "globex"):
            started = time.monotonic()
            version = engine.push_tenant(tenant, str(tenants / tenant))
            say(f"pushed {tenant}: {version} ({time.monotonic() - started:.1f} s)")
        order = engine.binding("acme").create(
            id=f"order-{int(time.time() * 1000)}",
            params={"items": [{"sku": "A-1", "price": 12.5}, {"sku": "B-7", "price": 30}],
                    "fail_charge_times": 2, "sleep": "2 seconds"},
        )
        report = engine.binding("globex").create(id=f"report-{int(time.time() * 1000)}")
        say(f"created acme/{order.id} and globex/{report.id}; following acme/{order.id}:")
        pk = engine.journal.get_instance("acme", order.id).pk
        shown: dict[tuple[str, int], tuple[str, int]] = {}
        approved = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for s in engine.journal.list_steps(pk):
                key, state = (s.name, s.seq), (s.status, s.attempts)
                if shown.get(key) != state:
                    shown[key] = state
                    say("  " + _progress_line(s))
            status = order.status()
            if status["status"] == InstanceStatus.waiting and not approved and ("manager approval", 1) in shown:
                say("  -> sending the 'approval' event the workflow waits for")
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
        say(f"what acme/{order.id} printed and logged (dynwf logs {order.id}):")
        for line in order.logs():
            say("  " + _log_line(line))
        ok = True
        outcome = {}
        for tenant, inst in (("acme", order), ("globex", report)):
            status = inst.status()
            ok = ok and status["status"] == InstanceStatus.complete
            outcome[f"{tenant}/{inst.id}"] = {k: status[k] for k in ("status", "version", "output", "error")}
            say(f"{tenant}/{inst.id}: {status['status']} on {status['version']}")
            say(json.dumps(status["output"] or status["error"], indent=2))
        # From the journal: the hosts' own counters reach stats() up to a second late.
        activations = sum(engine.journal.get_instance(tenant, inst.id).activations
                          for tenant, inst in (("acme", order), ("globex", report)))
        stats = engine.stats()
        say(f"activations: {activations}; hosts started: {stats['cold_starts']}; "
            f"live hosts: {stats['live_hosts']}")
        if cli.json:
            cli.emit({"ok": ok, "instances": outcome, "activations": activations,
                      "cold_starts": stats["cold_starts"]})
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
