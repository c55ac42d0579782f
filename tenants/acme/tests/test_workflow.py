"""Acme's own tests of its order workflow, run in-process on a virtual clock.

`pytest tenants/acme/tests` runs them in well under a second: no Ray, no engine,
and the sleeps, retry delays and the hour-long approval wait take no real time.
See docs/testing.md.
"""

from pathlib import Path

import pytest

from dynwf_ray.testing import WorkflowTest, load_workflow

# The class `engine.push_tenant("acme", "tenants/acme")` runs (this directory's parent).
OrderWorkflow = load_workflow(Path(__file__).resolve().parents[1])


@pytest.fixture
def wf():
    with WorkflowTest(OrderWorkflow) as t:
        yield t


ORDER = {"items": [{"sku": "A-1", "price": 12.5}, {"sku": "B-2", "price": 30}]}


def test_happy_path_waits_for_the_managers_approval(wf):
    run = wf.run(ORDER, id="order-1")
    assert run.status == "waiting" and run.waiting_for == "approval"
    assert run.elapsed == 2  # the warehouse sleep passed on the virtual clock

    run.send_event("approval", {"by": "alice"}).resume()

    assert run.status == "complete", run
    assert run.output["receipt"] == {"charged": 42.5, "attempts": 1}
    assert run.output["approved_by"] == "alice"
    assert run.output["tracking"] == "ACME-order-1"
    assert [(s.name, s.status) for s in run.steps] == [
        ("price order", "complete"),
        ("charge card", "complete"),
        ("wait for the warehouse", "complete"),
        ("manager approval", "complete"),
        ("ship", "complete"),
    ]
    assert [line.message for line in run.logs] == [
        "charging 42.5 (attempt 1)",
        "approved by alice, shipped as ACME-order-1",
    ]


def test_gateway_failures_are_retried_with_backoff(wf):
    # The order asks the demo's fake gateway to fail twice: attempts 1 and 2 fail,
    # 3 succeeds, after retry delays of 1 s and 2 s (exponential from 1 second).
    run = wf.run({**ORDER, "fail_charge_times": 2}, events=[("approval", {"by": "bob"})])

    assert run.status == "complete", run
    charge = run.step("charge card")
    assert (charge.attempts, charge.finished) == (3, 1 + 2)
    assert run.output["receipt"] == {"charged": 42.5, "attempts": 3}
    assert run.elapsed == 1 + 2 + 2  # retry delays, then the warehouse sleep
    warnings = [(l.attempt, l.message) for l in run.logs if l.stream == "WARNING"]
    assert warnings == [(1, "acme.orders: payment gateway timed out"),
                        (2, "acme.orders: payment gateway timed out")]


def test_an_order_over_the_card_limit_is_not_retried(wf):
    run = wf.run({"items": [{"sku": "YACHT", "price": 25_000}]})

    assert run.status == "errored"
    assert run.error["name"] == "NonRetryableError"
    assert "order total 25000 is over the card limit" in run.error["message"]
    assert run.step("charge card").attempts == 1
    assert run.elapsed == 0
    assert [s.name for s in run.steps] == ["price order", "charge card"]


def test_no_approval_within_the_hour_errors_the_order(wf):
    wf.force_wait_timeout("manager approval")
    run = wf.run(ORDER)

    assert run.status == "errored"
    assert run.error["name"] == "WorkflowTimeoutError"
    assert "got no 'approval' event within 3600 s" in run.error["message"]
    assert run.elapsed == 2 + 3600
    assert run.step("manager approval").status == "failed"


def test_a_late_approval_within_a_shorter_timeout_still_counts(wf):
    run = wf.run({**ORDER, "approval_timeout": "30 minutes"})
    run.advance("29 minutes").send_event("approval", {"by": "carol"}).resume()
    assert run.output["approved_by"] == "carol"

    late = wf.run({**ORDER, "approval_timeout": "30 minutes"})
    late.advance("31 minutes")
    assert late.error["name"] == "WorkflowTimeoutError"


def test_a_declined_card_fails_the_order_after_every_retry(wf):
    wf.mock_step("charge card", error=RuntimeError("card declined"))
    run = wf.run(ORDER)

    assert run.status == "errored"
    assert run.error["name"] == "RuntimeError"
    assert "step 'charge card' failed after 5 attempt(s): RuntimeError: card declined" in run.error["message"]
    assert run.elapsed == 1 + 2 + 4 + 8  # retries={"limit": 4, "delay": "1 second", "backoff": "exponential"}
    assert run.logs == []  # the real callback (which prints) never ran


def test_a_gateway_timeout_then_a_mocked_charge(wf):
    wf.mock_step("charge card", timeout=True, times=1)  # attempt 1 hangs for its 30 s
    wf.mock_step("charge card", result={"charged": 42.5, "attempts": "mocked"})
    run = wf.run(ORDER, events=[("approval", {"by": "dave"})])

    assert run.output["receipt"] == {"charged": 42.5, "attempts": "mocked"}
    assert run.step("charge card").attempts == 2
    assert run.elapsed == 30 + 1 + 2
