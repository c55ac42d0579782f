"""Per-tenant code: pushed packages in their own runtime envs, versions, isolation, restarts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dynwf_ray import (
    InstanceNotFoundError, InvalidInputError, InvalidStateError, ReplayDivergenceError,
    UnknownTenantError,
)

from .conftest import wait_status

REPO = Path(__file__).resolve().parent.parent

# A tenant module that says who it is: every tenant uses the same module name.
IDENTIFY = '''
import os
from dynwf_ray import WorkflowEntrypoint

TENANT = {tenant!r}
MARK = {mark!r}

class Identify(WorkflowEntrypoint):
    async def run(self, event, step):
        first = await step.do("who", lambda: [TENANT, MARK, os.path.abspath(__file__)])
        p = event.payload or {{}}
        if p.get("sleep"):
            await step.sleep("nap", p["sleep"])
        if p.get("wait"):
            await step.wait_for_event("go", type="go", timeout="1 hour")
        second = await step.do("who again", lambda: [TENANT, MARK])
        return {{"first": first, "second": second}}
'''


def write_tenant(root: Path, name: str, code: str, manifest: str | None = None) -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "workflow.py").write_text(textwrap.dedent(code))
    if manifest is not None:
        (directory / "dynwf.toml").write_text(textwrap.dedent(manifest))
    return directory


def identify(root: Path, tenant: str, mark: str = "v1") -> Path:
    return write_tenant(root / mark, tenant, IDENTIFY.format(tenant=tenant, mark=mark))


def test_push_versions_by_content_and_validates_before_storing(engine, tenant, tmp_path):
    version = engine.push_tenant(tenant, str(REPO / "tenants" / "acme"))
    assert version.startswith("v-")
    assert engine.push_tenant(tenant, str(REPO / "tenants" / "acme")) == version
    assert [v["version"] for v in engine.versions(tenant)] == [version]

    bad = f"{tenant}-bad"
    cases = {
        "import": ("raise RuntimeError('boom at import')\n", None, "does not import: RuntimeError: boom at import"),
        "none": ("X = 1\n", None, "exactly one WorkflowEntrypoint subclass (found none)"),
        "not-sub": ("class W:\n    async def run(self, e, s): pass\n", 'entrypoint = "workflow:W"\n',
                    "workflow:W is not a subclass of WorkflowEntrypoint"),
        "missing": ("X = 1\n", 'entrypoint = "workflow:Nope"\n', "has no attribute 'Nope'"),
        "toml": ("X = 1\n", "entrypoint = [\n", "not valid TOML"),
        "key": ("X = 1\n", 'entry = "x"\n', "Extra inputs are not permitted"),
    }
    for name, (code, manifest, message) in cases.items():
        with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            engine.push_tenant(bad, str(write_tenant(tmp_path, name, code, manifest)))
    with pytest.raises(InvalidInputError, match="is not a directory"):
        engine.push_tenant(bad, str(tmp_path / "nowhere"))
    assert engine.versions(bad) == []  # nothing was stored
    with pytest.raises(UnknownTenantError):
        engine.binding(bad).create()


def test_twenty_tenants_run_side_by_side_each_on_its_own_code(engine, tmp_path):
    tenants = [f"side{i:02d}-{tmp_path.name[-6:]}" for i in range(20)]
    with ThreadPoolExecutor(4) as pool:
        versions = dict(zip(tenants, pool.map(lambda t: engine.push_tenant(t, str(identify(tmp_path, t))), tenants)))
    assert len(set(versions.values())) == 20  # same module name, different code
    handles = {t: engine.binding(t).create(id="same-id") for t in tenants}  # ids are per tenant
    for t, handle in handles.items():
        status = wait_status(handle, "complete", timeout=180)
        first, second = status["output"]["first"], status["output"]["second"]
        assert first[:2] == [t, "v1"] and second == [t, "v1"]
        assert versions[t].removeprefix("v-") in first[2]  # the module file of its own package
        assert status["version"] == versions[t]


def test_instances_stay_on_their_version_and_can_be_moved(engine, tenant, tmp_path):
    v1 = engine.push_tenant(tenant, str(identify(tmp_path, tenant, "v1")))
    wf = engine.binding(tenant)
    sleeper = wf.create(id="sleeper", params={"sleep": 3})
    waiter = wf.create(id="waiter", params={"wait": True})
    wait_status(sleeper, "waiting")
    wait_status(waiter, "waiting")
    v2 = engine.push_tenant(tenant, str(identify(tmp_path, tenant, "v2")))
    assert v2 != v1
    assert [v["latest"] for v in engine.versions(tenant)] == [False, True]

    fresh = wf.create(id="fresh")
    assert wait_status(fresh, "complete")["output"]["second"] == [tenant, "v2"]
    out = wait_status(sleeper, "complete")
    assert out["output"]["second"] == [tenant, "v1"] and out["version"] == v1  # pinned

    waiter.move_to_version(v2)
    assert waiter.status()["version"] == v2
    waiter.send_event("go", {})
    out = wait_status(waiter, "complete")["output"]
    assert out["first"][1] == "v1"  # recorded before the move: replayed, not re-run
    assert out["second"] == [tenant, "v2"]  # new steps run the new code
    with pytest.raises(InvalidStateError, match="no code version 'v-nope'"):
        wf.create(id="another").move_to_version("v-nope")
    with pytest.raises(InvalidStateError, match="complete"):
        fresh.move_to_version(v1)


def test_a_move_is_refused_when_the_history_would_not_replay(engine, tenant, tmp_path):
    v1 = engine.push_tenant(tenant, str(identify(tmp_path, tenant, "v1")))
    wf = engine.binding(tenant)
    waiters = [wf.create(id=f"w{i}", params={"wait": True}) for i in range(2)]
    for w in waiters:
        wait_status(w, "waiting")
    renamed = IDENTIFY.replace('step.do("who",', 'step.do("whom",').format(tenant=tenant, mark="v3")
    v3 = engine.push_tenant(tenant, str(write_tenant(tmp_path / "v3", tenant, renamed)))
    with pytest.raises(ReplayDivergenceError, match="at step 'whom'.*never asked for: 'who'"):
        waiters[0].move_to_version(v3)
    assert waiters[0].status()["version"] == v1  # refused: not moved
    report = engine.migrate(tenant, to=v3)
    assert (report["dry_run"], report["checked"], report["clean"], report["moved"]) == (True, 2, [], [])
    assert set(report["diverged"]) == {"w0", "w1"}
    v2 = engine.push_tenant(tenant, str(identify(tmp_path, tenant, "v2")))
    report = engine.migrate(tenant, to=v2, dry_run=False)
    assert sorted(report["clean"]) == sorted(report["moved"]) == ["w0", "w1"]
    waiters[0].send_event("go", {})
    out = wait_status(waiters[0], "complete")["output"]
    assert out["first"][1] == "v1" and out["second"] == [tenant, "v2"]
    waiters[1].move_to_version(v3, check=False)  # the platform may still insist
    assert waiters[1].status()["version"] == v3


SLOW_AFTER_EVENT = '''
import os, time
from pathlib import Path
from dynwf_ray import WorkflowEntrypoint

MARK = {mark!r}

class SlowAfterEvent(WorkflowEntrypoint):
    async def run(self, event, step):
        d = Path(event.payload["dir"])
        first = await step.do("who", lambda: MARK)
        await step.wait_for_event("go", type="go", timeout="1 hour")

        def slow():
            with open(d / "slow.log", "a") as f:
                f.write(MARK + "\\n")
            while not (d / "release").exists():
                time.sleep(0.02)
            return MARK

        return [first, await step.do("slow", slow)]
'''


def test_a_migrated_instance_survives_its_host_killed_mid_step_on_the_new_version(
    engine, tenant, tmp_path
):
    from .test_engine import lend, lines, process_gone, sandbox_of
    from .conftest import wait_until
    import signal

    lend(engine, tenant, tmp_path)
    code = lambda mark: write_tenant(tmp_path / mark, tenant, SLOW_AFTER_EVENT.format(mark=mark))
    engine.push_tenant(tenant, str(code("v1")))
    h = engine.binding(tenant).create(id="m", params={"dir": str(tmp_path)})
    wait_status(h, "waiting")
    v2 = engine.push_tenant(tenant, str(code("v2")))
    assert engine.migrate(tenant, to=v2, dry_run=False)["moved"] == ["m"]
    h.send_event("go")
    wait_until(lambda: lines(tmp_path / "slow.log"), what="the new version's step to start")
    host = wait_until(lambda: sandbox_of(engine, "m"), what="its sandbox")["host_pid"]
    os.kill(host, signal.SIGKILL)
    wait_until(lambda: process_gone(host), what="the host to die")
    wait_until(lambda: len(lines(tmp_path / "slow.log")) == 2, what="the step to run again")
    (tmp_path / "release").touch()
    assert wait_status(h, "complete")["output"] == ["v1", "v2"]  # replayed v1's, ran v2's
    assert lines(tmp_path / "slow.log") == ["v2", "v2"]


FAILING = '''
import time
from dynwf_ray import WorkflowEntrypoint

class Failing(WorkflowEntrypoint):
    async def run(self, event, step):
        if event.payload == "raise":
            await step.do("fine", lambda: 1)
            raise ValueError("tenant bug in run()")
        def spin():
            while True:
                time.sleep(0.01)
        return await step.do("spin forever", spin, retries={"limit": 0}, timeout="1 second")
'''


def test_a_failing_tenant_never_harms_another(engine, tenant, tmp_path):
    bad, good = f"{tenant}-bad", f"{tenant}-good"
    engine.push_tenant(bad, str(write_tenant(tmp_path, "bad", FAILING)))
    engine.push_tenant(good, str(identify(tmp_path, good)))
    raising = engine.binding(bad).create(id="raises", params="raise")
    spinning = engine.binding(bad).create(id="spins", params="spin")
    fine = engine.binding(good).create(id="fine", params={"sleep": 1})

    status = wait_status(raising, "errored")
    assert status["error"] == {
        "name": "ValueError", "message": f"tenant '{bad}' instance 'raises': tenant bug in run()",
    }
    status = wait_status(spinning, "errored", timeout=90)
    assert status["error"]["name"] == "StepTimeoutError"
    message = status["error"]["message"]
    assert f"tenant '{bad}' instance 'spins'" in message and "step 'spin forever'" in message
    assert wait_status(fine, "complete")["output"]["second"] == [good, "v1"]


CROSS = '''
from dynwf_ray import WorkflowEntrypoint, InstanceNotFoundError

class Cross(WorkflowEntrypoint):
    async def run(self, event, step):
        wf = self.env["WORKFLOWS"]
        def peek():
            try:
                wf.get(event.payload["other"])
                return "reached it"
            except InstanceNotFoundError as exc:
                return f"refused: {exc}"
        def signal():
            try:
                wf.get(event.payload["other"]).send_event("go", {})
                return "signalled it"
            except InstanceNotFoundError:
                return "refused"
        child = await step.do("start child", lambda: wf.create(id="child-of-" + event.instance_id).id)
        return {"peek": await step.do("peek", peek), "signal": await step.do("signal", signal),
                "child": child}
'''


def test_a_tenant_binding_reaches_only_its_own_instances(engine, tenant, tmp_path):
    a, b = f"{tenant}-a", f"{tenant}-b"
    engine.push_tenant(a, str(write_tenant(tmp_path, "a", CROSS)))
    engine.push_tenant(b, str(identify(tmp_path, b)))
    victim = engine.binding(b).create(id="victim", params={"wait": True})
    wait_status(victim, "waiting")
    out = wait_status(engine.binding(a).create(id="attacker", params={"other": "victim"}), "complete")
    assert out["output"]["peek"] == f"refused: no instance 'victim' for tenant '{a}'"
    assert out["output"]["signal"] == "refused"
    assert victim.status()["status"] == "waiting"  # untouched
    assert engine.binding(a).get("child-of-attacker").status()["version"]  # the child is a's
    with pytest.raises(InstanceNotFoundError):
        engine.binding(b).get("child-of-attacker")


RESTART_SCRIPT = '''
import json, sys, time
import dynwf_ray as dw

url, phase, tenant_dir = sys.argv[1], sys.argv[2], sys.argv[3]
engine = dw.Engine.start(database_url=url, ray_address="local", name="restart", lease_ttl=3)
try:
    wf = engine.binding("acme")
    if phase == "one":
        engine.push_tenant("acme", tenant_dir)
        inst = wf.create(id="survivor", params={"sleep": 1})
    else:
        inst = wf.get("survivor")
        inst.send_event("approval", {"by": "after the restart"})
    want = "waiting" if phase == "one" else "complete"
    deadline = time.time() + 240
    while time.time() < deadline:
        status = inst.status()
        if status["status"] == want and (phase != "one" or engine.journal.get_instance("acme", "survivor").waiting_for):
            break
        time.sleep(0.05)
    print(json.dumps(status))
finally:
    engine.stop()
'''


def test_full_restart_resumes_from_the_journal_with_ray_and_source_gone(make_database_url, tmp_path):
    url = make_database_url()
    source = tmp_path / "acme"
    shutil.copytree(REPO / "tenants" / "acme", source)
    script = tmp_path / "restart.py"
    script.write_text(RESTART_SCRIPT)
    env = {**os.environ, "RAY_ADDRESS": ""}

    def phase(name: str) -> dict:
        done = subprocess.run(
            [sys.executable, str(script), url, name, str(source)],
            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        # The last JSON line: Ray also forwards what the hosts printed to this stdout.
        return json.loads(next(l for l in reversed(done.stdout.splitlines()) if l.startswith("{")))

    assert phase("one")["status"] == "waiting"  # Ray is shut down when the process exits
    shutil.rmtree(source)  # the pushed code now exists only in the journal
    status = phase("two")  # a new Ray: its package store is empty
    assert status["status"] == "complete", status
    assert status["output"]["approved_by"] == "after the restart"
    assert status["output"]["tenant"] == "acme"


def test_same_content_is_one_version_but_each_tenant_only_runs_what_it_pushed(engine, tenant, tmp_path):
    a, b = f"{tenant}-a", f"{tenant}-b"
    directory = str(identify(tmp_path, "shared"))
    version = engine.push_tenant(a, directory)
    assert engine.push_tenant(b, directory) == version  # content stored and validated once
    assert [v["version"] for v in engine.versions(b)] == [version]
    own = engine.push_tenant(a, str(identify(tmp_path, "only-a", "a-only")))
    inst = engine.binding(b).create(id="b-inst", params={"wait": True})
    with pytest.raises(InvalidStateError, match=f"tenant '{b}' has no code version '{own}'"):
        inst.move_to_version(own)  # a's code is not b's to run
    inst.terminate()


def test_a_pip_requirement_lives_only_in_the_tenant_runtime_env(engine, tenant):
    with pytest.raises(ImportError):
        __import__("humanize")  # not installed where the engine runs
    with pytest.raises(InvalidInputError, match="has not allowed pip for it"):
        engine.push_tenant(tenant, str(REPO / "tenants" / "globex"))  # pip is the platform's grant
    engine.set_tenant_policy(tenant, pip=True)
    version = engine.push_tenant(tenant, str(REPO / "tenants" / "globex"))
    out = wait_status(engine.binding(tenant).create(params={"sleep": 0}), "complete")
    assert out["version"] == version
    assert out["output"]["total"] == "43.5 MB" and out["output"]["humanize"].startswith("4.")
    assert out["output"]["title"] == "Globex weekly report"  # [env] of dynwf.toml


def _stamp():
    import time

    return time.time_ns()


def test_loader_get_calls_load_only_on_a_miss_and_evicts_the_least_recent(make_engine):
    import ray

    engine = make_engine(loader_cache_size=2)
    loader = ray.get_actor(engine.config.loader_name, namespace=engine.config.namespace)
    first = ray.get(loader.get.remote("a", _stamp))
    assert ray.get(loader.get.remote("a", _stamp)) == first  # cached: load not called
    b = ray.get(loader.get.remote("b", _stamp))
    ray.get(loader.get.remote("a", _stamp))  # a is now the most recently used
    ray.get(loader.get.remote("c", _stamp))  # over the bound: b is evicted, not a
    assert ray.get(loader.get.remote("a", _stamp)) == first
    assert ray.get(loader.get.remote("b", _stamp)) != b  # loaded again
    stats = engine.stats()
    assert stats["cache_entries"] == 2 and stats["loader_cache_size"] == 2
    assert stats["cache_misses"] == 4 and stats["cache_hits"] == 3
