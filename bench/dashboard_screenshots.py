"""Makes the documentation's screenshots of the dashboard (docs/images/dashboard-*.png).

Usage (from the repo root, with the test extras installed and Debian's Chromium):

    .venv/bin/python bench/dashboard_screenshots.py [--out docs/images] [--seconds 36]

It starts an engine with its defaults on a fresh temporary SQLite journal, registers
three tenants with workflow classes of the test suite (acme: `Observed`, which prints,
retries a step and waits for an "approval" event; globex: `ThreeSteps`; initech:
`Hello`), serves the HTTP API and the dashboard with uvicorn in a thread, and signs in
in headless Chromium (driven by Playwright, as in tests/test_dashboard_browser.py) with
an admin token. The overview page is opened first and kept open while a few dozen
instances are created over `--seconds` seconds, in waves, so that its charts (which
keep their history only while the page is open) have a curve: most of acme's instances
get their approval, a few are left waiting, one is terminated and one errors (its
approval lacks the approver). Then it saves

    dashboard-overview.png    the overview (tiles, instances per tenant, the charts)
    dashboard-instances.png   the instances table, as admin (every tenant)
    dashboard-instance.png    an `Observed` instance complete after its approval
                              (retried step, wait, logs)

and stops the browser, the server and the engine. It exits non-zero if the dashboard
showed an error banner, logged a JavaScript error or a request failed. The browser is
$DYNWF_CHROMIUM, by default /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `tests.workflows`: Ray workers load the classes by reference

from dynwf_ray import Engine  # noqa: E402
from dynwf_ray.server import ServerSettings, create_app, serving  # noqa: E402
from tests.workflows import Hello, Observed, ThreeSteps  # noqa: E402

CHROMIUM = os.environ.get("DYNWF_CHROMIUM") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
VIEWPORT = {"width": 1280, "height": 900}
TRACE_URL = "http://127.0.0.1:16686/trace/{trace_id}"
UI_TIMEOUT_MS = 30_000
APPROVERS = ["alice", "bob", "carol", "dave"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def serve(app):
    return serving(app)


def wait_status(handle, statuses: set[str], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = handle.status()
        if st["status"] in statuses:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"{handle!r} is {st['status']}, not {sorted(statuses)}, after {timeout} s")
        time.sleep(0.1)


class Workload:
    """Creates instances in waves and steers acme's approvals; call tick() often."""

    def __init__(self, engine: Engine, seconds: float):
        self.seconds = seconds
        self.wf = {t: engine.binding(t) for t in ("acme", "globex", "initech")}
        self.created: dict[str, list] = {t: [] for t in self.wf}
        self.credit = 0.0
        self.n = 0
        self.approved: list = []      # acme handles sent a good approval
        self.terminated = None
        self.errored = None
        self.left_waiting: list = []

    def rate(self, t: float) -> float:
        """Instances per second at time t: two waves over a trickle."""
        return 2.6 * math.sin(math.pi * t / (self.seconds / 2)) ** 2 + 0.4

    def create_one(self) -> None:
        self.n += 1
        tenant = ("acme", "globex", "initech", "globex", "acme")[self.n % 5]
        if tenant == "acme":
            h = self.wf[tenant].create(id=f"order-{1000 + self.n}", params={"amount": 10 * self.n % 170 + 20})
        elif tenant == "globex":
            h = self.wf[tenant].create(id=f"invoice-{2000 + self.n}")
        else:
            h = self.wf[tenant].create(id=f"greet-{3000 + self.n}",
                                       params={"name": APPROVERS[self.n % len(APPROVERS)]})
        self.created[tenant].append((time.monotonic(), h))

    def steer(self, now: float, t: float) -> None:
        """Approves acme's instances a few seconds after they were made, until 80% of the
        time (the newer ones stay waiting); at 85% terminates the newest one and sends the
        one before it an approval without an approver (its run() fails: errored)."""
        acme = [h for _, h in self.created["acme"]]
        if t >= self.seconds * 0.85 and self.terminated is None and len(acme) >= 2:
            self.terminated, self.errored = acme[-1], acme[-2]
            self.terminated.terminate()
            self.errored.send_event("approval", {"comment": "looks fine"})   # no "by"
            return
        if t > self.seconds * 0.8:
            return
        for made_at, h in self.created["acme"]:
            if now - made_at < 3.0 or h in self.approved:
                continue
            if h.status()["status"] != "waiting":
                continue
            h.send_event("approval", {"by": APPROVERS[len(self.approved) % len(APPROVERS)]})
            self.approved.append(h)
            return  # one approval per tick: spreads the activations

    def tick(self, t: float, dt: float) -> None:
        self.credit += self.rate(t) * dt
        while self.credit >= 1.0:
            self.credit -= 1.0
            self.create_one()
        self.steer(time.monotonic(), t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--seconds", type=float, default=36.0, help="how long instances are created")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import expect, sync_playwright

    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        print(f"no Chromium at {CHROMIUM} (install Debian's chromium or set DYNWF_CHROMIUM)", file=sys.stderr)
        return 2

    tmp = tempfile.mkdtemp(prefix="dynwf-screenshots-")
    problems: list[str] = []
    done = False
    log(f"journal: {tmp}/journal.db")
    engine = Engine.start(database_url=f"sqlite:///{tmp}/journal.db")
    try:
        engine.register("acme", Observed)
        engine.register("globex", ThreeSteps)
        engine.register("initech", Hello)
        _info, token = engine.journal.create_token(None, "docs", time.time())
        app = create_app(engine, ServerSettings(trace_url=TRACE_URL))
        with serve(app) as base, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.on("console", lambda m: m.type == "error" and problems.append(f"console.error: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(
                f"request failed: {r.method} {r.url}: {r.failure}"))
            page.on("response", lambda r: r.status >= 400 and problems.append(
                f"HTTP {r.status}: {r.request.method} {r.url}"))
            try:
                # Sign in and stay on the overview: its charts keep history only while open.
                page.goto(f"{base}/", wait_until="load")
                page.fill("#token", token)
                page.click("#sign-in")
                expect(page.locator("#signed-in-as")).to_contain_text("admin")
                expect(page.locator("#overview")).to_be_visible()
                page.wait_for_timeout(4000)  # a baseline of a couple of samples

                log(f"creating instances for {args.seconds:.0f} s")
                work = Workload(engine, args.seconds)
                start = last = time.monotonic()
                while (now := time.monotonic()) - start < args.seconds:
                    work.tick(now - start, now - last)
                    last = now
                    time.sleep(0.1)
                if not work.approved or work.terminated is None:
                    raise RuntimeError("the workload did not approve / terminate / fail as planned")
                # The shot right after the last instances came in (the tiles still show a rate).
                wait_status(work.errored, {"errored"})
                expect(page.locator("#chart-activations polyline")).to_have_count(1)
                expect(page.locator('#chart-by-tenant rect.st-errored')).to_have_count(1)
                expect(page.locator("#error-banner")).to_be_hidden()
                shot(page, args.out / "dashboard-overview.png", full_page=True)
                counts = {t: len(v) for t, v in work.created.items()}
                left = len(work.created["acme"]) - len(work.approved) - 2
                log(f"created {sum(counts.values())} instances: {counts}; approved "
                    f"{len(work.approved)}, terminated 1, errored 1, {left} acme left waiting")
                shown = work.approved[0]
                wait_status(shown, {"complete"})

                # The instances table, every tenant (admin).
                page.click("#nav-instances")
                expect(page.locator("#instances-table tbody tr[data-tenant]").first).to_be_visible()
                for t in ("acme", "globex", "initech"):
                    expect(page.locator(f'#instances-table tr[data-tenant="{t}"]').first).to_be_attached()
                page.wait_for_timeout(500)
                expect(page.locator("#error-banner")).to_be_hidden()
                shot(page, args.out / "dashboard-instances.png", full_page=False)

                # One Observed instance, complete after its approval: retried step, wait, logs.
                page.evaluate("h => { location.hash = h; }", f"#/instances/acme/{shown.id}")
                expect(page.locator("#instance-status")).to_have_text("complete")
                logs = page.locator("#logs")
                expect(logs).to_contain_text("charging, attempt 1")
                expect(logs).to_contain_text("approved by")
                expect(page.locator("#logs-state")).to_contain_text("ended")
                expect(page.locator('#step-timeline g[data-step="charge"]')).to_have_count(1)
                page.wait_for_timeout(500)
                expect(page.locator("#error-banner")).to_be_hidden()
                shot(page, args.out / "dashboard-instance.png", full_page=True)
                page.goto("about:blank")  # no open log stream holds the server up
                done = True
            except BaseException:
                if not page.is_closed():
                    try:
                        page.screenshot(path=str(Path(tmp) / "failure.png"), full_page=True)
                        log(f"failure screenshot: {Path(tmp) / 'failure.png'}")
                    except Exception:  # noqa: BLE001 - the failure itself is what matters
                        pass
                raise
            finally:
                context.close()
                browser.close()
    finally:
        log("stopping the engine")
        engine.stop()
        if done:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp} (journal, failure screenshot)")

    if problems:
        print("the dashboard had errors:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    return 0


def shot(page, path: Path, full_page: bool) -> None:
    page.screenshot(path=str(path), full_page=full_page)
    log(f"saved {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    sys.exit(main())
