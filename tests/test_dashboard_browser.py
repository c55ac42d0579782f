"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright.

The HTTP API (`dynwf_ray.server.create_app`) serves the SQLite engine of the suite
with uvicorn, in a thread, on a free 127.0.0.1 port. Two tenants each get a
workflow that waits for an approval, and one instance each. Signed in with tenant
A's token, the browser must list A's instance and not B's; it opens A's instance,
sends the approval from the form and watches the instance complete. Screenshots go
to test-artifacts/ in the repo root (kept by CI as artifacts); the test prints
their paths. No JavaScript error and no failed request may happen on the way.

The browser is $DYNWF_CHROMIUM, by default Debian's /usr/bin/chromium (`./dev test`
installs the `chromium` package when missing). Playwright launches it through
`executable_path`: its own browser download (`playwright install`) is never used.
Without the browser the test is skipped, saying why, unless DYNWF_REQUIRE_BROWSER=1
(set by `./dev test`) or CI=true, which turn the skip into a failure.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from .conftest import wait_status
from .workflows import Approval

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("DYNWF_CHROMIUM") or "/usr/bin/chromium"
# Headless, as root in CI (Chromium refuses its sandbox to root), and with /tmp instead
# of a small /dev/shm in containers.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
UI_TIMEOUT_MS = 30_000      # any one element to appear / change
COMPLETE_TIMEOUT_MS = 90_000  # the instance to complete after the event is sent


def _browser_required() -> bool:
    return (
        os.environ.get("DYNWF_REQUIRE_BROWSER") == "1"
        or os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
    )


def _skip_or_fail(reason: str) -> None:
    if _browser_required():
        pytest.fail(reason + ", and this run requires it (CI=true or DYNWF_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium (Debian's) under Playwright; one per module."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _skip_or_fail(
            f"no Chromium at {CHROMIUM} (install Debian's `chromium` package, which "
            "./dev test does, or point DYNWF_CHROMIUM at a Chromium)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _skip_or_fail(f"Playwright for Python is not installed ({exc}); pip install -e '.[test]'")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def serve(app):
    from dynwf_ray.server import serving

    return serving(app)


SCREENSHOTS = ("dashboard-overview", "dashboard-instances", "dashboard-instance-waiting",
               "dashboard-instance-complete", "dashboard-failure")


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_dashboard_signs_in_lists_own_instances_and_approves(chromium, engine):
    from playwright.sync_api import expect

    from dynwf_ray.server import ServerSettings, create_app

    for name in SCREENSHOTS:   # none left over from an earlier run
        (ARTIFACTS / f"{name}.png").unlink(missing_ok=True)

    # Two tenants, each with an instance waiting for its approval.
    run = uuid.uuid4().hex[:8]
    tenant_a, tenant_b = f"ta{run}", f"tb{run}"
    inst_a, inst_b = f"order-a-{run}", f"order-b-{run}"
    handles = {}
    for tenant, inst_id in ((tenant_a, inst_a), (tenant_b, inst_b)):
        engine.register(tenant, Approval)
        handles[tenant] = engine.binding(tenant).create(id=inst_id)
    for handle in handles.values():
        wait_status(handle, "waiting")
    _info, token_a = engine.journal.create_token(tenant_a, "browser test", time.time())

    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    problems: list[str] = []   # console errors, page errors, failed requests
    page.on("console", lambda m: m.type == "error" and problems.append(
        f"console.error: {m.text} ({m.location.get('url')}:{m.location.get('lineNumber')})"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(
        f"request failed: {r.method} {r.url}: {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(
        f"HTTP {r.status}: {r.request.method} {r.url}"))

    app = create_app(engine, ServerSettings())
    try:
        with serve(app) as base:
            page.goto(f"{base}/", wait_until="load")
            assert not problems, "loading the dashboard failed:\n" + "\n".join(problems)

            # Sign in with tenant A's token.
            page.fill("#token", token_a)
            page.click("#sign-in")
            expect(page.locator("#signed-in-as")).to_contain_text(tenant_a)
            expect(page.locator("#error-banner")).to_be_hidden()

            # The overview: A's own numbers only.
            page.click("#nav-overview")
            expect(page.locator("#overview")).to_be_visible()
            expect(page.locator("#overview")).to_contain_text(tenant_a)
            expect(page.locator("#overview")).not_to_contain_text(tenant_b)
            overview_png = _screenshot(page, "dashboard-overview")

            # The instances list: A's instance, not B's.
            page.click("#nav-instances")
            row_a = page.locator(f'tr[data-instance-id="{inst_a}"]')
            expect(row_a).to_have_count(1)
            expect(row_a).to_have_attribute("data-tenant", tenant_a)
            expect(row_a).to_contain_text("waiting")
            expect(page.locator(f'tr[data-instance-id="{inst_b}"]')).to_have_count(0)
            expect(page.locator(f'tr[data-tenant="{tenant_b}"]')).to_have_count(0)
            assert tenant_b not in page.content(), "tenant B shows up on tenant A's dashboard"
            instances_png = _screenshot(page, "dashboard-instances")

            # Open A's instance, waiting for its approval.
            link = row_a.locator("a")
            (link.first if link.count() else row_a).click()
            status = page.locator("#instance-status")
            expect(status).to_have_text("waiting")
            expect(page.locator("#step-timeline")).to_be_visible()
            waiting_png = _screenshot(page, "dashboard-instance-waiting")

            # Send the approval from the form and watch it complete.
            # The approver's name comes back in the instance's output, which tenant code
            # controls: markup in it must show as text, never run in the operator's browser.
            approver = f"<img src=x onerror=window.__pwned=1>browser-{run}"
            page.fill("#event-type", "approval")
            page.fill("#event-payload", json.dumps({"by": approver}))
            # A form field's value is not text content: the name must not be on the page
            # yet, so finding it there later shows the instance's output.
            expect(page.locator("#main")).not_to_contain_text(approver)
            page.click("#send-event")
            expect(status).to_have_text("complete", timeout=COMPLETE_TIMEOUT_MS)
            expect(page.locator("#error-banner")).to_be_hidden()
            # The output is on the page: it names the approver.
            expect(page.locator("#instance-output")).to_contain_text(approver)
            assert page.locator("#main img").count() == 0
            assert page.evaluate("() => window.__pwned === undefined")
            complete_png = _screenshot(page, "dashboard-instance-complete")

            # The engine agrees, and B's instance was not touched.
            assert wait_status(handles[tenant_a], "complete")["output"]["by"] == approver
            assert handles[tenant_b].status()["status"] == "waiting"

            assert not problems, "the dashboard had errors:\n" + "\n".join(problems)
            page.close()  # before the server stops: no open stream holds it up
    except BaseException:
        if not page.is_closed():
            try:
                _screenshot(page, "dashboard-failure")
            except Exception:  # noqa: BLE001 - the failure itself is what matters
                pass
        if problems:
            print("browser problems:\n" + "\n".join(problems))
        raise
    finally:
        context.close()
        for handle in handles.values():
            try:
                handle.terminate()
            except Exception:  # noqa: BLE001 - complete already, or the engine is gone
                pass

    for path in (overview_png, instances_png, waiting_png, complete_png):
        assert path.stat().st_size > 0
