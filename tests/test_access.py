"""The journal's side of the HTTP API (`journal/access.py`, `list_instances`' paging,
`list_tenants`): tokens stored only as hashes, revocation, webhook secrets."""

from __future__ import annotations

import hashlib
import re

import pytest
import sqlalchemy as sa

from dynwf_ray.binding import WorkflowBinding
from dynwf_ray.errors import InvalidInputError
from dynwf_ray.journal import Journal, TokenInfo, UnknownTokenError


def _token_rows(journal: Journal, token_id: str) -> list[dict]:
    with journal.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            sa.text("SELECT * FROM api_tokens WHERE token_id = :t"), {"t": token_id})]


def test_a_token_is_found_by_its_secret_until_revoked(journal, tenant):
    info, secret = journal.create_token(tenant, "ci deploys", 10.0)
    assert re.fullmatch(r"dwf_[A-Za-z0-9_-]{43}", secret)
    assert re.fullmatch(r"[0-9a-f]{8,12}", info.token_id)
    assert info == TokenInfo(info.token_id, tenant, "ci deploys", 10.0, None)
    assert journal.find_token(secret) == info
    assert journal.find_token(secret + "x") is None
    assert journal.find_token("dwf_" + "A" * 43) is None
    assert journal.find_token("") is None

    revoked = journal.revoke_token(info.token_id, 20.0)
    assert revoked == TokenInfo(info.token_id, tenant, "ci deploys", 10.0, 20.0)
    assert journal.find_token(secret) is None
    assert journal.revoke_token(info.token_id, 30.0).revoked_at == 20.0  # again: unchanged
    with pytest.raises(UnknownTokenError, match="no API token with id 'nope'"):
        journal.revoke_token("nope", 30.0)


def test_the_journal_keeps_only_the_hash_of_a_secret(journal, tenant):
    info, secret = journal.create_token(tenant, "reader", 1.0)
    (row,) = _token_rows(journal, info.token_id)
    assert row["token_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    random_part = secret.removeprefix("dwf_")
    assert not any(random_part in str(value) for value in row.values())


def test_admin_and_tenant_tokens_are_listed_without_secrets(journal, tenant):
    other = tenant + "x"
    admin, _ = journal.create_token(None, "ops", 1.0)
    mine, _ = journal.create_token(tenant, "a", 2.0)
    theirs, _ = journal.create_token(other, "b", 3.0)
    assert admin.tenant_id is None
    assert journal.list_tokens(tenant) == [mine]
    assert journal.list_tokens(other) == [theirs]
    everything = journal.list_tokens()
    assert {admin, mine, theirs} <= set(everything)
    assert len({t.token_id for t in everything}) == len(everything)
    journal.revoke_token(mine.token_id, 5.0)
    assert journal.list_tokens(tenant)[0].revoked_at == 5.0  # still listed, as revoked


@pytest.mark.parametrize("tenant_id, name, error", [
    ("bad tenant!", "n", "tenant id 'bad tenant!' is invalid"),
    ("ok", "", "token name '' is invalid"),
    ("ok", "   ", "token name '   ' is invalid"),
    ("ok", "n" * 101, "token name 'nnn"),
])
def test_bad_tenant_ids_and_names_are_refused(journal, tenant_id, name, error):
    with pytest.raises(InvalidInputError, match=re.escape(error)):
        journal.create_token(tenant_id, name, 1.0)


def test_webhook_secrets_are_set_replaced_and_cleared(journal, tenant):
    assert journal.webhook_secret(tenant) is None
    journal.set_webhook_secret(tenant, "s1", 1.0)
    journal.set_webhook_secret(tenant, "s2", 2.0)
    assert journal.webhook_secret(tenant) == "s2"
    assert journal.webhook_secret(tenant + "x") is None
    journal.set_webhook_secret(tenant, None, 3.0)
    assert journal.webhook_secret(tenant) is None
    with pytest.raises(InvalidInputError, match="must be 1-256 characters"):
        journal.set_webhook_secret(tenant, "", 4.0)
    with pytest.raises(InvalidInputError, match="tenant id '../x' is invalid"):
        journal.set_webhook_secret("../x", "s", 4.0)


def test_instances_are_listed_newest_first_in_pages_and_by_creation_time(journal, tenant):
    journal.save_code(tenant, "v1", "test", b"", 1.0)
    clock = iter(range(100, 110))
    binding = WorkflowBinding(journal, tenant, clock=lambda: float(next(clock)))
    for n in range(7):  # created at 100 ... 106
        binding.create(id=f"i{n}")

    pages, cursor = [], None
    while True:
        page = journal.list_instances(tenant, limit=3, before_pk=cursor)
        if not page:
            break
        pages.append([i.instance_id for i in page])
        cursor = page[-1].pk
    assert pages == [["i6", "i5", "i4"], ["i3", "i2", "i1"], ["i0"]]

    def ids(**kw):
        return [i.instance_id for i in journal.list_instances(tenant, **kw)]

    assert ids(created_after=104.0) == ["i6", "i5", "i4"]  # at or after
    assert ids(created_before=102.0) == ["i1", "i0"]  # strictly before
    assert ids(created_after=101.0, created_before=104.0, limit=2) == ["i3", "i2"]
    assert ids(status="queued", created_after=106.0) == ["i6"]
    assert ids(status="complete") == []
    # the positional form older callers use
    assert [i.instance_id for i in journal.list_instances(tenant, None, 2)] == ["i6", "i5"]


def test_tenants_are_listed_with_their_latest_version(journal, tenant):
    journal.save_code(tenant + "b", "v1", "test", b"", 1.0)
    journal.save_code(tenant + "a", "v1", "test", b"", 2.0)
    journal.save_code(tenant + "a", "v2", "test", b"2", 3.0)
    journal.set_tenant_telemetry(tenant + "c", None, 4.0)  # a tenant row without code
    mine = [t for t in journal.list_tenants() if t[0].startswith(tenant)]
    assert mine == [(tenant + "a", "v2", 3.0), (tenant + "b", "v1", 1.0)]
