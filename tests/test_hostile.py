"""Hostile tenants: attacks from `run()` and from step callbacks, judged from the trusted side.

One attacker package (`tests/hostile_tenant.py`, written into a tmp dir as the
tenant's `workflow.py`, with a `sitecustomize.py` and a `dynwf.toml` of its own)
is pushed once per backend and shared by a few attacker tenants that differ
only in the policy the platform gives them (small limits; egress to one
loopback server; room for a 1 GiB string; ...). A victim tenant runs beside
them: one finished instance whose journal rows are snapshotted, and one that
holds a live sandbox with a secret in its scratch directory for the whole module.

Each attack runs in its own instance, as data in `params`. Verdicts come from
outside the sandbox wherever there is an outside to look at: files that must
not exist, a TCP listener that must never accept, processes that must still
live (same pid, same start time), the victim's journal rows compared byte for
byte, the sandbox's capabilities and cgroup limits read from the host's /proc,
the trusted host's CPU time and memory, the engine's actors and Ray's job table.
What the sandbox reports about itself (errno values) is a secondary check, and
every attacker instance's journal rows (output, error, step results, logs) are
searched for the platform's and the victim's secrets, and for the digests of
files it must not read.

HOSTILE_DUMP=<dir> keeps what every attack saw (its instance's status, as JSON) there.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import textwrap
import threading
import time
import uuid
import zipfile
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from dynwf_ray import InvalidInputError, wakeup
from dynwf_ray.journal import Journal, node_writer
from dynwf_ray.journal import sqlite_url_path

from .conftest import PG_URL, TERMINAL, wait_status, wait_until
from .otlp_receiver import OtlpReceiver

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

#: The attacker tenants' limits: small, so that resource attacks end fast.
LIMITS = dict(cpu_seconds=2, memory_mb=256, scratch_mb=8, processes=16, log_kib=64, open_files=64)
#: Generous waits: Ray is heavy and other test runs may share this machine.
WAIT = 180

VICTIM_CODE = '''
import os, time
from dynwf_ray import WorkflowEntrypoint

SECRET = {secret!r}


def plant():
    with open("secret.txt", "w") as f:
        f.write(SECRET)
    return {{"file": os.path.abspath(__file__), "scratch": os.getcwd()}}


def hold(release):
    deadline = time.monotonic() + 1800
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.1)
    with open("secret.txt") as f:
        return {{"intact": f.read() == SECRET, "files": sorted(os.listdir("."))}}


class Victim(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload or {{}}
        if p.get("hold"):
            where = await step.do("plant", plant)
            kept = await step.do("hold", lambda: hold(p["release"]), timeout="1 hour")
            return {{"where": where, "kept": kept, "key": self.env.get("VICTIM_API_KEY") == {key!r}}}
        one = await step.do("one", lambda: {{"secret": SECRET, "n": 1}})
        two = await step.do("two", lambda: SECRET[::-1])
        print("victim says", SECRET)
        return {{"one": one, "two": two, "secret": SECRET}}
'''

SITECUSTOMIZE = '''
# Tenant code too: Python imports a module of this name at start-up from its path.
import json, os, sys, time
try:
    with open(os.path.join({mark!r}, "site-%d-%d.json" % (os.getpid(), time.time_ns())), "w") as f:
        json.dump({{"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[:2],
                   "planted_env": os.environ.get("HOSTILE_PLANTED")}}, f)
except BaseException:
    pass
'''

#: Standard modules the tenant's package shadows: a process that imports one of them
#: with the package's directory first on its path runs the tenant's file instead, which
#: leaves a mark (then loads the real module, so that a sandbox still works).
SHADOWED = ("typing", "threading", "subprocess", "dataclasses", "signal")

SHADOW = '''
# Tenant code named like a standard module: it must never run outside a sandbox.
import os as _os, sys as _sys, sysconfig as _sysconfig, time as _time
try:
    with open(_os.path.join({mark!r}, "import-shadow-{name}-%d-%d" % (_os.getpid(), _time.time_ns())), "w") as _f:
        _f.write(repr(_sys.argv[:2]))
except BaseException:
    pass
import importlib.util as _util
_spec = _util.spec_from_file_location(__name__, _os.path.join(_sysconfig.get_paths()["stdlib"], "{name}.py"))
_real = _util.module_from_spec(_spec)
_sys.modules[__name__] = _real
_spec.loader.exec_module(_real)
'''

#: A shared object the package's [env] preloads (LD_PRELOAD, relative to the code's
#: directory): its constructor leaves a mark in any process that starts with it.
PRELOAD_C = r'''
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    char path[4096];
    snprintf(path, sizeof path, "@MARK_DIR@/import-preload-%d", (int)getpid());
    FILE *f = fopen(path, "w");
    if (f) { fputs("the tenant's LD_PRELOAD ran here", f); fclose(f); }
}
'''

SYMLINK_CODE = '''
import hashlib, os
from dynwf_ray import WorkflowEntrypoint

HERE = os.path.dirname(os.path.abspath(__file__))


def peek(names):
    out = {}
    for name in names:
        try:
            with open(os.path.join(HERE, name), "rb") as f:
                data = f.read()
            out[name] = {"sha256": hashlib.sha256(data).hexdigest(), "head": data[:200].decode("latin-1")}
        except BaseException as exc:
            out[name] = type(exc).__name__
    return out


class Linked(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("peek", lambda: peek(event.payload["names"]))
'''


# --- witnesses the test holds ----------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = 0
        self.requests: list[tuple[str, str, dict]] = []  # (method, target, headers)
        self.bodies: list[bytes] = []  # each request's body, in the same order

    def process_request(self, request, client_address):
        self.connections += 1  # counted before a byte of the request is read
        super().process_request(request, client_address)


def _http_server(body: bytes) -> _Server:
    """An HTTP server on loopback that answers anything with `body` and records each request."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.server.requests.append((self.command, self.path, dict(self.headers)))
            length = int(self.headers.get("Content-Length") or 0)
            self.server.bodies.append(self.rfile.read(length) if length else b"")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_CONNECT = _answer

        def log_message(self, *args):
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Witness:
    """A TCP listener on loopback that nobody should ever reach, and a UDP one."""

    def __init__(self):
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(16)
        self.tcp.setblocking(False)
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setblocking(False)
        try:
            self.udp.bind(("127.0.0.1", self.port))
        except OSError:
            self.udp.bind(("127.0.0.1", 0))
        self.accepted = 0
        self.datagrams = 0

    def poll(self) -> int:
        """Connections and datagrams received so far (in total)."""
        while True:
            try:
                conn, _ = self.tcp.accept()
                conn.close()
                self.accepted += 1
            except BlockingIOError:
                break
        while True:
            try:
                self.udp.recv(65536)
                self.datagrams += 1
            except BlockingIOError:
                break
        return self.accepted + self.datagrams

    def close(self):
        self.tcp.close()
        self.udp.close()


def _proc_identity(pid: int) -> tuple[int, float] | None:
    """(pid, start time) of a live, non-zombie process, else None."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return pid, p.create_time()
    except psutil.NoSuchProcess:
        return None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: str, limit: int = 4 << 20) -> str | None:
    try:
        with open(path, "rb") as f:
            return _sha(f.read(limit))
    except OSError:
        return None


# --- the arena -----------------------------------------------------------------------------


@dataclass
class Arena:
    engine: Any
    backend: str
    tag: str
    tenants: dict[str, str]  # role -> tenant id
    servers: dict[str, _Server]
    witness: Witness
    sleeper: subprocess.Popen
    mark_dir: Path
    outside_dir: Path
    ctl_dir: Path
    tmp: Path
    victim: dict[str, Any]
    attacker_file: str
    secrets: dict[str, str]  # name -> text that must never reach an attacker's records
    digests: dict[str, str] = field(default_factory=dict)  # name -> sha256 of a file it must not read
    snapshot: Any = None
    sa_engine: Any = None
    seen_hosts: dict[int, str] = field(default_factory=dict)  # host pid -> tenant
    attacker_dir: Path | None = None  # the attacker package as pushed
    hold_handle: Any = None  # the victim's live instance

    # -- who runs where ------------------------------------------------------------------

    def hosts(self, role: str) -> list[dict]:
        """The live hosts of one tenant (engine.sandboxes()); a tenant may have more than one."""
        found = [h for h in self.engine.sandboxes() if h["tenant"] == self.tenants[role]]
        for h in found:
            self.seen_hosts[h["host_pid"]] = h["tenant"]
        return found

    def host_pid(self, role: str) -> int:
        hosts = self.hosts(role)
        assert hosts, f"no live host for {role}"
        return hosts[0]["host_pid"]

    def host_pids(self, role: str) -> list[int]:
        return [h["host_pid"] for h in self.hosts(role)]

    def sandbox_pids(self, role: str) -> list[int]:
        return [s["pid"] for h in self.hosts(role) for s in h["sandboxes"]]

    def template_of(self, host: dict) -> psutil.Process | None:
        """The template process of one host (`hosts()`; hosts of every tenant may share a
        process, each with a template of its own)."""
        try:
            return psutil.Process(host["template_pid"])
        except psutil.NoSuchProcess:
            return None

    # -- running attacks ------------------------------------------------------------------

    def launch(self, attack: str, role: str = "atk", *, ctx: dict | None = None,
               where: str = "both", **extra: Any):
        params = {"attack": attack, "ctx": ctx or {}, "where": where, **extra}
        iid = f"{attack.replace('_', '-')}-{where}-{uuid.uuid4().hex[:6]}"
        return self.engine.binding(self.tenants[role]).create(id=iid, params=params)

    def run(self, attack: str, role: str = "atk", *, ctx: dict | None = None, where: str = "both",
            expect: str | tuple = "complete", timeout: float = WAIT, watch: bool = False,
            **extra: Any) -> dict:
        """Run one attack to its end; check it leaked nothing; return its status and records.
        With `watch`, also learn which sandbox and host ran it (`ran_in`: the last seen;
        `first_in`: the first, which ran the attack from its start), by polling."""
        handle = self.launch(attack, role, ctx=ctx, where=where, **extra)
        ran_in: dict[str, int] = {}
        first_in: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while watch and time.monotonic() < deadline and handle.status()["status"] not in TERMINAL:
            for h in self.engine.sandboxes():
                for sb in h["sandboxes"]:
                    if sb["instance"] == handle.id:
                        ran_in = {"sandbox": sb["pid"], "host": h["host_pid"]}
                        first_in = first_in or ran_in
            time.sleep(0.05)
        status = wait_status(handle, TERMINAL if expect == "any" else expect, timeout=timeout)
        self.hosts(role)  # remember which processes are hosts (to name them in reports)
        result = {"status": status, "output": status["output"], "handle": handle, "ran_in": ran_in,
                  "first_in": first_in,
                  "records": self.records(role, handle.id)}
        if os.environ.get("HOSTILE_DUMP"):  # a directory: keep what every attack saw
            os.makedirs(os.environ["HOSTILE_DUMP"], exist_ok=True)
            with open(os.path.join(os.environ["HOSTILE_DUMP"], f"{self.backend}-{handle.id}.json"), "w") as f:
                json.dump({"status": status, "ran_in": ran_in}, f, indent=1, default=str)
        self.assert_no_leak(result)
        return result

    def records(self, role: str, instance_id: str) -> str:
        """Everything the journal keeps of an attacker instance's doing, as one text."""
        j = self.engine.journal
        info = j.get_instance(self.tenants[role], instance_id)
        parts = [info.output_json or "", info.error_name or "", info.error_message or ""]
        for s in j.list_steps(info.pk):
            parts += [s.result_json or "", s.error_name or "", s.error_message or ""]
        parts += [line.message for line in j.read_logs(info.pk, limit=100000)]
        return "\n".join(parts)

    def assert_no_leak(self, result: dict) -> None:
        text = result["records"]
        leaked = [name for name, value in self.secrets.items() if value and value in text]
        leaked += [f"sha256 of {name}" for name, digest in self.digests.items() if digest and digest in text]
        assert not leaked, f"{result['handle'].id}: reached the attacker's records: {leaked}"

    # -- the victim -------------------------------------------------------------------

    def victim_rows(self) -> Any:
        """The victim's journal rows that must never change (its finished instance, the
        recorded step of the live one, its policy, code and tenant rows)."""
        t = self.tenants["victim"]
        with self.sa_engine.connect() as c:
            def rows(sql, **kw):
                return [tuple(r) for r in c.execute(sa.text(sql), kw).all()]

            inst = rows("select * from instances where tenant_id = :t and instance_id != :h order by pk",
                        t=t, h=self.victim["hold"])
            pks = [r[0] for r in inst] or [-1]
            in_pks = ",".join(str(int(p)) for p in pks)
            hold_pk = self.victim["hold_pk"]
            return {
                "instances": inst,
                "instance ids": rows("select instance_id from instances where tenant_id = :t order by pk", t=t),
                "steps": rows(f"select * from steps where instance_pk in ({in_pks}) order by instance_pk, name, seq"),
                "hold plant": rows("select * from steps where instance_pk = :p and name = 'plant'", p=hold_pk),
                "logs": rows(f"select * from logs where instance_pk in ({in_pks}) order by pk"),
                "events": rows(f"select * from events where instance_pk in ({in_pks}) order by pk"),
                "policy": rows("select * from tenant_policies where tenant_id = :t", t=t),
                "code": rows("select * from code_versions where tenant_id = :t order by version", t=t),
                "tenant": rows("select * from tenants where tenant_id = :t", t=t),
            }

    def assert_victim_intact(self) -> None:
        now = self.victim_rows()
        changed = [k for k in now if now[k] != self.snapshot[k]]
        assert not changed, f"the victim's journal rows changed: {changed}"
        hold = self.engine.binding(self.tenants["victim"]).get(self.victim["hold"]).status()
        assert hold["status"] == "running", f"the victim's live instance is no longer running: {hold}"
        # its scratch file, read by us through its sandbox's own root
        path = f"/proc/{self.victim['sandbox_pid']}/root{self.victim['scratch']}/secret.txt"
        with open(path) as f:
            assert f.read() == self.victim["secret"], "the victim's scratch file changed"

    def assert_alive(self, *identities: tuple[int, float]) -> None:
        for ident in identities:
            assert _proc_identity(ident[0]) == ident, f"process {ident[0]} is gone (or was replaced)"


def _results(output: dict) -> list[tuple[str, dict]]:
    """(where, result) for the run() and step halves of an attack's output."""
    assert isinstance(output, dict) and output, output
    return [(w, output[w]) for w in ("run", "step") if w in output]


def _succeeded(result: Any, allow: tuple[str, ...] = ()) -> list[str]:
    """Labels of attempts that worked ({"ok": True}), at any depth, less those allowed."""
    found: list[str] = []

    def walk(label: str, value: Any) -> None:
        if isinstance(value, dict):
            if value.get("ok") is True and label not in allow:
                found.append(label)
            for k, v in value.items():
                if k != "value":
                    walk(f"{label}/{k}" if label else k, v)

    walk("", result)
    return [f for f in found if f.split("/")[0] not in allow]


@pytest.fixture(scope="module")
def arena(make_engine, backend, tmp_path_factory) -> Any:
    tmp = tmp_path_factory.mktemp("hostile")
    tag = uuid.uuid4().hex[:8]
    mark_dir, outside_dir, ctl_dir = tmp / "marks", tmp / "outside", tmp / "ctl"
    for d in (mark_dir, outside_dir, ctl_dir):
        d.mkdir()
    servers = {"A": _http_server(b"hello from A"), "B": _http_server(b"hello from B"),
               "C": _http_server(b"hello from C")}
    witness = Witness()
    sleeper = subprocess.Popen(["sleep", "3600"])
    engine = make_engine(metrics_port=0, max_hosts=8, hibernate_after=60.0)
    sa_engine = sa.create_engine(engine.config.database_url, poolclass=NullPool)
    tenants = {role: f"{role}-{tag}" for role in
               ("victim", "atk", "egr", "big", "spin", "rayt", "mem", "other", "linked", "granter",
                "spans")}
    secret = f"VICTIM-SECRET-{uuid.uuid4().hex}"
    api_key = f"victim-api-key-{uuid.uuid4().hex}"
    try:
        # the victim: a secret in its code, its journal rows, its scratch and its policy
        vdir = tmp / "victim"
        vdir.mkdir()
        (vdir / "workflow.py").write_text(VICTIM_CODE.format(secret=secret, key=api_key))
        engine.set_tenant_policy(tenants["victim"], paths={str(ctl_dir): "ro"},
                                 secrets={"VICTIM_API_KEY": api_key})
        engine.push_tenant(tenants["victim"], str(vdir))
        # the attacker package
        adir = tmp / "attacker"
        adir.mkdir()
        source = (TESTS / "hostile_tenant.py").read_text().replace("@MARK_DIR@", str(mark_dir))
        (adir / "workflow.py").write_text(source)
        (adir / "sitecustomize.py").write_text(SITECUSTOMIZE.format(mark=str(mark_dir)))
        for name in SHADOWED:  # modules named like the standard library's
            (adir / f"{name}.py").write_text(SHADOW.format(mark=str(mark_dir), name=name))
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(adir / "preload.so"), "-x", "c", "-"],
                       input=PRELOAD_C.replace("@MARK_DIR@", str(mark_dir)), text=True, check=True)
        (adir / "dynwf.toml").write_text(textwrap.dedent(f'''\
            entrypoint = "workflow:Hostile"
            [env]
            HTTP_PROXY = "http://127.0.0.1:{servers["C"].server_address[1]}"
            HTTPS_PROXY = "http://127.0.0.1:{servers["C"].server_address[1]}"
            HOSTILE_PLANTED = "planted-{tag}"
            LD_PRELOAD = "./preload.so"
            '''))
        policies = {
            "atk": dict(limits=LIMITS),
            "egr": dict(limits=LIMITS, egress=[f"127.0.0.1:{servers['A'].server_address[1]}"]),
            "big": dict(limits={**LIMITS, "memory_mb": 4096, "cpu_seconds": 30}),
            "spin": dict(limits=LIMITS),
            "rayt": dict(limits={**LIMITS, "cpu_seconds": 30}),
            "mem": dict(limits=LIMITS),
            "spans": dict(limits=LIMITS),
        }
        for role, policy in policies.items():
            engine.set_tenant_policy(tenants[role], **policy)
        for role in policies:  # same content: validated once
            engine.push_tenant(tenants[role], str(adir))
        (tmp / "other").mkdir()
        (tmp / "other" / "workflow.py").write_text(VICTIM_CODE.format(secret="other", key="other"))
        engine.push_tenant(tenants["other"], str(tmp / "other"))

        wf = engine.binding(tenants["victim"])
        done = wf.create(id="victim-done")
        wait_status(done, "complete", timeout=WAIT)
        hold = wf.create(id="victim-hold", params={"hold": True, "release": str(ctl_dir / "release")})

        def planted():
            info = engine.journal.get_instance(tenants["victim"], "victim-hold")
            steps = {s.name: s for s in engine.journal.list_steps(info.pk)} if info else {}
            return steps.get("plant") if "plant" in steps and steps["plant"].status == "complete" else None

        plant = wait_until(planted, WAIT, "the victim to plant its secret")
        where = json.loads(plant.result_json)
        vhost = wait_until(lambda: next((h for h in engine.sandboxes()
                                         if h["tenant"] == tenants["victim"]), None), WAIT, "victim host")
        vsandbox = wait_until(lambda: next((s["pid"] for h in engine.sandboxes() for s in h["sandboxes"]
                                            if s["instance"] == "victim-hold"), None), WAIT, "victim sandbox")
        victim = {
            "secret": secret, "api_key": api_key, "done": "victim-done", "hold": "victim-hold",
            "hold_pk": engine.journal.get_instance(tenants["victim"], "victim-hold").pk,
            "file": where["file"], "scratch": where["scratch"], "sandbox_pid": vsandbox,
            "host_pid": vhost["host_pid"], "version": vhost["version"],
        }
        # the attacker, warm: where its code is, and its host
        warm = engine.binding(tenants["atk"]).create(params={"attack": "noop", "where": "step"})
        attacker_file = wait_status(warm, "complete", timeout=WAIT)["output"]["step"]["file"]

        secrets = {"victim secret": secret, "victim api key": api_key}
        token = Path.home() / ".ray" / "auth_token"
        if token.exists() and len(token.read_text().strip()) >= 16:
            secrets["ray auth token"] = token.read_text().strip()
        try:
            for line in Path("/etc/shadow").read_text().splitlines():
                fields = line.split(":")
                if len(fields) > 1 and len(fields[1]) > 12:
                    secrets[f"shadow hash of {fields[0]}"] = fields[1]
        except OSError:
            pass
        node = ray.get_runtime_context().get_node_id()
        secrets["ray node id"] = node
        digests = {
            "/etc/shadow": _file_sha("/etc/shadow"),
            "ray auth token file": _file_sha(str(token)),
            "victim's module": _file_sha(victim["file"]),
            "victim host environ": _file_sha(f"/proc/{victim['host_pid']}/environ", 1 << 16),
            "victim host cmdline": _file_sha(f"/proc/{victim['host_pid']}/cmdline", 1 << 16),
            "test environ": _file_sha(f"/proc/{os.getpid()}/environ", 1 << 16),
        }
        a = Arena(engine=engine, backend=backend, tag=tag, tenants=tenants, servers=servers,
                  witness=witness, sleeper=sleeper, mark_dir=mark_dir, outside_dir=outside_dir,
                  ctl_dir=ctl_dir, tmp=tmp, victim=victim, attacker_file=attacker_file,
                  secrets=secrets, digests={k: v for k, v in digests.items() if v},
                  sa_engine=sa_engine)
        a.snapshot = a.victim_rows()
        a.attacker_dir = adir
        a.hold_handle = hold
        yield a
    finally:
        (ctl_dir / "release").touch()
        sleeper.kill()
        sleeper.wait()
        witness.close()
        for s in servers.values():
            s.shutdown()
            s.server_close()
        sa_engine.dispose()


# --- the journal -----------------------------------------------------------------------------


def test_journal_files_are_out_of_reach(arena):
    """The journal's own files: the SQLite file (and its directory), or PostgreSQL's data
    directory and socket. Read, open for writing, create beside, query and tamper with SQL."""
    ctx: dict[str, Any] = {"files": [], "dirs": []}
    path = sqlite_url_path(arena.engine.config.database_url)
    if path:
        ctx.update(files=[path, path + "-wal", path + "-shm"], dirs=[os.path.dirname(path)],
                   sqlite_path=path)
    else:
        admin = sa.create_engine(PG_URL, poolclass=NullPool)
        with admin.connect() as c:
            sockdir = c.execute(sa.text("show unix_socket_directories")).scalar().split(",")[0].strip()
            ctx["unix_socket"] = f"{sockdir}/.s.PGSQL.{sa.make_url(PG_URL).port}"
            try:  # needs a superuser (the test server's user is one)
                data = c.execute(sa.text("show data_directory")).scalar()
                ctx.update(files=[f"{data}/PG_VERSION", f"{data}/global/pg_control",
                                  f"{data}/pg_hba.conf", f"{data}/postgresql.auto.conf"],
                           dirs=[data, f"{data}/base"])
            except sa.exc.DBAPIError:
                pass
        admin.dispose()
    r = arena.run("journal_files", ctx=ctx)
    arena.assert_victim_intact()
    for d in ctx["dirs"]:
        assert not os.path.exists(os.path.join(d, "hostile-planted")), d
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


def test_journal_server_is_out_of_reach(arena):
    """Connect to PostgreSQL (the test server on loopback): raw TCP, psycopg, SQLAlchemy."""
    url = sa.make_url(PG_URL) if PG_URL else sa.make_url("postgresql+psycopg://dynwf:dynwf@127.0.0.1:54329/dynwf_test")
    if arena.backend == "postgresql":
        url = sa.make_url(arena.engine.config.database_url)
    ctx = {"pg_port": url.port or 5432, "pg_url": url.render_as_string(hide_password=False),
           "pg_dsn": url.set(drivername="postgresql").render_as_string(hide_password=False)}
    r = arena.run("journal_postgres", ctx=ctx)
    arena.assert_victim_intact()
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


def test_journal_class_cannot_write_records(arena):
    """Import the platform's Journal with the journal's URL: read the victim, terminate and
    pause it, create an instance for it, grant itself egress."""
    v = arena.victim
    ctx = {"db_url": arena.engine.config.database_url, "me": arena.tenants["atk"],
           "victim_tenant": arena.tenants["victim"], "victim_done": v["done"],
           "victim_hold": v["hold"], "victim_version": v["version"]}
    r = arena.run("journal_import", ctx=ctx)
    arena.assert_victim_intact()
    assert arena.engine.tenant_policy(arena.tenants["atk"]).egress == ()
    for where, res in _results(r["output"]):
        assert not _succeeded(res, allow=("open",)), (where, _succeeded(res, allow=("open",)))


# --- the platform in memory, in Ray, in files -----------------------------------------------------


def test_no_platform_objects_in_sandbox_memory(arena):
    """gc.get_objects(): no SQLAlchemy engine, Journal, Ray worker or actor handle, no
    platform module, no database URL or victim secret among its strings. (A tenant of its
    own: what other attacks import into their warm sandbox is the attacker's, not ours.)"""
    r = arena.run("platform_objects", "mem")
    for where, res in _results(r["output"]):
        assert res["types"] == {}, (where, res["types"])
        assert res["modules"] == [], (where, res["modules"])
        assert res["strings"] == [], (where, res["strings"])
        assert res["ray_initialized"] is None, (where, res["ray_initialized"])
        assert res["strings_seen"] > 1000  # it did look


def test_ray_cluster_is_out_of_reach(arena):
    """`import ray; ray.init(address="auto")`, `ray.init(address=127.0.0.1:<GCS port>)`,
    `ray.util.list_named_actors`, and `ray.kill` of the scheduler if it got that far."""
    cfg = arena.engine.config
    scheduler = ray.get_actor(cfg.scheduler_name, namespace=cfg.namespace)
    loader = ray.get_actor(cfg.loader_name, namespace=cfg.namespace)
    actors = sorted(map(str, ray.util.list_named_actors(all_namespaces=True)))
    jobs = len(ray._private.state.jobs())
    gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    # Ray's own native code sometimes dies (SIGSEGV) under the jail while it tries, or cannot
    # start its threads there: the attack then fails by erroring its instance, and the
    # trusted side checks the same way.
    r = arena.run("ray_connect", "rayt", where="step", expect=("complete", "errored"),
                  ctx={"gcs_port": gcs_port, "namespace": cfg.namespace, "scheduler": cfg.scheduler_name})
    # from our side: no new driver joined, the engine's actors are the same and answer
    assert len(ray._private.state.jobs()) == jobs, "a new Ray job (driver) registered"
    assert sorted(map(str, ray.util.list_named_actors(all_namespaces=True))) == actors
    assert ray.get(scheduler.ping.remote(), timeout=60)
    assert ray.get(loader.stats.remote(), timeout=60) is not None
    assert ray.get_actor(cfg.scheduler_name, namespace=cfg.namespace)._actor_id == scheduler._actor_id
    if r["status"]["status"] == "errored":
        # the attack died in the jail: its sandbox crashed (Ray's native code under the
        # jail), or Ray could not even start its threads there (the sandbox's process limit)
        error = r["status"]["error"]
        assert error["name"] == "SandboxCrashedError" or (
            error["name"] == "RuntimeError" and "can't start new thread" in error["message"]
        ), r["status"]
        return
    res = r["output"]["step"]
    assert res["initialized"] is False, res
    assert not res["init auto"]["ok"], res["init auto"]
    assert not res.get("init address", {"ok": False})["ok"], res.get("init address")
    assert not res["list_named_actors"]["ok"], res["list_named_actors"]


def test_ray_token_and_session_files_are_out_of_reach(arena):
    """~/.ray/auth_token, /tmp/ray, the session directory (logs, sockets, other tenants'
    unpacked packages), and Ray's Unix sockets."""
    session = ray._private.worker._global_node.get_session_dir_path()
    r = arena.run("ray_files", ctx={"session_dir": session})
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


def test_wake_sockets_are_out_of_reach(arena):
    """List the host processes' wake sockets' directory and send a wake to each socket in
    it (the attacker's own host process has one)."""
    directory = os.path.dirname(wakeup.address("x"))
    sockets = [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
    assert sockets, "no wake socket to attack"
    r = arena.run("wake_sockets", ctx={"dir": directory, "sockets": sockets})
    for where, res in _results(r["output"]):
        assert len(res) == len(sockets) + 1, res
        assert not _succeeded(res), (where, _succeeded(res))


def test_the_journal_writer_is_out_of_reach(arena):
    """Connect to the machine's journal writer for this journal and send it a message
    (SQLite; served here by this test if the engine's loader does not serve it). Landlock
    governs opening, not lookup: the sandbox may stat the socket's path (it learns the
    path exists, docs/security.md), never connect."""
    url = arena.engine.config.database_url
    path = node_writer.address(url, create=True)
    if path is None:
        assert not arena.engine.journal.is_sqlite  # PostgreSQL has no machine writer
        return
    writer = node_writer.NodeWriter(Journal(url, create_tables=False))
    mine = writer.start()  # else the loader serves it already
    try:
        assert os.path.exists(path)
        r = arena.run("journal_writer", ctx={"socket": path})
        for where, res in _results(r["output"]):
            assert "connect and send" in res, res
            assert not _succeeded(res, allow=(f"stat {path}",)), (where, _succeeded(res))
        if mine:
            assert writer.stats()["clients"] == 0
    finally:
        writer.close()


# --- other processes ---------------------------------------------------------------------------


def _pids(arena) -> dict[str, int]:
    pids = {"test's sleeper": arena.sleeper.pid, "victim host": arena.victim["host_pid"],
            "victim sandbox": arena.victim["sandbox_pid"], "attacker host": arena.host_pid("atk"),
            "test process": os.getpid()}  # this very process (never sent a real signal)
    template = arena.template_of(arena.hosts("atk")[0])
    if template is not None:
        pids["attacker template"] = template.pid
    return pids


def test_signals_do_not_cross_the_sandbox(arena):
    """kill, tgkill, pidfd_open/pidfd_send_signal with SIGKILL on a process the test started,
    both trusted hosts, the template, another tenant's sandbox; kill(-1)."""
    pids = _pids(arena)
    pids.pop("test process")
    alive = [_proc_identity(p) for p in pids.values()]
    assert all(alive), alive
    r = arena.run("signals", ctx={"pids": pids})
    arena.assert_alive(*alive)
    assert arena.sleeper.poll() is None
    arena.assert_victim_intact()
    for where, res in _results(r["output"]):
        assert not _succeeded(res, allow=("killpg own group, signal 0", "sid")), (where, _succeeded(res))


def test_kill_of_its_own_process_group_spares_the_host(arena):
    """The sandbox shares its process group with the template and the trusted host (they
    forked it): SIGKILL to that group, and to -1, from run()."""
    alive = [_proc_identity(arena.victim["host_pid"])]
    for host in arena.hosts("atk"):
        template = arena.template_of(host)
        assert template is not None
        alive += [_proc_identity(host["host_pid"]), _proc_identity(template.pid)]
    r = arena.run("kill_own_group", where="run", watch=True)
    if r["ran_in"] and r["ran_in"]["host"] not in [a[0] for a in alive]:  # a host started for it
        alive.append(_proc_identity(r["ran_in"]["host"]))
    arena.assert_alive(*alive)
    arena.assert_victim_intact()


def _tracer(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":")[1].strip() for line in f if line.startswith("TracerPid"))


def test_ptrace_and_process_memory_access(arena):
    """PTRACE_ATTACH/SEIZE, process_vm_readv/writev, kcmp, pidfd_getfd on the test's
    process, the hosts and another tenant's sandbox."""
    pids = _pids(arena)
    alive = [_proc_identity(p) for p in pids.values()]
    r = arena.run("ptrace", ctx={"pids": pids})
    arena.assert_alive(*alive)
    for label, pid in pids.items():
        assert _tracer(pid) == "0", f"{label} is being traced"
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


def test_proc_of_trusted_processes(arena):
    """/proc/<pid>/environ, cmdline, maps, status, mem, root, cwd, fd of the hosts, the test's
    process and another sandbox; /proc lists nothing but the sandbox itself."""
    pids = _pids(arena)
    for label in ("attacker host", "test process"):
        arena.digests[f"{label} environ"] = _file_sha(f"/proc/{pids[label]}/environ", 1 << 16)
    r = arena.run("proc_host", ctx={"pids": pids})
    for where, res in _results(r["output"]):
        assert [p for p in res["proc"]["value"] if p.isdigit()] == ["1"], res["proc"]
        assert not _succeeded(res, allow=("proc", "self environ", "1 environ")), (where, _succeeded(res))


# --- other tenants ---------------------------------------------------------------------------------


def test_other_tenants_code_is_unreadable(arena):
    """The victim's module file (path learned from the victim's own journal rows), its
    directory, and the directory where every tenant's package is unpacked."""
    r = arena.run("other_tenant_code", ctx={"victim_file": arena.victim["file"]})
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


def test_other_sandbox_scratch_is_out_of_reach(arena):
    """Read, overwrite, delete and list the live victim sandbox's scratch (by its host path
    and through /proc/<its pid>/root)."""
    v = arena.victim
    r = arena.run("other_scratch", ctx={"victim_scratch": v["scratch"], "victim_sandbox_pid": v["sandbox_pid"]})
    arena.assert_victim_intact()  # reads the secret back through the victim's own root
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


def test_binding_reaches_only_its_own_tenant(arena):
    """WORKFLOWS (and raw bind requests): get, status, logs, terminate, pause, send_event on
    the victim's instances; create with tenant_id; private methods; a binding that isn't there."""
    v = arena.victim
    r = arena.run("binding_abuse", ctx={"victim_tenant": arena.tenants["victim"],
                                        "victim_done": v["done"], "victim_hold": v["hold"]})
    arena.assert_victim_intact()
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


# --- environment and files of the machine -----------------------------------------------------------


def test_environment_holds_nothing_of_the_platform(arena):
    r = arena.run("platform_env")
    tag = arena.tag
    for where, res in _results(r["output"]):
        env = res["environ"]
        bad = [k for k in env if k.startswith(("RAY_", "DYNWF_", "OTEL_", "PG", "SQLALCHEMY", "AWS_",
                                               "GOOGLE_", "KUBE"))]
        assert not bad, (where, bad)
        assert set(env) <= {"PATH", "LANG", "PYTHONDONTWRITEBYTECODE", "HOME", "TMPDIR",
                            "HTTP_PROXY", "HTTPS_PROXY", "HOSTILE_PLANTED", "LD_PRELOAD"}, (where, sorted(env))
        text = json.dumps(env)
        for needle in ("postgres", "sqlite", arena.engine.config.database_url, "/tmp/ray", "session_"):
            assert needle not in text, (where, needle)
        assert env["HOME"] == res["cwd"] == env["TMPDIR"], res
        assert env["HOSTILE_PLANTED"] == f"planted-{tag}"  # its own [env] is its own
        assert env["LD_PRELOAD"] == "./preload.so"  # set once jailed: it ran nowhere before


def test_system_files_are_unreadable(arena):
    """/etc/shadow, root's home, Ray's token, devices, kernel memory and log, /etc, /tmp."""
    r = arena.run("system_files")
    # readable by design: procfs/sysfs of its own namespaces
    allow = ("read /proc/sys/kernel/core_pattern",)
    for where, res in _results(r["output"]):
        assert not _succeeded(res, allow=allow), (where, _succeeded(res, allow=allow))


def test_platform_working_directory_is_unreadable(arena):
    """The directory the platform's driver runs in (here the repository): Ray puts it on every
    worker's sys.path, and the sandbox is granted its host's sys.path. Files there that are
    not the dynwf_ray package (configuration, the tests, .git) are the platform's."""
    cwd = os.getcwd()
    files = ["pyproject.toml", "tests/conftest.py", ".git/HEAD", ".gitignore"]
    for rel in files:
        arena.digests[f"platform file {rel}"] = _file_sha(os.path.join(cwd, rel))
    r = arena.run("platform_cwd", ctx={"cwd": cwd, "files": files})
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


# --- the network ---------------------------------------------------------------------------------


def test_loopback_ports_are_unreachable(arena):
    """The metrics endpoint, PostgreSQL, Ray's GCS/raylet ports, the test's witness and
    HTTP servers, on 127.0.0.1 and ::1, TCP and UDP."""
    stats = arena.engine.stats()
    metrics = int(stats["metrics_url"].split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    node = next(n for n in ray.nodes() if n["Alive"])
    ports = {"witness": arena.witness.port, "metrics": metrics,
             "postgresql": sa.make_url(PG_URL).port if PG_URL else 54329,
             "gcs": int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]), "redis default": 6379,
             "raylet": node["NodeManagerPort"], "object manager": node["ObjectManagerPort"],
             "A": arena.servers["A"].server_address[1], "B": arena.servers["B"].server_address[1],
             "C": arena.servers["C"].server_address[1]}
    before = {k: s.connections for k, s in arena.servers.items()}
    seen = arena.witness.poll()
    r = arena.run("loopback", ctx={"ports": ports})
    assert arena.witness.poll() == seen, "the witness listener got a connection or datagram"
    assert {k: s.connections for k, s in arena.servers.items()} == before
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


def test_no_route_off_the_machine(arena):
    """Connect to 1.1.1.1:53 and 8.8.8.8:443, send UDP to 1.1.1.1:53 (attempts only): each
    must fail at once, inside the sandbox's empty network namespace."""
    r = arena.run("external_network")
    for where, res in _results(r["output"]):
        for label in ("tcp 1.1.1.1:53", "udp 1.1.1.1:53", "tcp 8.8.8.8:443"):
            assert not res[label]["ok"] and res[label]["s"] < 1.0, (where, label, res[label])


def test_no_name_resolution(arena):
    r = arena.run("dns")
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


def test_egress_only_to_the_allowlist(arena):
    """A tenant granted 127.0.0.1:<A>: through the proxy A answers; B gets 403 and never sees
    a connection, however the request names it (other spellings of loopback, userinfo,
    pipelining, CONNECT); direct connections around the proxy fail."""
    a, b, c = (arena.servers[k] for k in "ABC")
    before = {k: s.connections for k, s in arena.servers.items()}
    seen = arena.witness.poll()
    stats = arena.engine.stats()
    metrics = int(stats["metrics_url"].split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    r = arena.run("egress", "egr", where="step", ctx={
        "allowed": a.server_address[1], "denied": b.server_address[1],
        "others": {"C": c.server_address[1], "witness": arena.witness.port, "metrics": metrics,
                   "postgresql": sa.make_url(PG_URL).port if PG_URL else 54329}})
    assert b.connections == before["B"], "the denied server saw a connection"
    assert c.connections == before["C"]
    assert arena.witness.poll() == seen
    assert a.connections > before["A"], "the allowlisted server was never reached"
    res = r["output"]["step"]
    assert res["allowed"]["value"] == [200, "hello from A"], res["allowed"]
    assert res["denied"]["value"][0] == 403, res["denied"]
    for label, value in res.items():
        if label.startswith("via proxy"):
            assert value["ok"] and value["value"][0] == 403, (label, value)
        if label.startswith("trick"):  # refused, or (pipelining to A first) answered by A only
            text = value.get("value") or ""
            assert "hello from B" not in text, (label, value)
            assert not text.startswith("HTTP/1.1 200") or "hello from A" in text, (label, value)
    for label in ("direct denied", "direct allowed", "direct 1.1.1.1:53"):
        assert not res[label]["ok"], (label, res[label])


def test_dynwf_toml_cannot_grant_egress(arena, tmp_path):
    """A tenant's own dynwf.toml asks for egress (refused at push), or names a proxy in its
    [env] (the attacker package does: HTTP_PROXY=<server C>): nothing reaches C."""
    for manifest in ('egress = ["127.0.0.1:1"]\n', '[policy]\negress = ["127.0.0.1:1"]\n',
                     '[sandbox]\negress = ["127.0.0.1:1"]\n'):
        d = tmp_path / f"m{abs(hash(manifest))}"
        d.mkdir()
        (d / "workflow.py").write_text("from dynwf_ray import WorkflowEntrypoint\n"
                                       "class W(WorkflowEntrypoint):\n    async def run(self, e, s):\n        return 1\n")
        (d / "dynwf.toml").write_text(manifest)
        with pytest.raises(InvalidInputError):
            arena.engine.push_tenant(arena.tenants["granter"], str(d))
    assert arena.engine.tenant_policy(arena.tenants["granter"]).egress == ()
    before = arena.servers["C"].connections
    r = arena.run("manifest_proxy", ctx={"port": arena.servers["C"].server_address[1]})
    assert arena.servers["C"].connections == before, "the tenant's own proxy setting reached C"
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


def test_dynwf_toml_pip_cannot_reach_arbitrary_urls(arena, tmp_path):
    """`pip` in dynwf.toml is installed by Ray, on the trusted side, when the package's
    runtime env is built (at push). A requirement with a direct URL (here a server of the
    test's on loopback, standing in for any internal address) must not make the platform
    fetch it: that is egress nobody granted, and an sdist served there would run its
    setup.py outside any sandbox."""
    server = _http_server(b"not a package")
    d = tmp_path / "pipper"
    d.mkdir()
    (d / "workflow.py").write_text("from dynwf_ray import WorkflowEntrypoint\n"
                                   "class W(WorkflowEntrypoint):\n    async def run(self, e, s):\n        return 1\n")
    url = f"http://127.0.0.1:{server.server_address[1]}/hostile_probe-0.1.tar.gz"
    (d / "dynwf.toml").write_text(f'pip = ["hostile-probe @ {url}"]\n')
    box: dict = {}

    def push():  # it may take Ray a while to give up; the verdict comes from the server
        try:
            box["version"] = arena.engine.push_tenant(f"pipper-{arena.tag}", str(d))
        except Exception as exc:  # noqa: BLE001
            box["error"] = exc

    th = threading.Thread(target=push, daemon=True)
    th.start()
    try:
        wait_until(lambda: server.connections or not th.is_alive(), WAIT, "the push or a fetch")
        assert server.connections == 0, (
            f"building the tenant's runtime env fetched {[r[:2] for r in server.requests]} from "
            f"a URL its dynwf.toml named (push outcome so far: {box or 'still running'})")
    finally:
        server.shutdown()
        server.server_close()


# --- the filesystem and the jail itself -------------------------------------------------------------


def test_writes_outside_scratch(arena):
    """Create, write, mkdir, link anywhere but the scratch: the test's own dir, /tmp, /var/tmp,
    /dev/shm, the victim's and its own code directory, the journal's directory, the
    repository, root's home; chmod/utime/overwrite/rename its own code; the hostname."""
    tag = arena.tag
    targets = [str(arena.outside_dir / f"escaped-{tag}"), f"/tmp/hostile-{tag}", f"/var/tmp/hostile-{tag}",
               f"/dev/shm/hostile-{tag}", os.path.join(os.path.dirname(arena.victim["file"]), f"escaped-{tag}"),
               str(TESTS / f"hostile-escaped-{tag}"), f"/root/hostile-{tag}"]
    path = sqlite_url_path(arena.engine.config.database_url)
    if path:
        targets.append(os.path.join(os.path.dirname(path), f"escaped-{tag}"))
    mine = arena.attacker_file
    own_targets = [os.path.join(os.path.dirname(mine), f"escaped-{tag}")]
    st = os.stat(mine)
    code_before = (_file_sha(mine), st.st_mode, st.st_mtime_ns)
    hostname = socket.gethostname()
    r = arena.run("write_outside", ctx={"tag": tag, "targets": targets})
    try:
        made = [p for t in targets + own_targets + [f"/tmp/hostile-link-{tag}"]
                for p in (t, t + ".d") if os.path.lexists(p)]
        assert not made, f"written outside the scratch: {made}"
        st = os.stat(mine)
        assert (_file_sha(mine), st.st_mode, st.st_mtime_ns) == code_before, "its code directory changed"
        assert not os.path.exists(mine + ".moved")
        assert socket.gethostname() == hostname
    finally:
        for t in targets + own_targets + [f"/tmp/hostile-link-{tag}"]:
            for p in (t, t + ".d"):
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.lexists(p):
                    os.unlink(p)
    for where, res in _results(r["output"]):
        assert not _succeeded(res), (where, _succeeded(res))


@pytest.mark.parametrize("case", ["file", "token", "other tenant", "relative", "chain", "directory"])
def test_symlink_in_pushed_code(arena, tmp_path, case):
    """A tenant directory with a symlink out of it: to /etc/shadow, to Ray's token, to another
    tenant's module, `../` to a file beside the directory, a chain through a link inside, a
    directory link to /etc. The push must refuse it, or neither the stored package nor the
    sandbox may hold what it points to."""
    d = tmp_path / "linked"
    d.mkdir()
    (d / "workflow.py").write_text(SYMLINK_CODE)
    beside = tmp_path / "beside.txt"
    beside.write_text(f"BESIDE-SECRET-{uuid.uuid4().hex}")
    links = {
        "file": {"secret": "/etc/shadow"},
        "token": {"token": str(Path.home() / ".ray" / "auth_token")},
        "other tenant": {"other": arena.victim["file"]},
        "relative": {"up": "../beside.txt"},
        "chain": {"hop": "hop2", "hop2": "/etc/shadow"},
        "directory": {"etc_link": "/etc"},
    }[case]
    for name, target in links.items():
        os.symlink(target, d / name)
    targets = {name: os.path.realpath(d / name) for name in links}
    if case == "directory":
        targets = {"etc_link/shadow": "/etc/shadow", "etc_link/hostname": "/etc/hostname"}
    forbidden = {}
    for name, target in targets.items():
        if os.path.isfile(target):
            with open(target, "rb") as f:
                forbidden[name] = f.read()
    assert forbidden, "nothing to point at"
    tenant = f"linked-{case.replace(' ', '-')}-{arena.tag}"
    try:
        version = arena.engine.push_tenant(tenant, str(d))
    except InvalidInputError:
        return  # refused: the safe answer
    kind, blob, _ = arena.engine.journal.get_code(tenant, version)
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        stored = {info.filename: zf.read(info) for info in zf.infolist()}
    inside = sorted({name for data in stored.values() for name, ref in forbidden.items() if data == ref})
    handle = arena.engine.binding(tenant).create(id="peek", params={"names": sorted(targets)})
    seen = json.dumps(wait_status(handle, TERMINAL, timeout=WAIT))
    read = sorted(name for name, ref in forbidden.items() if _sha(ref) in seen)
    assert not inside and not read, (
        f"the push followed a symlink out of the tenant's directory: the stored package "
        f"({sorted(stored)}) holds the content of {inside}; the sandbox read {read}")


def test_raw_syscalls_cannot_undo_the_jail(arena):
    """ctypes syscalls: unshare, setns, mount, umount, pivot_root, chroot, the new mount API,
    seccomp off, no_new_privs off, securebits, ambient caps, capset, setgroups, modules,
    kexec, reboot, swap, acct, iopl, bpf, perf, userfaultfd, io_uring, keys, personality,
    clone3, mknod, quotactl, settimeofday, sethostname, open_by_handle_at; setuid away and back."""
    hostname = socket.gethostname()
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    r = arena.run("raw_syscalls", ctx={"tag": arena.tag})
    # from outside: the sandbox that ran it, as the host's /proc shows it
    pids = arena.sandbox_pids("atk")
    assert pids, "the attacker's sandbox is gone"
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            status = {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[cap], 16) == 0, (pid, cap, status[cap])
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
        for ns in ("mnt", "net", "pid", "ipc", "uts", "cgroup"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts, "the host's mount table changed"
    assert socket.gethostname() == hostname
    allow = ("setuid 0",)  # it is uid 0 already: setuid(0) changes nothing
    for where, res in _results(r["output"]):
        assert not _succeeded(res, allow=allow), (where, _succeeded(res, allow=allow))
        assert res["setuid 1000 then 0 (child exit)"] == 0, res["setuid 1000 then 0 (child exit)"]
        status = res["status"]
        assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000", status


def _cgroup_limits(pid: int) -> dict[str, str]:
    """A process's pids and memory limits, read from the host's cgroup filesystem."""
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.strip().split(":", 2)
            for ctrl in controllers.split(",") if controllers else [""]:
                base = f"/sys/fs/cgroup/{ctrl}" if ctrl else "/sys/fs/cgroup"
                for name in ("pids.max", "memory.limit_in_bytes", "memory.max"):
                    p = f"{base}{path}/{name}"
                    if os.path.exists(p):
                        out[f"{ctrl}:{name}"] = open(p).read().strip()
                out[f"{ctrl}:path"] = path
    return out


def test_cgroup_limits_cannot_be_lifted(arena):
    """Write pids.max/memory limits and cgroup.procs, mkdir a child cgroup, mount cgroupfs."""
    pids = arena.sandbox_pids("atk")
    assert pids
    before = {pid: _cgroup_limits(pid) for pid in pids}
    r = arena.run("cgroup_escape")
    after = {pid: _cgroup_limits(pid) for pid in arena.sandbox_pids("atk") if pid in before}
    assert after, "the attacker's sandbox changed: compare the cgroups of the same process"
    for pid, limits in after.items():
        assert limits == before[pid], (pid, before[pid], limits)
        assert str(LIMITS["processes"]) in limits.values(), limits
        assert str(LIMITS["memory_mb"] << 20) in limits.values(), limits
    for where, res in _results(r["output"]):
        assert not _succeeded(res, allow=("self cgroup",)), (where, _succeeded(res))


def test_no_inherited_descriptors(arena):
    """Every descriptor that is not its own channel or event loop: a forged template spawn
    request on each socket. No new process appears under the template."""
    r = arena.run("inherited_fds", where="step")
    known = set(arena.sandbox_pids("atk"))
    for host in arena.hosts("atk"):
        template = arena.template_of(host)
        children = {c.pid for c in template.children()}
        assert children <= known, f"processes under the template that are no sandbox: {children - known}"
    res = r["output"]["step"]
    answered = {fd: v for fd, v in res["forged spawn"].items() if v.get("ok") and '"ok"' in str(v.get("value"))}
    assert not answered, answered


# --- resources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["step", "run"])
def test_memory_bomb(arena, where):
    hosts = {pid: (_proc_identity(pid), psutil.Process(pid).memory_info().rss)
             for pid in arena.host_pids("atk")}
    t0 = time.monotonic()
    r = arena.run("memory_bomb", where=where, expect="errored")
    assert time.monotonic() - t0 < 60
    assert r["status"]["error"]["name"] in ("ResourceLimitError", "MemoryError"), r["status"]["error"]
    for pid, (ident, rss) in hosts.items():
        arena.assert_alive(ident)
        assert psutil.Process(pid).memory_info().rss - rss < 128 << 20, "the host's memory grew"


def test_memory_of_children_is_capped_by_the_cgroup(arena):
    """Forked children, each under the address-space limit, together over the cgroup's."""
    r = arena.run("memory_children", where="step", ctx={"children": 8, "mb": 48, "hold": 3})
    codes = r["output"]["step"]["children"]
    assert -9 in codes or 3 in codes, codes  # killed by the cgroup's OOM killer (or refused)
    for pid in arena.sandbox_pids("atk"):
        limits = _cgroup_limits(pid)
        assert str(LIMITS["memory_mb"] << 20) in limits.values(), limits


def test_fork_bomb(arena):
    """Fork until refused (the children live a few seconds) then start threads until refused:
    the processes under the sandbox, counted from the host, stay within the limit."""
    handle = arena.launch("fork_bomb", where="step", ctx={"hold": 4})
    peak, sandbox = 0, None
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if handle.status()["status"] in TERMINAL:
            break
        for h in arena.engine.sandboxes():
            for s in h["sandboxes"]:
                if s["instance"] == handle.id:
                    sandbox = s["pid"]
        if sandbox:
            try:
                peak = max(peak, 1 + len(psutil.Process(sandbox).children(recursive=True)))
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.1)
    status = wait_status(handle, "complete", timeout=WAIT)
    assert sandbox and peak > 1, "never saw the bomb"
    assert peak <= LIMITS["processes"], f"{peak} processes under one sandbox"
    res = status["output"]["step"]
    assert res["forked"] < LIMITS["processes"] and res["error"] == ["BlockingIOError", errno.EAGAIN], res
    wait_until(lambda: not psutil.Process(sandbox).children(recursive=True), 30, "the children to end")


def test_file_descriptor_exhaustion(arena):
    fds = {pid: psutil.Process(pid).num_fds() for pid in arena.host_pids("atk")}
    r = arena.run("fd_exhaustion")
    for pid, n in fds.items():
        assert abs(psutil.Process(pid).num_fds() - n) < 16, "the host's descriptors changed"
    for where, res in _results(r["output"]):
        assert res["opened"] < LIMITS["open_files"] and res["errno"] == errno.EMFILE, res


def test_disk_fill_of_scratch(arena):
    """Fill the scratch: it is a tmpfs of scratch_mb in the sandbox's own mount namespace;
    the host-side scratch directory stays empty."""
    r = arena.run("disk_fill", where="step")
    res = r["output"]["step"]
    assert res["written_mb"] <= LIMITS["scratch_mb"] and res["errno"] in (errno.ENOSPC, errno.EFBIG), res
    scratches = glob.glob(f"/tmp/dynwf-sandbox-{arena.tenants['atk']}-*")
    assert scratches, "no host-side scratch directory found to inspect"
    for d in scratches:
        sizes = [os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(d) for f in files]
        assert sum(sizes) == 0, (d, sizes)


@pytest.mark.parametrize("where", ["step", "run"])
def test_cpu_spin(arena, where):
    """An endless loop in a step and in run() outside any step: ResourceLimitError naming the
    CPU limit, the sandbox ended, the host alive."""
    t0 = time.monotonic()
    r = arena.run("cpu_spin", where=where, expect="errored", watch=True)
    assert time.monotonic() - t0 < 90
    err = r["status"]["error"]
    assert err["name"] == "ResourceLimitError" and "CPU time limit of 2 s" in err["message"], err
    assert r["ran_in"], "never saw the sandbox that ran it"
    assert _proc_identity(r["ran_in"]["host"]), "the host is gone"
    # The first sandbox seen ran the spin and must end. The last one seen may be a new
    # sandbox whose short activation only replayed the recorded failure: it stays warm.
    pid = r["first_in"]["sandbox"]
    wait_until(lambda: _proc_identity(pid) is None, 30, f"sandbox {pid} to end")


def test_cpu_spin_is_not_reset_by_binding_calls(arena):
    """Threads spin in a step while it calls its binding twice a second for 20 s: the CPU
    limit of the attempt (2 s) still ends it (a binding call used to start its count anew)."""
    r = arena.run("cpu_spin_with_binding_calls", where="step", ctx={"seconds": 20}, expect="errored")
    err = r["status"]["error"]
    assert err["name"] == "ResourceLimitError" and "CPU time limit of 2 s" in err["message"], err


def test_cpu_spin_after_the_activation(arena):
    """A thread started in a step keeps spinning after the step and run() have returned: the
    sandbox must stop burning CPU (be ended) within its CPU limit's reach."""
    try:
        arena.run("cpu_spin_background", "spin", where="step")
        pids = arena.sandbox_pids("spin")
        assert pids
        pid = pids[0]
        began = _proc_identity(pid)
        grace = LIMITS["cpu_seconds"] * 2 + 5
        # Polled: the sandbox must end (the host's idle watcher ends one that computes
        # between activations); a sandbox still alive past the grace period fails.
        wait_until(lambda: began is None or _proc_identity(pid) != began, grace,
                   f"the idle sandbox {pid}, left with spinning threads, to be ended "
                   f"(limit {LIMITS['cpu_seconds']} s of CPU)")
    finally:  # end the spinning sandbox: replacing the policy retires the tenant's idle hosts
        arena.engine.set_tenant_policy(arena.tenants["spin"], limits=LIMITS)


@pytest.mark.parametrize("attack,where", [("stdout_flood", "step"), ("logging_flood", "run")])
def test_log_flood(arena, attack, where):
    r = arena.run(attack, where=where, expect="errored")
    err = r["status"]["error"]
    assert err["name"] == "ResourceLimitError" and "log volume limit of 64 KiB" in err["message"], err
    info = arena.engine.journal.get_instance(arena.tenants["atk"], r["handle"].id)
    kept = sum(len(line.message) for line in arena.engine.journal.read_logs(info.pk, limit=100000))
    assert kept <= (LIMITS["log_kib"] + 8) * 1024, kept


def _cpu_of(pids) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def test_empty_line_flood_costs_the_host_little(arena):
    """Log frames of 50,000 empty lines each, sent straight on the channel for 12 s: they
    weigh nothing against the log volume limit and cost the sandbox almost no CPU. The
    trusted host must not pay for them without bound (here: no more CPU than the
    tenant's own per-step limit, twice, plus a second)."""
    before = _cpu_of(arena.host_pids("atk"))
    r = arena.run("empty_line_flood", where="step", ctx={"seconds": 12}, expect="any", watch=True)
    after = _cpu_of(set(arena.host_pids("atk")) | set(before) | {r["ran_in"].get("host", 0)} - {0})
    spent = sum(t - before.get(pid, 0.0) for pid, t in after.items())
    bound = 2 * LIMITS["cpu_seconds"] + 1
    assert spent <= bound, (
        f"the trusted host spent {spent:.1f} s of CPU on one activation's empty log lines "
        f"(bound {bound} s); the activation ended {r['status']['status']}: "
        f"{r['status']['error'] or r['output']}")


def test_span_flood_ends_at_the_log_volume_limit(arena):
    """Spans of the tenant's own, as large as the host keeps one, sent straight on the
    channel for 12 s with tracing on for the tenant: they count against the log volume
    limit, so the activation ends there instead of queueing them in the host process."""
    receiver = OtlpReceiver(decode_later=True)
    tenant = arena.tenants["spans"]
    try:
        arena.engine.set_tenant_telemetry(tenant, endpoint=receiver.endpoint)
        r = arena.run("span_flood", "spans", where="step", ctx={"seconds": 12}, expect="errored")
        err = r["status"]["error"]
        assert err["name"] == "ResourceLimitError" and "log volume limit of 64 KiB" in err["message"], err
    finally:
        arena.engine.clear_tenant_telemetry(tenant)
        receiver.close()


def test_huge_step_result(arena):
    """A 1 GiB string as a step's result (the tenant has room to build it)."""
    r = arena.run("huge_result", "big", where="step", expect="errored", timeout=WAIT, watch=True)
    assert r["ran_in"], "never saw the sandbox that ran it"
    host = _proc_identity(r["ran_in"]["host"])
    err = r["status"]["error"]
    assert err["name"] in ("PayloadTooLargeError", "ResourceLimitError"), err
    info = arena.engine.journal.get_instance(arena.tenants["big"], r["handle"].id)
    for s in arena.engine.journal.list_steps(info.pk):
        assert len(s.result_json or "") < 1 << 20 and len(s.error_message or "") < 1 << 16, s.name
    arena.assert_alive(host)
    assert psutil.Process(host[0]).memory_info().rss < 1 << 30, "the host holds the result"


# --- the channel --------------------------------------------------------------------------------


@pytest.mark.parametrize("attack,violation", [
    ("forged_message", "an answer to call 987654, which is not running"),
    ("forged_return", "run() ended while step call"),
    ("oversized_frame", "over the limit of"),
    ("garbage_frame", "not valid JSON"),
    ("out_of_order", "request id 1 was used before"),
])
def test_channel_protocol_violations(arena, attack, violation):
    """Messages forged on the supervisor channel (found in memory: runtime._Channel.sock)
    from a step callback: the sandbox is ended, the instance errors with
    SandboxProtocolError, nothing forged is recorded, the host lives."""
    r = arena.run(attack, where="step", expect="errored", ctx={"pause": 1.0}, watch=True)
    err = r["status"]["error"]
    assert err["name"] == "SandboxProtocolError" and violation in err["message"], err
    assert r["output"] is None
    assert '"forged"' not in r["records"] and "forged output" not in r["records"]
    assert r["ran_in"], "never saw the sandbox that ran it"
    assert _proc_identity(r["ran_in"]["host"]), "the host is gone"
    pid = r["first_in"]["sandbox"]  # the one that spoke out of turn (see test_cpu_spin)
    wait_until(lambda: _proc_identity(pid) is None, 30, f"sandbox {pid} to end")


def test_message_after_the_activation(arena):
    """A thread speaks on the channel after the activation ended: that sandbox is ended; the
    next instance runs in a new one."""
    r = arena.run("late_message", where="step", ctx={"pause": 1.0}, watch=True)
    assert r["ran_in"], "never saw the sandbox that ran it"
    host = _proc_identity(r["ran_in"]["host"])
    pid = r["ran_in"]["sandbox"]
    wait_until(lambda: _proc_identity(pid) is None, 30, f"sandbox {pid} to end")
    r = arena.run("noop", where="step")
    assert r["output"]["step"]["pid"] == 1
    arena.assert_alive(host)


# --- tenant code outside the sandbox ---------------------------------------------------------------


def test_tenant_module_never_imported_outside_a_sandbox(arena):
    """The attacker's workflow.py writes a marker file at import wherever it can: at push
    validation, in its host, anywhere. Only a sandbox may import it, and there it can't.
    So do its modules named like the standard library's (`typing.py`, ...), which a
    process with the code's directory first on its path would import instead, and a
    shared object its [env] preloads (`LD_PRELOAD`) in any process started with it: the
    sandbox template, which forks sandboxes unjailed and as root, must get neither."""
    marks = sorted(p.name for p in arena.mark_dir.glob("import-*"))
    assert not marks, f"tenant code ran outside a sandbox: {marks}: " + "; ".join(
        (arena.mark_dir / m).read_text()[:300] for m in marks[:3])


def test_sitecustomize_in_the_package_never_runs(arena):
    """The package holds a `sitecustomize.py` (tenant code) that writes a marker when Python
    imports it at start-up: it must never run in the trusted processes that load the
    package's runtime env (the push validation worker, the host actor)."""
    marks = sorted(arena.mark_dir.glob("site-*"))
    hosts = {**arena.seen_hosts, **{h["host_pid"]: h["tenant"] for h in arena.engine.sandboxes()}}
    details = []
    for m in marks:
        data = json.loads(m.read_text())
        pid = data["pid"]
        details.append(f"pid {pid}: " + (f"InstanceHost of {hosts[pid]}" if pid in hosts else
                                          f"another Ray worker ({' '.join(data['argv'])[-60:]})"))
    assert not marks, f"the tenant's sitecustomize.py ran in {len(marks)} trusted process(es): {details}"


def test_manifest_env_stays_out_of_the_trusted_host(arena):
    """The package's [env] (HOSTILE_PLANTED, HTTP_PROXY=<server C>, LD_PRELOAD) is for its
    sandboxes: neither the trusted host process nor its sandbox templates (unjailed, root)
    may start with it."""
    arena.run("noop", where="step")  # a live host, with its template
    planted, templates = {}, []
    for host in arena.host_pids("atk"):
        templates += [p.pid for p in psutil.Process(host).children()
                      if p.cmdline()[1:3] == ["-I", "-c"] and "_serve" in p.cmdline()[3]]
        for pid in (host, *templates):
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            planted.update({f"{pid}: {k.decode()}": v.decode() for k, v in env.items()
                            if k in (b"HOSTILE_PLANTED", b"HTTP_PROXY", b"HTTPS_PROXY", b"LD_PRELOAD")})
    assert templates, "found no sandbox template to look at"
    assert not planted, f"a trusted process runs with the tenant's environment: {planted}"


def test_tenant_proxy_setting_does_not_capture_platform_telemetry(arena, make_engine):
    """What the previous test's leak is worth: the platform exports a tenant's step spans
    from the trusted host, to the platform's collector, with the platform's credentials. The
    tenant's dynwf.toml names its own HTTP_PROXY (server C, standing in for a machine the
    tenant owns). Neither the spans nor the platform's token may go to C."""
    collector = _http_server(b"{}")
    token = f"platform-collector-token-{uuid.uuid4().hex}"
    try:
        engine = make_engine(telemetry_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
            "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {token}",
            "OTEL_BSP_SCHEDULE_DELAY": "100"})
        proxy = arena.servers["C"]
        before = len(proxy.requests)
        spy = f"spy-{arena.tag}"
        engine.push_tenant(spy, str(arena.attacker_dir))
        handle = engine.binding(spy).create(params={"attack": "noop", "where": "step"})
        wait_status(handle, "complete", timeout=WAIT)

        def root_span_exported() -> bool:  # the instance's root span, exported after its steps'
            return any(handle.id.encode() in b and b"dynwf.instance.status" in b
                       for b in list(collector.bodies))

        wait_until(lambda: root_span_exported() or len(proxy.requests) > before, 60,
                   "the instance's spans to be exported")
        through_proxy = proxy.requests[before:]
        assert not through_proxy, (
            f"the trusted host sent the platform's telemetry through the tenant's proxy: "
            f"{[(m, t, 'with the platform token' if token in json.dumps(h) else 'no token') for m, t, h in through_proxy]}")
        assert root_span_exported(), "the collector did not get the instance's root span"
    finally:
        collector.shutdown()
        collector.server_close()


# --- admission ---------------------------------------------------------------------------------


def test_one_tenant_cannot_hold_every_admission_slot(arena, make_engine):
    """An engine admits `max_activations` activations at once. A tenant starts that many
    instances whose step sleeps (no CPU: no CPU limit fires; its own step timeout of an
    hour): another tenant's new instance must still run, soon (fair shares)."""
    engine = make_engine(max_hosts=2, max_activations=2, hibernate_after=60.0)
    hog, patient = f"hog-{arena.tag}", f"patient-{arena.tag}"
    engine.push_tenant(hog, str(arena.attacker_dir))
    engine.push_tenant(patient, str(arena.tmp / "other"))
    hogs = [engine.binding(hog).create(id=f"hog-{i}", params={"attack": "hold_slot", "ctx": {"seconds": 30}})
            for i in range(2)]
    try:
        wait_until(lambda: sum(1 for h in engine.sandboxes() for sb in h["sandboxes"]
                               if sb["instance"] in ("hog-0", "hog-1")) == 2, WAIT, "both hogs to run")
        fresh = engine.binding(patient).create(id="patient")
        t0 = time.monotonic()
        deadline = t0 + 20
        while time.monotonic() < deadline and fresh.status()["status"] not in TERMINAL:
            time.sleep(0.1)
        status = fresh.status()
        assert status["status"] == "complete", (
            f"another tenant's instance was still {status['status']!r} after "
            f"{time.monotonic() - t0:.0f} s: two sleeping steps of one tenant hold every "
            f"admission slot (max_activations=2)")
    finally:
        for h in hogs:
            try:
                h.terminate()
            except Exception:  # noqa: BLE001 - already over
                pass


# --- afterwards ---------------------------------------------------------------------------------


def test_zz_victim_and_engine_unharmed(arena):
    """After every attack: the victim's rows are as they were, its live instance finishes
    with its scratch intact, a fresh instance of another tenant completes, and the processes
    the test started live."""
    arena.assert_victim_intact()
    assert arena.sleeper.poll() is None
    assert arena.witness.poll() == 0, "the witness listener was reached"
    (arena.ctl_dir / "release").touch()
    out = wait_status(arena.hold_handle, "complete", timeout=WAIT)["output"]
    assert out["kept"]["intact"] and out["kept"]["files"] == ["secret.txt"], out
    assert out["key"] is True
    fresh = arena.engine.binding(arena.tenants["other"]).create(id="after-the-attacks")
    assert wait_status(fresh, "complete", timeout=WAIT)["output"]["secret"] == "other"
    again = arena.engine.binding(arena.tenants["victim"]).create(id="victim-after")
    assert wait_status(again, "complete", timeout=WAIT)["output"]["secret"] == arena.victim["secret"]
