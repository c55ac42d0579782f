"""The HTTP API (`dynwf serve`) on SQLite and PostgreSQL: every route, the auth matrix
(admin, own tenant, other tenant, none), and the bad inputs of issue 9, through
FastAPI's TestClient against the shared engine."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import select
import socket
import time
import uuid
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dynwf_ray.server import ServerSettings, create_app, serving
from dynwf_ray.server.limits import JSON_LIMIT

from .conftest import wait_until
from .workflows import Hello, Observed

OPENAPI_DOC = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


class Api:
    """Two tenants with a waiting instance each, and a token per kind of caller."""

    def __init__(self, engine):
        self.engine = engine
        self.client = TestClient(create_app(
            engine, ServerSettings(trace_url="http://traces.example/{tenant}/{trace_id}")))
        self.a, self.b = (f"h{uuid.uuid4().hex[:10]}" for _ in range(2))
        now = time.time()
        journal = engine.journal
        self.tokens = {
            "admin": journal.create_token(None, "test admin", now)[1],
            "own": journal.create_token(self.a, "a", now)[1],
            "other": journal.create_token(self.b, "b", now)[1],
        }
        for tenant in (self.a, self.b):
            engine.register(tenant, Observed)
            engine.binding(tenant).create(id="waiting")

    def call(self, who: str | None, method: str, path: str, **kw):
        headers = kw.pop("headers", {})
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        return self.client.request(method, path, headers=headers, **kw)

    def wait_status(self, tenant: str, id: str, status: str, timeout: float = 60) -> dict:
        box = {}

        def check():
            box["d"] = self.call("admin", "GET", f"/v1/tenants/{tenant}/instances/{id}").json()
            return box["d"]["status"] == status

        wait_until(check, timeout, f"{tenant}/{id} to be {status} (last: {box.get('d')})")
        return box["d"]


@pytest.fixture
def api(engine) -> Api:
    return Api(engine)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"name", "message"}, body
    return body["error"]


def test_an_instance_runs_through_the_api_to_completion(api):
    base = f"/v1/tenants/{api.a}/instances"
    r = api.call("own", "POST", base, json={"id": "order-1", "params": {"n": 1}})
    assert r.status_code == 201, r.text
    assert r.json() == {"tenant": api.a, "id": "order-1", "outcome": "created", "error": None}
    detail = api.wait_status(api.a, "order-1", "waiting")
    assert detail["params"] == {"n": 1} and detail["version"].startswith("v-")
    assert len(detail["trace_id"]) == 32
    assert detail["trace_url"] == f"http://traces.example/{api.a}/{detail['trace_id']}"

    r = api.call("own", "POST", f"{base}/order-1/events", json={"type": "approval", "payload": {"by": "ann"}})
    assert r.status_code == 202, r.text
    done = api.wait_status(api.a, "order-1", "complete")
    assert set(done["output"]) == {"before", "after"} and done["error"] is None

    steps = api.call("own", "GET", f"{base}/order-1/steps").json()["steps"]
    by_name = {s["name"]: s for s in steps}
    assert by_name["charge"]["attempts"] == 2 and by_name["charge"]["result"] == 2
    assert by_name["approval"]["kind"] == "wait" and by_name["approval"]["count"] == 1
    assert all(s["status"] == "complete" and s["finished_at"] >= s["started_at"] for s in steps)

    lines = api.call("own", "GET", f"{base}/order-1/logs").json()
    texts = [line["message"] for line in lines["lines"]]
    assert "charging, attempt 1" in texts and "approved by ann" in texts
    newer = api.call("own", "GET", f"{base}/order-1/logs", params={"after": lines["next_after"]})
    assert newer.json()["lines"] == []

    with api.client.stream("GET", f"{base}/order-1/logs/stream",
                           headers={"Authorization": f"Bearer {api.tokens['own']}"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        body = "".join(stream.iter_text())
    events = [block for block in body.split("\n\n") if block.strip()]
    assert events[-1] == 'event: end\ndata: {"status": "complete"}'
    logged = [json.loads(e.split("data: ", 1)[1])["message"] for e in events if e.startswith("event: log")]
    assert logged == texts


def test_lifecycle_routes(api):
    base = f"/v1/tenants/{api.a}/instances/waiting"
    api.wait_status(api.a, "waiting", "waiting")
    assert api.call("own", "POST", f"{base}/pause").status_code == 202
    api.wait_status(api.a, "waiting", "paused")
    assert api.call("own", "POST", f"{base}/resume").status_code == 202
    api.wait_status(api.a, "waiting", "waiting")
    trace_before = api.call("own", "GET", base).json()["trace_id"]
    r = api.call("own", "POST", f"{base}/restart", json={"from_step": {"name": "charge", "count": 1}})
    assert r.status_code == 202, r.text
    assert api.call("own", "GET", base).json()["trace_id"] != trace_before  # it runs again, in a new trace
    kept = [s["name"] for s in api.call("own", "GET", f"{base}/steps").json()["steps"]]
    assert kept[0] == "pid before"  # recorded before charge: kept
    r = api.call("own", "POST", f"{base}/terminate", json={"rollback": False})
    assert r.status_code == 202 and r.json()["status"] == "terminated"
    r = api.call("own", "POST", f"{base}/pause")
    assert r.status_code == 409 and error_of(r)["name"] == "InvalidStateError"
    assert api.call("own", "DELETE", base).status_code == 204
    assert api.call("own", "GET", base).status_code == 404


def test_auth_matrix(api):
    a_inst, b_inst = f"/v1/tenants/{api.a}/instances/waiting", f"/v1/tenants/{api.b}/instances/waiting"
    routes = [
        ("GET", a_inst, None), ("GET", f"{a_inst}/steps", None), ("GET", f"{a_inst}/logs", None),
        ("POST", f"{a_inst}/events", {"type": "x"}), ("POST", f"{a_inst}/pause", None),
        ("GET", f"/v1/tenants/{api.a}/instances", None), ("GET", f"/v1/tenants/{api.a}/versions", None),
        ("POST", f"/v1/tenants/{api.a}/instances", {"params": 1}),
    ]
    # the routes that change or end the instance: refused to the other tenant and to
    # nobody here (test_lifecycle_routes runs them with the own tenant's token)
    refused_only = [
        ("POST", f"{a_inst}/resume", None), ("POST", f"{a_inst}/terminate", {"rollback": False}),
        ("POST", f"{a_inst}/restart", None), ("DELETE", a_inst, None),
        ("GET", f"{a_inst}/logs/stream", None),
        ("POST", f"/v1/tenants/{api.a}/instances/batch", {"items": [{}]}),
    ]
    for method, path, body in routes + refused_only:
        kw = {"json": body} if body is not None else {}
        if (method, path, body) in routes:
            assert api.call("admin", method, path, **kw).status_code < 300, (method, path)
            assert api.call("own", method, path, **kw).status_code < 300, (method, path)
        r = api.call("other", method, path, **kw)
        assert r.status_code == 404, (method, path, r.text)
        r = api.call(None, method, path, **kw)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path)
        assert error_of(r)["name"] == "Unauthorized"
    assert api.call("own", "GET", a_inst).json()["status"] != "terminated"  # nothing got through
    # tenant-independent routes need a token too, and answer every caller
    for path in ("/v1/whoami", "/v1/tenants", "/v1/instances", "/v1/stats", "/v1/config"):
        assert api.call(None, "GET", path).status_code == 401, path
        assert api.call("own", "GET", path).status_code == 200, path
    assert api.call("own", "GET", "/v1/config").json() == {
        "trace_url": "http://traces.example/{tenant}/{trace_id}"}

    # another tenant's instance is exactly an unknown id of a reachable tenant
    foreign = api.call("own", "GET", b_inst)
    unknown = api.call("other", "GET", f"/v1/tenants/{api.b}/instances/no-such-id")
    assert foreign.status_code == unknown.status_code == 404
    assert error_of(foreign)["name"] == error_of(unknown)["name"] == "InstanceNotFoundError"
    assert error_of(foreign)["message"] == f"no instance 'waiting' for tenant {api.b!r}"
    nobody = api.call("own", "GET", f"/v1/tenants/{api.b}x/instances/waiting")
    assert error_of(nobody)["message"] == f"no instance 'waiting' for tenant '{api.b}x'"

    # tenant tokens see only their own tenant in listings and stats
    listed = api.call("own", "GET", "/v1/instances").json()["instances"]
    assert listed and {i["tenant"] for i in listed} == {api.a}
    assert api.call("own", "GET", "/v1/instances", params={"tenant": api.b}).status_code == 404
    assert {t["tenant"] for t in api.call("own", "GET", "/v1/tenants").json()["tenants"]} == {api.a}
    admin_tenants = {t["tenant"] for t in api.call("admin", "GET", "/v1/tenants").json()["tenants"]}
    assert {api.a, api.b} <= admin_tenants
    stats = api.call("own", "GET", "/v1/stats").json()
    assert set(stats["by_tenant"]) == {api.a} and stats["activations"] is None
    admin_stats = api.call("admin", "GET", "/v1/stats").json()
    assert {api.a, api.b} <= set(admin_stats["by_tenant"]) and admin_stats["activations"] >= 1
    assert api.call("own", "GET", "/v1/whoami").json() == {
        "admin": False, "tenant": api.a, "token_id": api.engine.journal.find_token(api.tokens["own"]).token_id}

    # a wrong token, a malformed header, a revoked token: 401
    for header in ("Bearer dwf_nope", "Basic abc", "Bearer", "token"):
        r = api.client.get("/v1/whoami", headers={"Authorization": header})
        assert r.status_code == 401, header
    info = api.engine.journal.find_token(api.tokens["other"])
    api.engine.journal.revoke_token(info.token_id, time.time())
    assert api.call("other", "GET", "/v1/whoami").status_code == 401
    # admin-only: pushing code
    r = api.call("own", "PUT", f"/v1/tenants/{api.a}/code", content=b"PK\x03\x04",
                 headers={"Content-Type": "application/zip"})
    assert r.status_code == 403 and error_of(r)["name"] == "Forbidden"
    # health needs no token
    assert api.client.get("/v1/health").json() == {"live": True}
    ready = api.client.get("/v1/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_bad_input_is_a_clear_4xx(api):
    base = f"/v1/tenants/{api.a}/instances"
    cases = [
        # (method, path, kwargs, status, error name)
        ("POST", base, {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
         400, "MalformedJSON"),
        ("POST", base, {"content": b'{"id": "x"}', "headers": {"Content-Type": "text/plain"}},
         415, "UnsupportedMediaType"),
        ("POST", base, {"json": {"id": "x", "colour": "red"}}, 422, "ValidationError"),
        ("POST", base, {"json": {"id": "../../etc"}}, 400, "InvalidInputError"),
        ("POST", base, {"json": {"params": "x" * (1024 * 1024)}}, 413, "PayloadTooLargeError"),
        ("POST", base, {"content": b"x" * (JSON_LIMIT + 1), "headers": {"Content-Type": "application/json"}},
         413, "PayloadTooLarge"),
        ("GET", f"{base}/bad%20id", {}, 400, "InvalidInputError"),
        ("GET", f"{base}/..%2F..%2Fetc", {}, 404, "NotFound"),  # no route has that many parts
        ("GET", f"{base}/%2e%2e", {}, 400, "InvalidInputError"),
        ("GET", f"/v1/tenants/..%2F{api.a}/instances", {}, 404, "NotFound"),
        ("GET", "/v1/tenants/%2e%2e/instances", {}, 400, "InvalidInputError"),
        ("GET", f"{base}/nope", {}, 404, "InstanceNotFoundError"),
        ("POST", "/v1/tenants/nobody-here/instances", {"json": {}}, 404, "UnknownTenantError"),
        ("GET", base, {"params": {"cursor": "abc"}}, 422, "ValidationError"),
        ("GET", base, {"params": {"limit": 0}}, 422, "ValidationError"),
        ("GET", base, {"params": {"status": "sleepy"}}, 422, "ValidationError"),
        ("POST", f"{base}/waiting/events", {"json": {"type": ""}}, 400, "InvalidInputError"),
        ("POST", f"{base}/waiting/restart", {"json": {"from_step": {"name": "a", "count": 0}}},
         422, "ValidationError"),
        ("GET", "/v1/no-such-route", {}, 404, "NotFound"),
        ("DELETE", base, {}, 405, "MethodNotAllowed"),
    ]
    for method, path, kw, status, name in cases:
        r = api.call("admin", method, path, **kw)
        assert (r.status_code, error_of(r)["name"]) == (status, name), (method, path, r.text[:300])
    # a duplicate id
    assert api.call("admin", "POST", base, json={"id": "dup"}).status_code == 201
    r = api.call("admin", "POST", base, json={"id": "dup"})
    assert r.status_code == 409 and error_of(r)["name"] == "DuplicateInstanceError"


def test_an_oversized_body_is_refused_before_it_is_read_whole(api):
    """A chunked body (no Content-Length) sent to a real server is answered 413 once the
    limit is passed, while the client still has most of it to send."""
    chunk, total = b"x" * 65536, 64
    with serving(api.client.app) as base, socket.create_connection(
            ("127.0.0.1", int(base.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            f"POST /v1/tenants/{api.a}/instances HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {api.tokens['admin']}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode())
        sent = 0
        while sent < total and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            if sent * len(chunk) > JSON_LIMIT:  # give the server time to answer
                select.select([sock], [], [], 5)
        answer = _read_response(sock)
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert '"PayloadTooLarge"' in answer
    assert JSON_LIMIT // len(chunk) <= sent < total


def _read_response(sock) -> str:
    """One HTTP response (headers and its Content-Length of body) from `sock`."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"content-length: (\d+)", head, re.I)
            if length and len(body) >= int(length.group(1)):
                return data.decode("latin-1")
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            part = b""
        if not part:
            return data.decode("latin-1")
        data += part


def test_batches_and_paging(api):
    base = f"/v1/tenants/{api.a}/instances"
    items = [{"id": f"p{i}", "params": i} for i in range(7)] + [{"id": "p0"}, {"id": "bad id"}]
    r = api.call("own", "POST", f"{base}/batch", json={"items": items})
    assert r.status_code == 200, r.text
    outcomes = [(i["id"], i["outcome"]) for i in r.json()["items"]]
    assert outcomes[:7] == [(f"p{i}", "created") for i in range(7)]
    assert outcomes[7] == ("p0", "existed") and r.json()["items"][8]["outcome"] == "invalid"
    r = api.call("own", "POST", f"{base}/batch", json={"items": [{}] * 101})
    assert r.status_code == 422
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"params": ' + b"1" * 5000 + b"}"):
        r = api.call("own", "POST", base, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and error_of(r)["name"] == "MalformedJSON", r.text

    seen, cursor = [], None
    while True:
        page = api.call("own", "GET", base, params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen += [i["id"] for i in page["instances"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen[:7] == [f"p{i}" for i in reversed(range(7))] and seen[-1] == "waiting"
    assert len(seen) == len(set(seen)) == 8

    created = {i["id"]: i["created_at"] for i in api.call("own", "GET", base, params={"limit": 100}).json()["instances"]}
    after = created["p3"]
    newer = api.call("own", "GET", base, params={"created_after": after, "limit": 100}).json()["instances"]
    assert {i["id"] for i in newer} == {k for k, v in created.items() if v >= after}
    older = api.call("own", "GET", base, params={"created_before": after, "limit": 100}).json()["instances"]
    assert {i["id"] for i in older} == {k for k, v in created.items() if v < after} == {"waiting"}
    api.wait_status(api.a, "waiting", "waiting")
    waiting = api.call("own", "GET", base, params={"status": "waiting", "limit": 100}).json()["instances"]
    assert "waiting" in {i["id"] for i in waiting} and all(i["status"] == "waiting" for i in waiting)
    # Every instance of the tenant waits for an approval: none is complete.
    assert api.call("own", "GET", base, params={"status": "complete"}).json()["instances"] == []


def _sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_signed_webhooks_start_instances(api, engine):
    tenant = api.a
    engine.register(tenant, Hello)
    secret = uuid.uuid4().hex
    engine.journal.set_webhook_secret(tenant, secret, time.time())
    body = json.dumps({"name": "hook"}).encode()
    url = f"/v1/webhooks/{tenant}"
    headers = {"Content-Type": "application/json", "X-Dynwf-Delivery": "d-1"}

    r = api.client.post(url, content=body, headers={**headers, "X-Dynwf-Signature-256": _sign(secret, body)})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "wh-d-1" and r.json()["outcome"] == "created"
    assert api.wait_status(tenant, "wh-d-1", "complete")["output"]["hello"] == "Hello, hook!"
    again = api.client.post(url, content=body, headers={**headers, "X-Dynwf-Signature-256": _sign(secret, body)})
    assert again.status_code == 200 and again.json()["outcome"] == "existed"

    # a code host's push hook, pointed straight at the URL, signs under its own names
    hub = api.client.post(url, content=body, headers={
        "Content-Type": "application/json", "X-GitHub-Delivery": "d-2",
        "X-Hub-Signature-256": _sign(secret, body)})
    assert hub.status_code == 201 and hub.json()["id"] == "wh-d-2", hub.text

    refused = [
        {**headers, "X-Dynwf-Signature-256": _sign("wrong", body)},
        {**headers, "X-Dynwf-Signature-256": _sign(secret, body + b" ")},
        headers,
    ]
    answers = set()
    for h in refused:
        r = api.client.post(url, content=body, headers=h)
        assert r.status_code == 401 and error_of(r)["name"] == "Unauthorized"
        answers.add((r.status_code, r.text))
    assert len(answers) == 1  # no answer tells which check failed
    # a tenant without a secret, an unknown one and a bad tenant id (too long) answer
    # exactly as a bad signature: nothing tells which tenants exist or have a secret
    for other in (api.b, "nobody", "x" * 101):
        r = api.client.post(f"/v1/webhooks/{other}", content=body,
                            headers={**headers, "X-Dynwf-Signature-256": _sign(secret, body)})
        assert {(r.status_code, r.text)} == answers, (other, r.status_code, r.text)
    r = api.client.post(url, content=b"{oops", headers={
        "Content-Type": "application/json", "X-Dynwf-Signature-256": _sign(secret, b"{oops")})
    assert r.status_code == 400 and error_of(r)["name"] == "InvalidInputError"
    deep = b"[" * 100_000 + b"]" * 100_000  # JSON, nested beyond any parser's depth
    r = api.client.post(url, content=deep, headers={
        "Content-Type": "application/json", "X-Dynwf-Signature-256": _sign(secret, deep)})
    assert r.status_code == 400 and "nested too deeply" in error_of(r)["message"], r.text
    blank = []  # a blank delivery id is no delivery id: each gets an instance of its own
    for n in (1, 2):
        body = json.dumps({"name": f"blank {n}"}).encode()
        r = api.client.post(url, content=body, headers={
            "Content-Type": "application/json", "X-Dynwf-Delivery": " ",
            "X-Dynwf-Signature-256": _sign(secret, body)})
        assert r.status_code == 201, r.text
        blank.append(r.json()["id"])
    assert len(set(blank)) == 2 and not any(i.startswith("wh-") for i in blank), blank


def _zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


CODE = (
    "from dynwf_ray import WorkflowEntrypoint\n\n"
    "class Pushed(WorkflowEntrypoint):\n"
    "    async def run(self, event, step):\n"
    "        return await step.do('one', lambda: 'pushed over http')\n"
)


def test_pushing_code_as_an_archive(api, tmp_path):
    tenant = f"h{uuid.uuid4().hex[:10]}"
    url = f"/v1/tenants/{tenant}/code"
    zipped = {"Content-Type": "application/zip"}
    r = api.call("admin", "PUT", url, content=_zip({"app/workflow.py": CODE, "app/dynwf.toml":
                                                  'entrypoint = "workflow:Pushed"\n'}), headers=zipped)
    if r.status_code == 400 and "dynwf.toml" in r.text:
        pytest.fail(f"the manifest format changed: {r.text}")
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    versions = api.call("admin", "GET", f"/v1/tenants/{tenant}/versions").json()["versions"]
    assert [v["version"] for v in versions] == [version] and versions[0]["latest"]
    r = api.call("admin", "POST", f"/v1/tenants/{tenant}/instances", json={"id": "one"})
    assert r.status_code == 201
    assert api.wait_status(tenant, "one", "complete")["output"] == "pushed over http"

    bad = [
        (_zip({"../evil.py": "x"}), "outside its directory"),
        (_zip({"/abs.py": "x"}), "outside its directory"),
        (b"PK\x03\x04 not really", "not a valid zip"),
        (_zip({"workflow.py": "import no_such_module_here\n", "dynwf.toml":
               'entrypoint = "workflow:Pushed"\n'}), "no_such_module_here"),
    ]
    for archive, why in bad:
        r = api.call("admin", "PUT", url, content=archive, headers=zipped)
        assert r.status_code == 400 and why in error_of(r)["message"], r.text
    settings_limit = api.client.app.state.settings.code_limit
    r = api.call("admin", "PUT", url, content=b"0" * (settings_limit + 1), headers=zipped)
    assert r.status_code == 413
    r = api.call("admin", "PUT", url, content=b"abc", headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    # nothing of the refused pushes was stored
    assert len(api.call("admin", "GET", f"/v1/tenants/{tenant}/versions").json()["versions"]) == 1


def test_the_openapi_document_in_docs_is_the_served_one(api):
    served = api.client.get("/openapi.json").json()
    assert served["info"]["title"] == "dynwf-ray"
    assert OPENAPI_DOC.exists(), "run: python -m dynwf_ray.server.openapi > docs/openapi.json"
    assert json.loads(OPENAPI_DOC.read_text()) == served, (
        "docs/openapi.json is stale; regenerate it with python -m dynwf_ray.server.openapi")


def test_the_dashboard_is_served(api):
    page = api.client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    for src in ("/static/app.js", "/static/style.css"):
        assert api.client.get(src).status_code == 200
    assert "https://" not in page.text and "http://" not in page.text  # nothing from elsewhere
