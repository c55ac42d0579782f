"""The dynwf command against a journal (no engine needed for ls/status/send-event)."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from dynwf_ray import JournalSchemaError
from dynwf_ray.binding import WorkflowBinding
from dynwf_ray.cli import main
from dynwf_ray.journal import Journal


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
