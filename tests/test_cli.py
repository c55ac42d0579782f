"""The dynwf command against a journal (no engine needed: every command but demo, serve and push
acts on the journal alone; push and serve are tested with Ray and the server stubbed)."""

from __future__ import annotations

import io
import json
import re
import sys
import time
import types
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from dynwf_ray import JournalSchemaError, cli
from dynwf_ray.binding import WorkflowBinding
from dynwf_ray.cli import _table, main
from dynwf_ray.journal import Journal
from dynwf_ray.package import PACKAGE, build_package, push
from dynwf_ray.types import LogLine

from .driver import Driver
from .workflows import Approval, Flaky, ThreeSteps


def test_ls_status_and_send_event(shared_journal_url, journal, tenant, capsys):
    journal.save_code(tenant, "v1", "test", b"", 1.0)
    WorkflowBinding(journal, tenant, metadata={"region": "eu"}).create(id="cli-1", params={"a": 1})

    assert main(["ls", "--tenant", tenant, "--database-url", shared_journal_url]) == 0
    out = capsys.readouterr().out
    assert "cli-1" in out and "queued" in out and "1 queued" in out

    assert main(["--database-url", shared_journal_url, "status", "cli-1", "--tenant", tenant]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "queued" and doc["version"] == "v1"
    assert doc["metadata"] == {"region": "eu", "tenant_id": tenant, "code_version": "v1"}
    trace_context = journal.get_instance(tenant, "cli-1").trace_context
    assert len(doc["trace_id"]) == 32 and doc["trace_id"] == trace_context.split("-")[1]

    args = ["send-event", "cli-1", "approval", '{"by": "ops"}', "--tenant", tenant]
    assert main(args + ["--database-url", shared_journal_url]) == 0
    assert "sent 'approval'" in capsys.readouterr().out
    # the event was stored: the instance's wait takes it when it runs
    d = Driver(journal, tenant, Approval)
    d.now = time.time() + 1
    assert d.tick() == ["complete"]
    assert json.loads(journal.get_instance(tenant, "cli-1").output_json)["by"] == "ops"


def test_cli_errors_name_what_was_wrong(shared_journal_url, journal, tenant, capsys):
    journal.save_code(tenant, "v1", "test", b"", 1.0)
    WorkflowBinding(journal, tenant).create(id="cli-2")
    url = ["--database-url", shared_journal_url]
    assert main(url + ["status", "no-such-instance"]) == 2
    assert "no instance 'no-such-instance'" in capsys.readouterr().err
    assert main(url + ["send-event", "cli-2", "approval", "{not json", "--tenant", tenant]) == 2
    assert "payload is not valid JSON" in capsys.readouterr().err
    assert main(url + ["send-event", "cli-2", "bad type!", "{}", "--tenant", tenant]) == 2
    assert "event type 'bad type!' is invalid" in capsys.readouterr().err
    # numbers and nesting no parser or database takes: named, not a traceback
    assert main(url + ["send-event", "cli-2", "approval", "1" * 5000, "--tenant", tenant]) == 2
    assert "payload is not valid JSON" in capsys.readouterr().err
    assert main(url + ["send-event", "cli-2", "approval", "[" * 100_000, "--tenant", tenant]) == 2
    assert "payload is not valid JSON: nested too deeply" in capsys.readouterr().err
    assert main(url + ["ls", "--limit", "9" * 20]) == 2
    assert "--limit must be from 1 to 10000" in capsys.readouterr().err
    assert main(url + ["restart", "cli-2", "--tenant", tenant, "--from-step", "a:" + "9" * 20]) == 2
    assert "is not NAME:COUNT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(url + ["logs", "cli-2", "-f", "--interval", "nan"])
    assert "must be seconds from 0.05 to 3600" in capsys.readouterr().err
    assert main(["--database-url", "mysql://u:pw@h/db", "ls"]) == 2
    err = capsys.readouterr().err
    assert "is not a SQLite or PostgreSQL URL" in err and "pw" not in err


def test_a_journal_from_an_older_version_is_refused_naming_what_it_lacks(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.create_engine(url)
    with old.begin() as conn:  # the instances table as it was before trace columns existed
        conn.execute(sa.text(
            "CREATE TABLE instances (pk INTEGER PRIMARY KEY, tenant_id VARCHAR, instance_id VARCHAR)"
        ))
    old.dispose()
    with pytest.raises(JournalSchemaError, match="table 'instances' lacks code_version, .*trace_context, trace_caller"):
        Journal(url)
    assert main(["ls", "--database-url", url]) == 2
    assert "created by an older dynwf-ray" in capsys.readouterr().err


# -- issue 9: the complete CLI ---------------------------------------------------------


def run(url: str, capsys, *args: str) -> tuple[int, str, str]:
    """`dynwf ARGS --database-url URL`: (exit status, stdout, stderr)."""
    rc = main([*args, "--database-url", url])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(url: str, capsys, *args: str):
    rc, out, err = run(url, capsys, *args, "--json")
    assert rc == 0, err
    return json.loads(out)


def assert_aligned(lines: list[str]) -> None:
    """Every column starts where its header does (columns are 2+ spaces apart)."""
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", lines[0])]
    assert len(starts) > 2, lines[0]
    for line in lines[1:]:
        for at in starts:
            assert line[at] != " " and (at == 0 or line[at - 2: at] == "  "), (lines[0], line)


def test_trigger_and_the_lifecycle_commands(shared_journal_url, journal, tenant, capsys):
    journal.save_code(tenant, "v1", "test", b"", 1.0)
    url = shared_journal_url
    doc = run_json(url, capsys, "trigger", tenant, "--id", "life", "--params", '{"n": [1, 2]}')
    assert doc == {"tenant": tenant, "id": "life", "outcome": "created"}
    assert json.loads(journal.get_instance(tenant, "life").params_json) == {"n": [1, 2]}
    rc, out, _ = run(url, capsys, "trigger", tenant)
    new_id = out.strip().removeprefix(f"created {tenant}/")
    assert rc == 0 and journal.get_instance(tenant, new_id).params_json == "null"

    def status_after(*args):
        return run_json(url, capsys, *args, "life", "--tenant", tenant)["status"]

    assert status_after("pause") == "paused"
    assert status_after("resume") == "queued"
    assert status_after("terminate") == "terminated"
    assert status_after("restart") == "queued"
    rc, out, _ = run(url, capsys, "terminate", "life", "--rollback")  # --tenant is optional
    assert rc == 0 and f"terminating {tenant}/life" in out and "(now queued)" in out
    assert journal.get_instance(tenant, "life").lease_token > 0  # fenced, due for its rollback

    rc, _, err = run(url, capsys, "trigger", tenant, "--id", "life")
    assert rc == 2 and "already has an instance with id 'life'" in err
    rc, _, err = run(url, capsys, "trigger", tenant, "--params", "{nope")
    assert rc == 2 and "--params is not valid JSON" in err
    rc, _, err = run(url, capsys, "restart", "life", "--from-step", "charge")
    assert rc == 2 and "--from-step 'charge' is not NAME:COUNT" in err
    rc, _, err = run(url, capsys, "restart", "life", "--from-step", "charge:1")
    assert rc == 2 and "has no recorded step 'charge' (count 1)" in err
    rc, _, err = run(url, capsys, "trigger", tenant + "x")
    assert rc == 2 and tenant + "x" in err


def test_describe_shows_an_instance_and_its_steps(shared_journal_url, journal, tenant, capsys):
    done = Driver(journal, tenant, ThreeSteps)
    done.binding.create(id="three", params={"a": 1})
    done.tick()
    flaky = Driver(journal, tenant, Flaky)
    flaky.binding.create(id="flaky")
    flaky.tick()  # attempt 1 failed: retrying

    doc = run_json(shared_journal_url, capsys, "describe", "three")
    assert doc["status"] == "complete" and doc["output"] == 3 and doc["params"] == {"a": 1}
    assert [(s["name"], s["count"], s["kind"], s["status"], s["result"]) for s in doc["steps"]] == [
        ("a", 1, "do", "complete", 1), ("b", 1, "do", "complete", 2), ("c", 1, "do", "complete", 3)]

    rc, out, _ = run(shared_journal_url, capsys, "describe", "flaky", "--tenant", tenant)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"instance   {tenant}/flaky" and lines[1] == "status     waiting"
    table = lines[lines.index("") + 1:]
    assert table[0].split() == ["STEP", "COUNT", "KIND", "STATUS", "ATTEMPTS", "STARTED", "(UTC)",
                                "DURATION", "RESULT", "/", "ERROR"]
    assert_aligned(table)
    assert re.search(r"^charge\s+1\s+do\s+retrying\s+1\s+\S+ \S+\s+-\s+RuntimeError: card declined "
                     r"\(attempt 1\)$", table[1]), table[1]


def test_ls_pages_with_a_cursor_and_filters_by_creation_time(shared_journal_url, journal, tenant, capsys):
    journal.save_code(tenant, "v1", "test", b"", 1.0)
    now = time.time()
    ages = {"d3": 3 * 86400, "h2": 7200, "m30": 1800, "m5": 300, "s10": 10}
    for iid, age in ages.items():  # created oldest first
        WorkflowBinding(journal, tenant, clock=lambda age=age: now - age).create(id=iid)

    pages, cursor = [], None
    while True:
        args = ["ls", "--tenant", tenant, "--limit", "2"] + (["--cursor", cursor] if cursor else [])
        doc = run_json(shared_journal_url, capsys, *args)
        pages.append([i["id"] for i in doc["instances"]])
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    assert pages == [["s10", "m5"], ["m30", "h2"], ["d3"]]
    assert doc["counts"] == {"queued": 5}
    assert set(doc["instances"][0]) == {"tenant", "id", "status", "version", "created_at",
                                        "updated_at", "error"}

    def ids(*args):
        return [i["id"] for i in run_json(shared_journal_url, capsys, "ls", "--tenant", tenant, *args)["instances"]]

    assert ids("--since", "1h") == ["s10", "m5", "m30"]
    assert ids("--since", "1d", "--until", "10m") == ["m30", "h2"]
    iso = datetime.fromtimestamp(now - 3600, tz=timezone.utc).replace(tzinfo=None).isoformat()
    assert ids("--until", iso) == ["h2", "d3"]  # no zone: UTC
    assert ids("--until", datetime.fromtimestamp(now - 3600).astimezone().isoformat()) == ["h2", "d3"]

    rc, out, _ = run(shared_journal_url, capsys, "ls", "--tenant", tenant, "--limit", "3")
    lines = out.splitlines()
    assert rc == 0 and lines[4] == f"next page: --cursor {journal.get_instance(tenant, 'm30').pk}"
    assert_aligned(lines[:4])
    assert "in all: 5 queued" in out
    rc, _, err = run(shared_journal_url, capsys, "ls", "--since", "last week")
    assert rc == 2 and "--since 'last week' is not a time" in err
    rc, _, err = run(shared_journal_url, capsys, "ls", "--cursor", "abc")
    assert rc == 2 and "--cursor 'abc' is not a cursor" in err


def test_columns_line_up_whatever_the_widths():
    lines = _table(("A", "LONG HEADER", "C"), [("x" * 12, None, "z"), ("y", "mid", "")])
    assert lines == ["A             LONG HEADER  C",
                     "xxxxxxxxxxxx  -            z",
                     "y             mid"]
    assert _table(None, [("key", "value"), ("longer key", 1)]) == ["key         value",
                                                                    "longer key  1"]


def test_token_lifecycle(shared_journal_url, journal, tenant, capsys):
    url = shared_journal_url
    rc, out, err = run(url, capsys, "token", "create", "--tenant", tenant, "--json", "--name", "deploy")
    created = json.loads(out)
    assert rc == 0 and "only time its secret is shown" in err
    secret = created.pop("secret")
    assert created == {"token_id": created["token_id"], "tenant": tenant, "admin": False,
                       "name": "deploy", "created_at": created["created_at"], "revoked_at": None}
    assert journal.find_token(secret).token_id == created["token_id"]

    rc, out, err = run(url, capsys, "token", "create", "--admin")
    admin_secret = out.strip()  # the secret alone: TOKEN=$(dynwf token create ...)
    assert rc == 0 and "only time" in err and journal.find_token(admin_secret).tenant_id is None

    listed = run_json(url, capsys, "token", "ls", "--tenant", tenant)
    assert listed == {"tokens": [created]}
    rc, out, _ = run(url, capsys, "token", "ls")
    assert secret not in out and admin_secret not in out
    assert_aligned(out.splitlines())
    assert re.search(rf"^{created['token_id']}\s+{tenant}\s+deploy\s", out, re.M)

    revoked = run_json(url, capsys, "token", "revoke", created["token_id"])
    assert revoked["revoked_at"] is not None and journal.find_token(secret) is None
    rc, out, _ = run(url, capsys, "token", "revoke", created["token_id"])  # again: fine
    assert rc == 0 and f"revoked token {created['token_id']}" in out
    rc, _, err = run(url, capsys, "token", "revoke", "0000000000")
    assert rc == 2 and "no API token with id '0000000000'" in err
    rc, _, err = run(url, capsys, "token", "create", "--tenant", "no such tenant")
    assert rc == 2 and "tenant id 'no such tenant' is invalid" in err
    with pytest.raises(SystemExit):  # one of --admin, --tenant
        main(["token", "create", "--database-url", url])


def test_webhook_secret_set_and_clear(shared_journal_url, journal, tenant, capsys):
    rc, out, err = run(shared_journal_url, capsys, "webhook-secret", "set", tenant)
    secret = out.strip()
    assert rc == 0 and re.fullmatch(r"[0-9a-f]{64}", secret) and "only time" in err
    assert journal.webhook_secret(tenant) == secret
    doc = run_json(shared_journal_url, capsys, "webhook-secret", "set", tenant)
    assert doc["secret"] != secret and journal.webhook_secret(tenant) == doc["secret"]
    doc = run_json(shared_journal_url, capsys, "webhook-secret", "clear", tenant)
    assert doc == {"tenant": tenant, "secret": None} and journal.webhook_secret(tenant) is None


def test_logs_as_one_document_or_one_object_per_line(shared_journal_url, journal, tenant, capsys):
    journal.save_code(tenant, "v1", "test", b"", 1.0)
    WorkflowBinding(journal, tenant).create(id="talky")
    pk = journal.get_instance(tenant, "talky").pk
    journal.append_logs(pk, [LogLine(at=10.0 + n, stream="stdout", step="s", count=1, attempt=1,
                                     message=f"line {n}") for n in range(3)], keep=100)
    doc = run_json(shared_journal_url, capsys, "logs", "talky")
    assert [line["message"] for line in doc["lines"]] == ["line 0", "line 1", "line 2"]
    journal.terminate(tenant, "talky", time.time())  # so -f ends
    rc, out, _ = run(shared_journal_url, capsys, "logs", "talky", "-f", "--json")
    assert rc == 0
    assert [json.loads(line)["message"] for line in out.splitlines()] == ["line 0", "line 1", "line 2"]


def test_every_command_answers_in_json(shared_journal_url, journal, tenant, capsys):
    journal.save_code(tenant, "v1", "test", b"", 1.0)
    WorkflowBinding(journal, tenant).create(id="j1")
    url = shared_journal_url
    assert run_json(url, capsys, "versions", tenant)["versions"][0]["latest"] is True
    assert run_json(url, capsys, "status", "j1")["status"] == "queued"
    assert run_json(url, capsys, "send-event", "j1", "go", "{}") == {"tenant": tenant, "id": "j1",
                                                                      "type": "go"}
    assert run_json(url, capsys, "db", "current")["at_head"] is True
    assert run_json(url, capsys, "db", "upgrade")["changed"] is False
    rc, out, _ = run(url, capsys, "health", "--json")  # no engine runs: not ready, exit 1
    assert rc == 1 and json.loads(out)["journal"] == "ok"
    assert main(["--json", "--database-url", url, "delete", "j1"]) == 0  # --json before the command
    assert json.loads(capsys.readouterr().out) == {"tenant": tenant, "id": "j1", "deleted": True}
    rc, out, err = run(url, capsys, "describe", "j1", "--json")
    assert rc == 2 and out == "" and "no instance 'j1'" in err  # errors: stderr, never stdout


def test_push_shows_its_stages(shared_journal_url, tenant, capsys, monkeypatch, tmp_path):
    import ray

    modes = []

    def fake_push(journal, tenant_id, path, now, sandbox_mode, progress=None):
        modes.append(sandbox_mode)
        progress("packaging")
        progress("validating in its runtime env")
        return "v-1234"

    monkeypatch.setattr(cli, "push", fake_push)
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    doc = run_json(shared_journal_url, capsys, "push", tenant, str(tmp_path))
    assert doc["tenant"] == tenant and doc["version"] == "v-1234"
    rc, out, err = run(shared_journal_url, capsys, "push", tenant, str(tmp_path))
    assert rc == 0 and out.startswith(f"pushed {tenant} v-1234 (")
    assert err.splitlines() == [f"dynwf: push {tenant}: {stage}" for stage in
                                ("starting Ray", "packaging", "validating in its runtime env")]
    run_json(shared_journal_url, capsys, "push", tenant, str(tmp_path), "--sandbox", "process")
    assert modes == ["strict", "strict", "process"]


def test_push_tells_its_stages(journal, tenant, tmp_path):
    """Content validated before is stored without validating again (so without Ray here)."""
    (tmp_path / "workflow.py").write_text("X = 1\n")
    package = build_package(tmp_path)
    journal.save_code(tenant + "x", package.version, PACKAGE, package.blob, 1.0)
    stages = []
    assert push(journal, tenant, tmp_path, 2.0, progress=stages.append) == package.version
    assert stages == ["packaging", "storing"]
    assert journal.latest_version(tenant) == package.version


def test_progress_on_a_terminal_redraws_one_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    with cli._Progress(screen, "push acme", interval=60) as progress:
        progress("packaging")
        progress("storing")
    drawn = screen.getvalue()
    assert re.match(r"\r\x1b\[K\| push acme: packaging \(\d+\.\d s\)\r\x1b\[K/ push acme: storing "
                    r"\(\d+\.\d s\)", drawn), drawn
    assert drawn.endswith("\r\x1b[K") and "\n" not in drawn


def test_serve_starts_the_server_with_its_options(shared_journal_url, capsys, monkeypatch):
    calls = []
    server = types.ModuleType("dynwf_ray.server")
    server.serve = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "dynwf_ray.server", server)
    args = ["serve", "--port", "9999", "--trace-url", "https://traces/{trace_id}", "--code-limit", "1024",
            "--sandbox", "process"]
    doc = run_json(shared_journal_url, capsys, *args)
    assert doc["url"] == "http://127.0.0.1:9999/"
    assert calls == [dict(database_url=shared_journal_url, host="127.0.0.1", port=9999,
                          trace_url="https://traces/{trace_id}", code_limit=1024, ray_address=None,
                          sandbox="process")]
    rc, _, err = run(shared_journal_url, capsys, "serve", "--code-limit", "0")
    assert rc == 2 and "--code-limit must be a positive number of bytes" in err and len(calls) == 1
    run_json(shared_journal_url, capsys, "serve", "--control-resource", "dynwf-control")
    assert calls[-1]["control_resources"] == {"dynwf-control": 0.01}
