"""Whole-platform restarts and a second engine on a live journal, on SQLite and PostgreSQL.

Owns two tests that run a platform (Ray session + engine) in a process of its own,
`tests/platform_process.py`, and kill it with everything of its Ray session:

- `test_whole_platform_crash_resumes_in_seconds`: the platform and every process of
  its Ray session are SIGKILLed at once while instances are mid-step, sleeping, waiting
  for an event or complete; a new engine on the same journal and name must rerun the
  interrupted steps within `RESUME_S` seconds of starting (not after the dead leases'
  30 s TTL), never rerun a completed step, and keep every sleep's recorded due time.
- `test_two_engines_on_one_journal_never_run_an_instance_twice`: a second engine with the
  same name on the same journal (by mistake) while the first is alive must not take
  over the first one's leases, nor give them up when it is stopped; every instance, old
  or new, runs each step once.

Only the platform's own processes are killed (its descendants and the processes whose
command line names its private Ray temp dir), never by name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from dynwf_ray.journal import Journal

from .conftest import wait_status, wait_until
from .platform_process import ASK, TENANT, engine_label, runs

REPO = Path(__file__).resolve().parent.parent
#: How soon after a restarted engine starts its interrupted steps must run again.
RESUME_S = 5.0
#: The platform process's poll interval and lease TTL (the engine's default).
POLL_S = 0.5
LEASE_TTL = 30.0
HIBERNATE_S = 5.0
#: Seconds the timers of the sleeping instances run from their creation: the short one
#: falls due while the platform is down (the test waits for that before restarting it),
#: the long one well after the restart.
SHORT_SLEEP = 4
LONG_SLEEP = 20


class Platform:
    """`python -m tests.platform_process` in a session of its own, with a private Ray temp dir."""

    def __init__(self, tmp_path: Path, args: dict):
        self.ray_temp_dir = tempfile.mkdtemp(prefix="dwf", dir="/tmp")  # short: Ray's socket paths
        self.args = {**args, "ray_temp_dir": self.ray_temp_dir}
        self.out = tmp_path / "platform.out"
        self.err = tmp_path / "platform.err"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join our Ray
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.platform_process", json.dumps(self.args)],
                cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        self.killed = False

    def _tail(self) -> str:
        text = ""
        for path in (self.out, self.err):
            if path.exists():
                text += f"\n--- {path.name} ---\n" + path.read_text(errors="replace")[-4000:]
        return text

    def wait_ready(self, timeout: float = 150.0) -> dict:
        def ready():
            for line in self.out.read_text(errors="replace").splitlines():
                if line.startswith("READY "):
                    return json.loads(line[len("READY "):])
                if line.startswith("FAILED "):
                    raise AssertionError(f"the platform process failed: {line}{self._tail()}")
            if self.proc.poll() is not None:
                raise AssertionError(f"the platform process exited {self.proc.returncode}{self._tail()}")
            return None

        try:
            return wait_until(ready, timeout, "the platform process to be READY")
        except AssertionError as exc:
            if "timed out" in str(exc):
                raise AssertionError(f"{exc}{self._tail()}") from None
            raise

    def pids(self) -> set[int]:
        """The platform process, its descendants, and every process naming its Ray temp dir."""
        found: set[int] = set()
        try:
            root = psutil.Process(self.proc.pid)
            found.add(root.pid)
            found.update(p.pid for p in root.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        mine = re.compile(re.escape(self.ray_temp_dir) + r"(?![A-Za-z0-9_])")
        for p in psutil.process_iter(["cmdline"]):
            try:
                if mine.search(" ".join(p.info["cmdline"] or ())):
                    found.add(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.discard(os.getpid())
        return found

    def kill(self) -> int:
        """SIGSTOP every process of the platform (until no new one appears), then SIGKILL
        them all, wait until they are gone, and remove the Ray temp dir. Returns how many."""
        if self.killed:
            return 0
        self.killed = True
        stopped: set[int] = set()
        for _ in range(50):
            new = self.pids() - stopped
            if not new:
                break
            for pid in new:
                _signal(pid, signal.SIGSTOP)
            stopped |= new
        for pid in stopped:
            _signal(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        wait_until(lambda: all(_gone(pid) for pid in stopped), 30, "the platform's processes to die")
        shutil.rmtree(self.ray_temp_dir, ignore_errors=True)
        return len(stopped)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _steps(journal: Journal, tenant: str, instance_id: str) -> dict[str, tuple]:
    """{step name: (seq, kind, status, result_json, finished_at)}; names must be unique."""
    info = journal.get_instance(tenant, instance_id)
    rows = journal.list_steps(info.pk)
    names = [r.name for r in rows]
    assert len(names) == len(set(names)), f"{instance_id}: a step recorded twice: {rows}"
    return {r.name: (r.seq, r.kind, r.status, r.result_json, r.finished_at) for r in rows}


def _ended(journal: Journal, tenant: str, instance_id: str):
    info = journal.get_instance(tenant, instance_id)
    return info if info.status in ("complete", "errored", "terminated") else None


def _engine_options(url: str, name: str, label: str) -> dict:
    """The platform process's engine configuration (default lease TTL), for the test's engines."""
    return dict(
        database_url=url, name=name, lease_ttl=LEASE_TTL, poll_interval=POLL_S,
        hibernate_after=HIBERNATE_S, max_hosts=4, bindings={"ENGINE": engine_label(label)},
    )


def test_whole_platform_crash_resumes_in_seconds(backend, make_database_url, make_engine, tmp_path):
    url, name = make_database_url(), f"r{uuid.uuid4().hex[:8]}"
    work = tmp_path / "work"
    work.mkdir()
    slow, quick = ["slow-0", "slow-1"], ["quick-0", "quick-1"]
    sleeps = {"nap-short": SHORT_SLEEP, "nap-long": LONG_SLEEP}
    specs = (
        [{"id": i, "kind": "slow"} for i in slow] + [{"id": i, "kind": "quick"} for i in quick]
        + [{"id": "ask-0", "kind": "ask"}]
        + [{"id": i, "kind": "sleep", "sleep": s} for i, s in sleeps.items()]
    )
    platform = Platform(tmp_path, {
        "database_url": url, "name": name, "dir": str(work), "label": "A",
        "hibernate_after": HIBERNATE_S, "instances": specs,
    })
    try:
        platform.wait_ready()
        killed = platform.kill()
    finally:
        platform.kill()
    assert killed >= 5  # the platform, Ray's own processes, host processes, templates, sandboxes

    # What the journal and the step logs say right after the crash.
    journal = Journal(url)
    try:
        before = {i: _steps(journal, TENANT, i) for i in slow + quick + list(sleeps)}
        ask_before = _steps(journal, ASK, "ask-0")
        expiry = {}
        for i in slow:
            info = journal.get_instance(TENANT, i)
            assert info.status == "running" and info.lease_expires_at is not None, info
            assert list(before[i]) == ["a"] and len(runs(work / i, "b")) == 1
            expiry[i] = info.lease_expires_at
        for i in quick:
            assert journal.get_instance(TENANT, i).status == "complete"
        for i in sleeps:
            assert journal.get_instance(TENANT, i).status == "waiting"
            assert list(before[i]) == ["a", "nap"]
        assert journal.get_instance(ASK, "ask-0").status == "waiting"
    finally:
        journal.close()
    due = {i: json.loads(before[i]["nap"][3]) for i in sleeps}
    wait_until(lambda: time.time() > due["nap-short"] + 0.2, SHORT_SLEEP + 5, "the short sleep to fall due")

    # The platform comes back: same journal, same engine name, in another Ray session.
    engine = make_engine(**_engine_options(url, name, "B"))
    t0 = time.time()
    try:
        left = min(expiry.values()) - t0
        assert left > RESUME_S + 5, f"the dead leases expire {left:.1f} s after the restart: too soon to tell"
        second_runs = {}
        for i in slow:
            second_runs[i] = wait_until(
                lambda i=i: runs(work / i, "b")[1:], LEASE_TTL + 30, f"{i}'s step b to run again"
            )[0]
        resumed = max(r["t"] for r in second_runs.values()) - t0
        # The timer that fell due while nothing ran fires at once.
        wait_until(lambda: runs(work / "nap-short", "b"), 60, "the overdue sleep to end")
        short_fired = runs(work / "nap-short", "b")[0]["t"] - t0
        print(
            f"\n[{backend}] restarted engine: interrupted steps ran again "
            f"{resumed:.2f} s after it started (each: "
            + ", ".join(f"{i} {r['t'] - t0:.2f} s" for i, r in second_runs.items())
            + f"; their dead leases had {left:.1f} s left); the timer that fell due during the "
            f"outage fired {short_fired:.2f} s after it started"
        )

        for i in slow:
            (work / i / "release").touch()
        engine.binding(ASK).get("ask-0").send_event("approval", {"by": "carol"})
        outputs = {
            i: wait_status(engine.binding(TENANT).get(i), "complete", timeout=90)["output"]
            for i in slow + quick + list(sleeps)
        }
        asked = wait_status(engine.binding(ASK).get("ask-0"), "complete", timeout=60)["output"]

        for i in slow:  # a before the crash, b interrupted and run again, c after
            assert outputs[i] == {"a": "A", "b": "B", "c": "B"}, outputs[i]
            assert [r["engine"] for r in runs(work / i, "a")] == ["A"]
            assert [r["engine"] for r in runs(work / i, "b")] == ["A", "B"]
            assert len({r["proc"] for r in runs(work / i, "b")}) == 2  # in two sandboxes
            assert [r["engine"] for r in runs(work / i, "c")] == ["B"]
        for i in quick:  # complete before the crash: nothing ran again
            assert outputs[i] == {"a": "A", "b": "A", "c": "A"}, outputs[i]
            assert [len(runs(work / i, s)) for s in "abc"] == [1, 1, 1]
        for i in sleeps:
            assert outputs[i] == {"a": "A", "b": "B", "c": "B"}, outputs[i]
            assert [len(runs(work / i, s)) for s in "abc"] == [1, 1, 1]
        assert asked["by"] == "carol"

        journal = Journal(url)
        try:
            for i in slow + quick + list(sleeps):
                after = _steps(journal, TENANT, i)
                for step, row in before[i].items():
                    if step != "nap":  # completed steps keep their recorded result
                        assert after[step] == row, (i, step, row, after[step])
                assert [(s, r[0], r[2]) for s, r in after.items()] == [
                    (s, 1, "complete") for s in (["a", "nap", "b", "c"] if i in sleeps else ["a", "b", "c"])
                ], (i, after)
            for i in sleeps:  # the due time stands; nothing after the sleep ran before it
                nap = _steps(journal, TENANT, i)["nap"]
                assert nap[3] == before[i]["nap"][3], (i, nap, before[i]["nap"])
                assert nap[4] >= due[i], (i, nap, due[i])
                assert runs(work / i, "b")[0]["t"] >= due[i]
                assert journal.get_instance(TENANT, i).updated_at >= due[i]
            ask_after = _steps(journal, ASK, "ask-0")
            assert ask_after["pid before"] == ask_before["pid before"]
            assert asked["before"] == json.loads(ask_before["pid before"][3])
            assert [(s, r[0], r[2]) for s, r in ask_after.items()] == [
                ("pid before", 1, "complete"), ("approval", 1, "complete"), ("pid after", 1, "complete")
            ]
        finally:
            journal.close()
        long_fired = runs(work / "nap-long", "b")[0]["t"] - due["nap-long"]
        print(f"[{backend}] the timer due after the restart fired {long_fired:.2f} s after its due time")

        assert resumed <= RESUME_S, (
            f"interrupted steps ran again {resumed:.2f} s after the restarted engine started "
            f"(limit {RESUME_S:g} s; the dead leases' TTL is {LEASE_TTL:g} s)"
        )
        assert short_fired <= RESUME_S, f"the overdue timer fired {short_fired:.2f} s late"
    finally:
        engine.stop()


def test_two_engines_on_one_journal_never_run_an_instance_twice(
    backend, make_database_url, make_engine, tmp_path
):
    url, name = make_database_url(), f"d{uuid.uuid4().hex[:8]}"
    work = tmp_path / "work"
    work.mkdir()
    old = ["slow-0", "slow-1"]
    platform = Platform(tmp_path, {
        "database_url": url, "name": name, "dir": str(work), "label": "A",
        "hibernate_after": HIBERNATE_S, "instances": [{"id": i, "kind": "slow"} for i in old],
    })
    engine, stopped = None, False
    try:
        platform.wait_ready()
        # By mistake, a second engine with the same name on the same journal, while the
        # first one (another Ray session) is alive and its steps are in progress.
        engine = make_engine(**_engine_options(url, name, "B"))
        t0 = time.monotonic()
        new = [f"new-{n}" for n in range(3)]
        for i in new:
            (work / i).mkdir()
            engine.binding(TENANT).create(id=i, params={"dir": str(work / i), "block": True})

        def twice() -> dict:
            return {i: runs(work / i, "b") for i in old + new if len(runs(work / i, "b")) > 1}

        def watch(seconds: float, what: str) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                ran_twice = twice()
                assert not ran_twice, f"step b started twice {what}: {ran_twice}"
                time.sleep(0.1)

        # Long enough for the second engine to poll, tick and claim several times over.
        watch(t0 + 3 * POLL_S + 5.0 - time.monotonic(), "while both engines ran")
        wait_until(lambda: all(runs(work / i, "b") for i in new), 60, "every new instance's step b")
        assert not twice(), twice()
        assert platform.proc.poll() is None  # the first engine was alive all along
        holders = {i: runs(work / i, "b")[0]["engine"] for i in old + new}
        print(f"\n[{backend}] step b of each instance ran on engine: {holders}")
        assert all(holders[i] == "A" for i in old), holders

        for i in new:
            (work / i / "release").touch()
        outputs = {
            i: wait_status(engine.binding(TENANT).get(i), "complete", timeout=60)["output"]
            for i in new
        }
        # The mistake is noticed and the second engine stopped: that must not give up the
        # first one's leases either.
        engine.stop()
        stopped = True
        watch(3 * POLL_S + 3.0, "after the second engine stopped")
        assert platform.proc.poll() is None
        for i in old:
            (work / i / "release").touch()
        journal = Journal(url)
        try:
            for i in old:
                info = wait_until(
                    lambda i=i: _ended(journal, TENANT, i), 60, f"{i} to complete on the first engine"
                )
                assert info.status == "complete", info
                outputs[i] = json.loads(info.output_json)
            for i in old:
                assert outputs[i] == {"a": "A", "b": "A", "c": "A"}, outputs[i]
            for i in old + new:
                assert len(set(outputs[i].values())) == 1, outputs[i]  # one engine ran it all
                for step in "abc":
                    assert [r["engine"] for r in runs(work / i, step)] == [outputs[i][step]], (i, step)
                steps = _steps(journal, TENANT, i)
                assert [(s, r[0], r[2]) for s, r in steps.items()] == [
                    ("a", 1, "complete"), ("b", 1, "complete"), ("c", 1, "complete")
                ], (i, steps)
        finally:
            journal.close()
    finally:
        platform.kill()
        if engine is not None and not stopped:
            engine.stop()
